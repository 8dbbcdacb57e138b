"""Read a population folder written by :func:`AnatSSLLib.data.synth.synthesize_population`.

The subjects are **simulated** (see :mod:`.synth`); every image, label map and landmark file of a
subject lies in that subject's LPS physical space. Files are read lazily, when asked for.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from ..errors import InputError
from ..image import Image
from ..points import PointSet, read_points

__all__ = ["Subject", "Population", "load_population"]


@dataclasses.dataclass
class Subject:
    """One subject (or the template) of a population folder.

    Attributes:
        name: ``"sub-000"`` ... or ``"template"``.
        folder: its folder.
        contrasts: the contrasts written for it (``"t1"``, ``"t2"``, ``"ct"``, ``"pd"``, ``"flair"``).
    """

    name: str
    folder: pathlib.Path
    contrasts: tuple[str, ...]

    def _read(self, stem: str) -> Image:
        import SimpleITK as sitk

        path = self.folder / f"{stem}.nii.gz"
        if not path.is_file():
            raise InputError(f"{self.name}: {path} is missing")
        try:
            return Image.from_sitk(sitk.ReadImage(str(path)), name=f"{self.name}/{stem}")
        except RuntimeError as exc:
            raise InputError(f"{self.name}: cannot read {path} ({str(exc).strip().splitlines()[-1]})") from None

    def image(self, contrast: str) -> Image:
        """The image of ``contrast`` (LPS geometry from the file)."""
        if contrast not in self.contrasts:
            raise InputError(f"{self.name}: no contrast {contrast!r}; it has {', '.join(self.contrasts)}")
        return self._read(contrast)

    def labels(self) -> Image:
        """The uint8 label map on the subject's grid (ids: ``Population.label_names``)."""
        return self._read("labels")

    def landmarks(self) -> PointSet:
        """The 32 AFIDs in this subject's LPS space (ground truth, mapped exactly)."""
        return read_points(self.folder / "landmarks.mrk.json")

    def landmarks_rater2(self) -> PointSet:
        """The second expert placement (template only)."""
        path = self.folder / "landmarks_rater2.mrk.json"
        if not path.is_file():
            raise InputError(f"{self.name}: no second-rater landmarks (only the template has them)")
        return read_points(path)

    def transform(self) -> dict:
        """The subject's simulation parameters (``transform.json``); empty for the template."""
        path = self.folder / "transform.json"
        return json.loads(path.read_text()) if path.is_file() else {}


@dataclasses.dataclass
class Population:
    """A simulated population: ``template`` (the undeformed reference), ``subjects``, metadata."""

    path: pathlib.Path
    template: Subject
    subjects: list[Subject]
    label_names: dict[int, str]
    meta: dict

    @property
    def contrasts(self) -> tuple[str, ...]:
        return tuple(self.meta.get("contrasts", ()))

    def __len__(self) -> int:
        return len(self.subjects)

    def __getitem__(self, index: int) -> Subject:
        return self.subjects[index]


def load_population(path: str | pathlib.Path) -> Population:
    """Open the population folder ``path`` (with ``population.json``).

    Raises:
        InputError: not a population folder, or a listed subject folder is missing.
    """
    root = pathlib.Path(path)
    meta_path = root / "population.json"
    if not meta_path.is_file():
        raise InputError(f"population {root}: no population.json; expected a folder written by 'anatssl data synth'")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"population {root}: cannot read population.json ({exc})") from None
    contrasts = tuple(meta.get("contrasts", ()))
    subjects = []
    for name in meta.get("subjects", []):
        folder = root / name
        if not folder.is_dir():
            raise InputError(f"population {root}: subject folder {name} is missing (an interrupted run?)")
        subjects.append(Subject(name, folder, contrasts))
    if not (root / "template").is_dir():
        raise InputError(f"population {root}: template folder is missing")
    label_names = {int(k): str(v) for k, v in meta.get("label_names", {}).items()}
    return Population(root, Subject("template", root / "template", contrasts), subjects, label_names, meta)
