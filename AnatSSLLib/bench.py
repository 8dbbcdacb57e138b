"""Benchmark harness: the same cases, every method, one JSON report (``anatssl bench TASK``).

Tasks and what their reports hold:

- ``landmarks``: radial error in mm (mean, median, 90th percentile, share within 2 and 4 mm) over
  all targets and per landmark, seconds per target (``prepare`` timed separately), and the
  inter-rater floor (second expert placement against the ground truth on the template).
- ``segmentation``: Dice per label (mean over targets) and per target, seconds per target.
- ``search``: precision at 1 and 10 of ranked matches for the template landmarks.
- ``pretrain``: samples per second and peak memory of a training step.

Methods plug in through two small protocols, :class:`LandmarkMethod` and
:class:`SegmentationMethod`, and two registries, :data:`LANDMARK_METHODS` and
:data:`SEGMENTATION_METHODS` (name -> factory). The baselines (``affine``, ``bspline``, ``syn``,
``ncc``) are registered here; encoder-based methods (the landmark tool, the random-weight encoder
baseline ...) are registered by their own modules when imported (see :data:`PLUGIN_MODULES`):

    LANDMARK_METHODS["sam"] = lambda encoder=None, **options: SamLandmarks(encoder, **options)

A factory takes ``encoder`` (an encoder id or path, ``None`` for baselines) and keyword options,
and returns a ready method or raises :class:`~AnatSSLLib.baselines.MethodUnavailable` (the method is
then skipped with its message as a note).

Every report carries ``task``, ``schema``, ``date`` (UTC), ``command``, ``library_version`` and
``machine``; :func:`format_table` prints a short Markdown table of it.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.util
import json
import math
import os
import pathlib
import platform
import shlex
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from . import __version__
from .baselines import MethodUnavailable, NCCPatchMatching, RegisteredNCC, RegistrationLandmarks, RegistrationSegmentation
from .errors import AnatSSLError, InputError
from .image import Image
from .metrics import dice_per_label, precision_at_k, radial_errors, summarize_errors
from .points import PointSet

__all__ = [
    "SCHEMA_VERSION",
    "TASKS",
    "LandmarkMethod",
    "SegmentationMethod",
    "SearchMethod",
    "PretrainProbe",
    "LANDMARK_METHODS",
    "SEGMENTATION_METHODS",
    "SEARCH_METHODS",
    "PRETRAIN_PROBES",
    "PLUGIN_MODULES",
    "load_plugins",
    "make_landmark_methods",
    "make_segmentation_methods",
    "inter_rater_floor",
    "run_landmark_benchmark",
    "run_segmentation_benchmark",
    "run_search_benchmark",
    "run_pretrain_benchmark",
    "machine_info",
    "write_report",
    "format_table",
]

SCHEMA_VERSION = 1
TASKS = ("landmarks", "segmentation", "search", "pretrain")


# ---- protocols -------------------------------------------------------------------------------
@runtime_checkable
class LandmarkMethod(Protocol):
    """Finds reference landmarks in other volumes.

    ``prepare`` gets the reference volume and its landmarks (LPS mm) once; ``locate`` returns, for
    one target volume, a :class:`PointSet` with the same labels at the predicted LPS positions
    (``confidence`` optional, higher is surer).
    """

    name: str

    def prepare(self, reference: Image, ref_points: PointSet) -> None: ...

    def locate(self, target: Image) -> PointSet: ...


@runtime_checkable
class SegmentationMethod(Protocol):
    """Transfers a reference label map to other volumes: ``segment`` returns labels on the target's grid."""

    name: str

    def prepare(self, reference: Image, reference_labels: Image) -> None: ...

    def segment(self, target: Image) -> Image: ...


@runtime_checkable
class SearchMethod(Protocol):
    """Embedding search: ``index`` a set of named volumes, then ``query`` a point of another volume.

    ``query(image, point, k)`` returns up to ``k`` ranked matches ``(volume_name, position_lps_mm,
    score)``, best first. A method may also have ``best_in_each(image, point)``: the single best
    match in every indexed volume (then the benchmark reports the top answer per subject).
    """

    name: str

    def index(self, volumes: Sequence[tuple[str, Image]]) -> None: ...

    def query(self, image: Image, point: np.ndarray, k: int) -> list[tuple[str, np.ndarray, float]]: ...


@runtime_checkable
class PretrainProbe(Protocol):
    """One pretraining configuration to time: ``step()`` runs one optimisation step on ``batch_size`` samples.

    ``device`` is the torch device string (``"cpu"``, ``"cuda"``, ...), used to read peak memory.
    """

    name: str
    batch_size: int
    device: str

    def step(self) -> None: ...


# ---- registries ------------------------------------------------------------------------------
def _registration_landmarks(kind: str) -> Callable[..., LandmarkMethod]:
    def factory(encoder: str | None = None, **options: Any) -> LandmarkMethod:
        return RegistrationLandmarks(kind, **options)

    return factory


def _registration_segmentation(kind: str) -> Callable[..., SegmentationMethod]:
    def factory(encoder: str | None = None, **options: Any) -> SegmentationMethod:
        return RegistrationSegmentation(kind, **options)

    return factory


def _ncc(encoder: str | None = None, **options: Any) -> LandmarkMethod:
    return NCCPatchMatching(**options)


#: Landmark methods by name: ``factory(encoder=None, **options) -> LandmarkMethod``.
LANDMARK_METHODS: dict[str, Callable[..., LandmarkMethod]] = {
    "affine": _registration_landmarks("affine"),
    "bspline": _registration_landmarks("bspline"),
    "syn": _registration_landmarks("syn"),
    "ncc": _ncc,
    # NCC from the registration affine on the target mapped into the reference's contrast: the
    # landmark tool's cross-contrast pipeline with raw intensities in place of the embedding
    "ncc+registration+contrast": lambda encoder=None, **options: RegisteredNCC(match_contrast=True, **options),
}

#: Segmentation methods by name: ``factory(encoder=None, **options) -> SegmentationMethod``.
SEGMENTATION_METHODS: dict[str, Callable[..., SegmentationMethod]] = {
    "affine": _registration_segmentation("affine"),
    "bspline": _registration_segmentation("bspline"),
    "syn": _registration_segmentation("syn"),
}

#: Search methods by name: ``factory(encoder=None, **options) -> SearchMethod`` (supplied by the search tool).
SEARCH_METHODS: dict[str, Callable[..., SearchMethod]] = {}

#: Pretraining probes by name: ``factory(encoder=None, **options) -> PretrainProbe`` (supplied by the methods).
PRETRAIN_PROBES: dict[str, Callable[..., PretrainProbe]] = {}

#: Modules imported by :func:`load_plugins` so that they can add their methods to the registries.
PLUGIN_MODULES: list[str] = [
    "AnatSSLLib.tools.landmarks",
    "AnatSSLLib.tools.segmentation",
    "AnatSSLLib.tools.search",
    "AnatSSLLib.pretraining",
]

DEFAULT_LANDMARK_METHODS = ("affine", "bspline", "ncc", "syn")
DEFAULT_SEGMENTATION_METHODS = ("affine", "bspline", "syn")


def load_plugins() -> dict[str, str]:
    """Import every existing module of :data:`PLUGIN_MODULES`; returns ``{module: problem}`` for those that failed."""
    problems: dict[str, str] = {}
    for module in PLUGIN_MODULES:
        try:
            if importlib.util.find_spec(module) is None:
                continue
            importlib.import_module(module)
        except Exception as exc:  # a broken tool module must not stop the baselines
            problems[module] = f"{type(exc).__name__}: {exc}"
    return problems


def _make(
    registry: Mapping[str, Callable[..., Any]], names: Iterable[str | Any], encoder: str | None, kind: str
) -> tuple[list[Any], dict[str, str]]:
    methods: list[Any] = []
    skipped: dict[str, str] = {}
    for item in names:
        if not isinstance(item, str):
            methods.append(item)
            continue
        name = item.strip()
        if not name:
            continue
        if name not in registry:
            raise InputError(
                f"unknown {kind} method {name!r}; available: {', '.join(sorted(registry))}. Encoder-based methods "
                "are registered by the tool modules when they are installed (see AnatSSLLib.bench.PLUGIN_MODULES)"
            )
        try:
            method = registry[name](encoder=encoder)
        except MethodUnavailable as exc:
            skipped[name] = str(exc)
            continue
        method.name = name
        methods.append(method)
    return methods, skipped


def make_landmark_methods(names: Iterable[str], encoder: str | None = None) -> tuple[list[LandmarkMethod], dict[str, str]]:
    """Build landmark methods by registry name; returns ``(methods, {skipped name: reason})``."""
    return _make(LANDMARK_METHODS, names, encoder, "landmark")


def make_segmentation_methods(
    names: Iterable[str], encoder: str | None = None
) -> tuple[list[SegmentationMethod], dict[str, str]]:
    """Build segmentation methods by registry name; returns ``(methods, {skipped name: reason})``."""
    return _make(SEGMENTATION_METHODS, names, encoder, "segmentation")


# ---- report helpers --------------------------------------------------------------------------
def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def machine_info() -> dict[str, Any]:
    """Where the benchmark ran: OS, Python, CPU count, library versions, accelerator (if torch sees one)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "SimpleITK": _version("SimpleITK"),
        "antspyx": _version("antspyx"),
        "torch": _version("torch"),
        # the threads each library may use: seconds per target only compare under the same settings
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    if "SimpleITK" in sys.modules:
        info["sitk_threads"] = sys.modules["SimpleITK"].ProcessObject.GetGlobalDefaultNumberOfThreads()
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        try:
            if torch.cuda.is_available():
                info["accelerator"] = torch.cuda.get_device_name(0)
        except Exception:
            pass
    return info


def git_commit() -> str | None:
    """The commit of the checkout this library runs from (with ``+dirty`` for uncommitted changes), if any."""
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def _header(task: str, command: str | None) -> dict[str, Any]:
    return {
        "task": task,
        "schema": SCHEMA_VERSION,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": command if command is not None else " ".join(shlex.quote(a) for a in sys.argv),
        "library_version": __version__,
        "machine": machine_info(),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, pathlib.Path):
        return str(value)
    return value


def write_report(report: Mapping[str, Any], path: str | os.PathLike) -> pathlib.Path:
    """Write ``report`` as JSON (NaN -> null) atomically to ``path``; returns the path."""
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a report is an ordinary file
        with os.fdopen(fd, "w") as fh:
            json.dump(_jsonable(dict(report)), fh, indent=1)
            fh.write("\n")
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="case", file=sys.stderr)


def _select_targets(population: Any, reference: str, targets: int | Sequence[str] | None) -> tuple[Any, list[Any]]:
    subjects = list(population.subjects)
    by_name = {s.name: s for s in subjects}
    if reference == "template":
        ref = population.template
    elif reference in by_name:
        ref = by_name[reference]
    else:
        raise InputError(f"reference {reference!r}: expected 'template' or a subject name ({', '.join(by_name)})")
    pool = [s for s in subjects if s.name != ref.name]
    if targets is None:
        chosen = pool
    elif isinstance(targets, int):
        if targets < 1:
            raise InputError(f"targets: expected at least 1, got {targets}")
        chosen = pool[:targets]
    else:
        missing = [t for t in targets if t not in by_name or t == ref.name]
        if missing:
            raise InputError(f"targets {missing}: not subjects of the population (other than the reference)")
        chosen = [by_name[t] for t in targets]
    if not chosen:
        raise InputError(f"population {getattr(population, 'path', '')}: no target subjects besides the reference")
    return ref, chosen


def _population_info(population: Any) -> dict[str, Any]:
    meta = getattr(population, "meta", {}) or {}
    return {
        "path": str(getattr(population, "path", "")),
        "n_subjects": len(population.subjects),
        "simulated": meta.get("simulated"),
        "res_mm": meta.get("res_mm"),
        "seed": meta.get("seed"),
    }


def inter_rater_floor(population: Any) -> dict[str, Any]:
    """Second expert placement against the ground truth on the template: ``{summary, per_landmark}`` (mm).

    Returns ``{"note": ...}`` when the population's template has no second placement.
    """
    template = population.template
    try:
        rater2 = template.landmarks_rater2()
        truth = template.landmarks()
    except (AnatSSLError, AttributeError, OSError) as exc:
        return {"note": f"no inter-rater floor: {exc}"}
    errors = radial_errors(rater2, truth)
    return {"summary": summarize_errors(errors), "per_landmark": errors}


# ---- landmarks -------------------------------------------------------------------------------
def _prepare_methods(methods: Sequence[Any], reference: Image, reference_data: Any) -> dict[str, dict[str, Any]]:
    """Call ``prepare(reference, reference_data)`` on each method (timed) and start its result entry."""
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        start = time.perf_counter()
        method.prepare(reference, reference_data)
        results[method.name] = {
            "description": getattr(method, "description", ""),
            "prepare_seconds": time.perf_counter() - start,
            "seconds": {},
            "per_target": {},
            "failures": {},
        }
    return results


def run_landmark_benchmark(
    population: Any,
    methods: Sequence[LandmarkMethod | str],
    reference: str = "template",
    reference_contrast: str = "t1",
    target_contrast: str | None = None,
    targets: int | Sequence[str] | None = None,
    out_json: str | os.PathLike | None = None,
    encoder: str | None = None,
    command: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """One-shot landmark benchmark: every method on the same reference and targets.

    Args:
        population: a :class:`AnatSSLLib.data.Population` (template, subjects with ``image(contrast)``
            and ``landmarks()`` in LPS mm).
        methods: :class:`LandmarkMethod` objects or names of :data:`LANDMARK_METHODS`; names whose
            method is unavailable (e.g. ``syn`` without antspyx) are skipped with a note.
        reference: ``"template"`` or a subject name (then left out of the targets).
        reference_contrast / target_contrast: contrasts read from reference and targets
            (``target_contrast`` defaults to ``reference_contrast``).
        targets: subject names, or the number of first subjects, or ``None`` for all.
        out_json: where to write the report (atomically); nothing is written when ``None``.
        encoder: passed to factories of named methods.
        command: the command line recorded in the report (default: ``sys.argv``).
        progress: show a tqdm bar on stderr.

    Returns:
        The report: header, ``population``, ``reference``, contrasts, ``targets``, ``landmarks``,
        ``inter_rater``, ``methods`` (per method: ``summary`` pooled over every landmark of every
        target, ``per_landmark`` summaries, ``per_target`` errors in mm, ``prepare_seconds``,
        ``seconds_per_target``, ``failures``) and ``skipped``.
    """
    target_contrast = target_contrast or reference_contrast
    names = [m if isinstance(m, str) else m.name for m in methods]
    if len(set(names)) != len(names):
        raise InputError(f"methods: names must be unique, got {names}")
    built, skipped = make_landmark_methods(methods, encoder=encoder)
    ref, chosen = _select_targets(population, reference, targets)
    ref_image = ref.image(reference_contrast)
    ref_points = ref.landmarks()
    report = _header("landmarks", command)
    report.update(
        population=_population_info(population),
        reference=ref.name,
        reference_contrast=reference_contrast,
        target_contrast=target_contrast,
        targets=[s.name for s in chosen],
        landmarks={"labels": list(ref_points.labels), "descriptions": ref_points.descriptions},
        inter_rater=inter_rater_floor(population),
        skipped=skipped,
        methods={},
    )
    results = _prepare_methods(built, ref_image, ref_points)
    bar = _progress(len(chosen) * len(built), "landmarks", progress)
    try:
        for subject in chosen:
            target = subject.image(target_contrast)
            truth = subject.landmarks()
            for method in built:
                entry = results[method.name]
                if bar is not None:
                    bar.set_postfix_str(f"{method.name} on {subject.name}")
                start = time.perf_counter()
                try:
                    pred = method.locate(target)
                except (AnatSSLError, RuntimeError) as exc:
                    entry["failures"][subject.name] = f"{type(exc).__name__}: {exc}"
                    pred = None
                entry["seconds"][subject.name] = time.perf_counter() - start
                if pred is not None:
                    errors = radial_errors(pred, truth)
                    entry["per_target"][subject.name] = {
                        "errors_mm": errors,
                        "summary": summarize_errors(errors),
                        "confidence": None if pred.confidence is None else dict(zip(pred.labels, pred.confidence.tolist())),
                    }
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    for name, entry in results.items():
        pooled = [e for t in entry["per_target"].values() for e in t["errors_mm"].values()]
        per_landmark = {
            label: summarize_errors([t["errors_mm"][label] for t in entry["per_target"].values()])
            for label in ref_points.labels
        }
        seconds = list(entry["seconds"].values())
        entry["summary"] = summarize_errors(pooled)
        entry["per_landmark"] = per_landmark
        entry["seconds_per_target"] = float(np.mean(seconds)) if seconds else float("nan")
        report["methods"][name] = entry
    if out_json is not None:
        write_report(report, out_json)
    return report


# ---- segmentation ----------------------------------------------------------------------------
def run_segmentation_benchmark(
    population: Any,
    methods: Sequence[SegmentationMethod | str],
    reference: str = "template",
    reference_contrast: str = "t1",
    target_contrast: str | None = None,
    targets: int | Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    out_json: str | os.PathLike | None = None,
    encoder: str | None = None,
    command: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Label transfer benchmark: Dice per label of every method on the same reference and targets.

    Args are those of :func:`run_landmark_benchmark`, plus ``labels`` (ids to score; default: every
    non-zero id of the reference label map). Each method's entry holds ``dice_per_label`` (mean over
    targets), ``mean_dice`` (mean over labels), ``per_target`` Dice, ``prepare_seconds``,
    ``seconds_per_target`` and ``failures``.
    """
    target_contrast = target_contrast or reference_contrast
    built, skipped = make_segmentation_methods(methods, encoder=encoder)
    ref, chosen = _select_targets(population, reference, targets)
    ref_image = ref.image(reference_contrast)
    ref_labels = ref.labels()
    if labels is None:
        labels = [int(v) for v in np.unique(ref_labels.array) if v != 0]
    label_names = dict(getattr(population, "label_names", {}) or {})
    report = _header("segmentation", command)
    report.update(
        population=_population_info(population),
        reference=ref.name,
        reference_contrast=reference_contrast,
        target_contrast=target_contrast,
        targets=[s.name for s in chosen],
        labels={str(lab): label_names.get(lab, str(lab)) for lab in labels},
        skipped=skipped,
        methods={},
    )
    results = _prepare_methods(built, ref_image, ref_labels)
    bar = _progress(len(chosen) * len(built), "segmentation", progress)
    try:
        for subject in chosen:
            target = subject.image(target_contrast)
            truth = subject.labels()
            for method in built:
                entry = results[method.name]
                start = time.perf_counter()
                try:
                    pred = method.segment(target)
                except (AnatSSLError, RuntimeError) as exc:
                    entry["failures"][subject.name] = f"{type(exc).__name__}: {exc}"
                    pred = None
                entry["seconds"][subject.name] = time.perf_counter() - start
                if pred is not None:
                    entry["per_target"][subject.name] = dice_per_label(pred, truth, labels)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    for name, entry in results.items():
        per_label = {}
        for lab in labels:
            vals = [d[lab] for d in entry["per_target"].values() if not math.isnan(d[lab])]
            per_label[lab] = float(np.mean(vals)) if vals else float("nan")
        finite = [v for v in per_label.values() if not math.isnan(v)]
        entry["dice_per_label"] = per_label
        entry["mean_dice"] = float(np.mean(finite)) if finite else float("nan")
        seconds = list(entry["seconds"].values())
        entry["seconds_per_target"] = float(np.mean(seconds)) if seconds else float("nan")
        report["methods"][name] = entry
    if out_json is not None:
        write_report(report, out_json)
    return report


# ---- search ----------------------------------------------------------------------------------
def run_search_benchmark(
    population: Any,
    searcher: SearchMethod | None = None,
    contrast: str = "t1",
    query_contrast: str | None = None,
    radius_mm: float = 4.0,
    ks: Sequence[int] = (1, 10),
    targets: int | Sequence[str] | None = None,
    out_json: str | os.PathLike | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Embedding search benchmark: precision at ``k`` of ranked matches for the template landmarks.

    The searcher indexes the target subjects (``contrast``); each template landmark
    (``query_contrast``, default ``contrast``) is one query. A returned match is correct when it lies
    in a target within ``radius_mm`` of that target's same landmark (LPS mm). Report:
    ``precision_at_{k}`` per ``k``, ``per_landmark`` precision at the largest ``k``, ``n_queries``,
    ``index_seconds``, ``seconds_per_query`` (the mean, the first query included),
    ``first_query_seconds`` (it embeds the query volume) and ``later_query_seconds_median`` (a
    click on a volume already embedded). When the searcher has ``best_in_each``, also
    ``top_answer_precision``: over (query, target) pairs, how often the target's best match is
    correct (a target with no match counts as wrong), with ``top_answer_error_mm`` (median, mean) and
    ``top_answer_per_landmark``.

    Raises:
        InputError: no searcher given (search methods come with an encoder, from the search tool).
    """
    if searcher is None:
        raise InputError(
            "no encoder given: the search benchmark needs a search method built on an encoder "
            "(the embedding search tool supplies it); there is no encoder-free baseline for it"
        )
    query_contrast = query_contrast or contrast
    ref, chosen = _select_targets(population, "template", targets)
    truths = {s.name: s.landmarks() for s in chosen}
    start = time.perf_counter()
    searcher.index([(s.name, s.image(contrast)) for s in chosen])
    index_seconds = time.perf_counter() - start
    query_image = ref.image(query_contrast)
    queries = ref.landmarks()
    kmax = max(ks)
    relevant: dict[str, list[bool]] = {}
    top_errors: dict[str, list[float]] = {}
    start = time.perf_counter()
    each = []
    for label, point in zip(queries.labels, queries.positions):
        began = time.perf_counter()
        hits = searcher.query(query_image, np.asarray(point, dtype=float), kmax)
        each.append(time.perf_counter() - began)
        relevant[label] = [
            name in truths and float(np.linalg.norm(np.asarray(pos, dtype=float) - truths[name].position(label))) <= radius_mm
            for name, pos, _score in hits
        ]
    query_seconds = time.perf_counter() - start
    if hasattr(searcher, "best_in_each"):
        for label, point in zip(queries.labels, queries.positions):
            ranked = searcher.best_in_each(query_image, np.asarray(point, dtype=float))
            best = {name: pos for name, pos, _score in reversed(ranked)}  # reversed: a volume's first (best) hit wins
            top_errors[label] = [
                float(np.linalg.norm(np.asarray(best[name], dtype=float) - truths[name].position(label))) if name in best else math.inf
                for name in truths
            ]
    report = _header("search", command)
    report.update(
        population=_population_info(population),
        method=getattr(searcher, "name", type(searcher).__name__),
        contrast=contrast,
        query_contrast=query_contrast,
        radius_mm=radius_mm,
        targets=[s.name for s in chosen],
        n_queries=len(queries),
        index_seconds=index_seconds,
        seconds_per_query=query_seconds / max(1, len(queries)),
        # the first query embeds the query volume; the later ones are what a click then costs
        first_query_seconds=each[0] if each else math.nan,
        later_query_seconds_median=float(np.median(each[1:])) if len(each) > 1 else math.nan,
        per_landmark={label: precision_at_k([r], kmax) for label, r in relevant.items()},
    )
    for k in ks:
        report[f"precision_at_{k}"] = precision_at_k(relevant.values(), k)
    if top_errors:
        errors = np.array([e for errs in top_errors.values() for e in errs])
        finite = errors[np.isfinite(errors)]
        report["top_answer_precision"] = float(np.mean(errors <= radius_mm))
        report["top_answer_error_mm"] = {
            "median": float(np.median(errors)),
            "mean": float(finite.mean()) if len(finite) else math.nan,
        }
        report["top_answer_per_landmark"] = {label: float(np.mean(np.array(e) <= radius_mm)) for label, e in top_errors.items()}
    if out_json is not None:
        write_report(report, out_json)
    return report


# ---- pretrain --------------------------------------------------------------------------------
def _peak_memory_bytes(device: str) -> tuple[int | None, str]:
    if device.startswith("cuda") and "torch" in sys.modules:
        torch = sys.modules["torch"]
        return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    try:
        import resource

        # ru_maxrss is in KiB on Linux, bytes on macOS; it is the whole process's peak.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS (ru_maxrss)"
    except ImportError:  # pragma: no cover - Windows
        return None, "unavailable"


def run_pretrain_benchmark(
    probe: PretrainProbe | None = None,
    steps: int = 20,
    warmup: int = 3,
    out_json: str | os.PathLike | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Pretraining throughput: samples per second over ``steps`` timed steps after ``warmup``, and peak memory.

    Raises:
        InputError: no probe given (the pretraining methods supply it), or bad step counts.
    """
    if probe is None:
        raise InputError(
            "no encoder given: the pretrain benchmark needs a pretraining configuration to time "
            "(a PretrainProbe from a pretraining method); nothing to measure without one"
        )
    if steps < 1 or warmup < 0:
        raise InputError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    device = str(getattr(probe, "device", "cpu"))
    if device.startswith("cuda") and "torch" in sys.modules:
        sys.modules["torch"].cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        probe.step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        probe.step()
    _sync(device)
    elapsed = time.perf_counter() - start
    peak, how = _peak_memory_bytes(device)
    report = _header("pretrain", command)
    report.update(
        method=getattr(probe, "name", type(probe).__name__),
        device=device,
        batch_size=int(probe.batch_size),
        steps=steps,
        warmup=warmup,
        seconds=elapsed,
        samples_per_second=steps * int(probe.batch_size) / elapsed if elapsed > 0 else float("nan"),
        peak_memory_bytes=peak,
        peak_memory_source=how,
    )
    if out_json is not None:
        write_report(report, out_json)
    return report


def _sync(device: str) -> None:
    if device.startswith("cuda") and "torch" in sys.modules:
        sys.modules["torch"].cuda.synchronize()


# ---- table -----------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(report: Mapping[str, Any], per_landmark: bool = False) -> str:
    """A short Markdown table of a report (landmarks: errors in mm and timings; segmentation: Dice)."""
    task = report.get("task")
    lines: list[str] = []
    if task == "landmarks":
        lines.append(
            f"landmarks: {report.get('reference')} ({report.get('reference_contrast')}) -> "
            f"{len(report.get('targets', []))} targets ({report.get('target_contrast')})"
        )
        lines.append("")
        lines.append("| method | mean mm | median mm | p90 mm | <=2 mm | <=4 mm | s/target | prepare s |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        floor = report.get("inter_rater", {}).get("summary")
        if floor:
            lines.append(
                f"| inter-rater floor | {_fmt(floor['mean'])} | {_fmt(floor['median'])} | {_fmt(floor['p90'])} | "
                f"{_fmt(floor['within_2mm'])} | {_fmt(floor['within_4mm'])} | | |"
            )
        for name, entry in report.get("methods", {}).items():
            s = entry["summary"]
            lines.append(
                f"| {name} | {_fmt(s['mean'])} | {_fmt(s['median'])} | {_fmt(s['p90'])} | {_fmt(s['within_2mm'])} | "
                f"{_fmt(s['within_4mm'])} | {_fmt(entry['seconds_per_target'], 1)} | {_fmt(entry['prepare_seconds'], 1)} |"
            )
        if per_landmark and report.get("methods"):
            names = list(report["methods"])
            descriptions = (report.get("landmarks") or {}).get("descriptions") or []
            labels = (report.get("landmarks") or {}).get("labels") or []
            lines += ["", "| landmark | " + " | ".join(f"{n} mean mm" for n in names) + " |",
                      "| --- | " + " | ".join("---:" for _ in names) + " |"]
            for i, label in enumerate(labels):
                title = f"{label} {descriptions[i]}" if i < len(descriptions) and descriptions[i] else label
                cells = [_fmt(report["methods"][n]["per_landmark"][label]["mean"]) for n in names]
                lines.append(f"| {title} | " + " | ".join(cells) + " |")
    elif task == "segmentation":
        methods = report.get("methods", {})
        names = list(methods)
        lines.append(
            f"segmentation: {report.get('reference')} ({report.get('reference_contrast')}) -> "
            f"{len(report.get('targets', []))} targets ({report.get('target_contrast')})"
        )
        lines += ["", "| label | " + " | ".join(f"{n} Dice" for n in names) + " |",
                  "| --- | " + " | ".join("---:" for _ in names) + " |"]
        for lab, title in (report.get("labels") or {}).items():
            cells = [_fmt(_get_label(methods[n]["dice_per_label"], lab), 3) for n in names]
            lines.append(f"| {lab} {title} | " + " | ".join(cells) + " |")
        lines.append("| **mean** | " + " | ".join(_fmt(methods[n]["mean_dice"], 3) for n in names) + " |")
        lines.append("| s/target | " + " | ".join(_fmt(methods[n]["seconds_per_target"], 1) for n in names) + " |")
    elif task == "search":
        columns = [k for k in report if k.startswith("precision_at_")] + (
            ["top_answer_precision"] if "top_answer_precision" in report else []
        )
        lines += ["| method | " + " | ".join(columns) + " | s/query | s, first query | s, later queries (median) |",
                  "| --- | " + " | ".join("---:" for _ in columns) + " | ---: | ---: | ---: |",
                  f"| {report.get('method')} | "
                  + " | ".join(_fmt(report[k], 3) for k in columns)
                  + f" | {_fmt(report.get('seconds_per_query'), 3)} | {_fmt(report.get('first_query_seconds'), 2)}"
                  + f" | {_fmt(report.get('later_query_seconds_median'), 4)} |"]
    elif task == "pretrain":
        peak = report.get("peak_memory_bytes")
        lines += ["| method | device | batch | samples/s | peak memory MiB |", "| --- | --- | ---: | ---: | ---: |",
                  f"| {report.get('method')} | {report.get('device')} | {report.get('batch_size')} | "
                  f"{_fmt(report.get('samples_per_second'), 1)} | {_fmt(None if peak is None else peak / 2**20, 0)} |"]
    else:
        raise InputError(f"format_table: unknown report task {task!r}; expected one of {TASKS}")
    skipped = report.get("skipped") or {}
    for name, why in skipped.items():
        lines.append(f"\nskipped {name}: {why}")
    for name, entry in (report.get("methods") or {}).items():
        for target, why in (entry.get("failures") or {}).items():
            lines.append(f"\n{name} failed on {target}: {why}")
    return "\n".join(lines)


def _get_label(d: Mapping[Any, Any], lab: Any) -> Any:
    if lab in d:
        return d[lab]
    try:
        return d.get(int(lab), d.get(str(lab)))
    except (TypeError, ValueError):
        return d.get(str(lab))
