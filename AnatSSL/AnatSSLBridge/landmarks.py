"""One-shot landmark propagation on MRML nodes: reference points -> one markups node per target.

:class:`LandmarkPropagator` wraps :class:`AnatSSLLib.tools.landmarks.LandmarkLocator` for the
Slicer module. For each target volume node it creates (or updates in place) a fiducial node named
``"<target> landmarks"`` with the reference labels, the confidence in each control-point
description (``"confidence=0.83"``, prefixed ``"low confidence; "`` below the threshold, and the
point left unselected so Slicer draws it in the other colour), and a ``vtkMRMLTableNode``
``"<target> landmarks table"`` with columns label, R, A, S (mm), confidence, low confidence.

Everything is checked before any node is touched: no reference points, a target equal to the
reference, a label map or empty (still loading) volume, an encoder of the wrong dimensionality
raise :class:`AnatSSLLib.errors.InputError` and leave the scene as it was.

A second run reuses the embeddings (the store) and recomputes only the points whose reference
position changed, and only for targets whose voxels are unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from AnatSSLLib.errors import InputError
from AnatSSLLib.points import PointSet

from .markups import points_from_markups_node
from .scene import require_node, require_scene
from .volumes import image_from_volume_node

__all__ = [
    "LandmarkPropagator",
    "LandmarkResult",
    "check_volume_node",
    "check_landmark_inputs",
    "prepare_landmarks",
    "write_landmarks",
    "landmark_table_columns",
    "DEFAULT_LOW_CONFIDENCE",
    "ATTR_TARGET",
    "ATTR_SOURCE",
]

#: Cosine similarity below which a propagated point is flagged "low confidence".
DEFAULT_LOW_CONFIDENCE = 0.5
#: Node attributes that tie an output node to its target volume and reference markups node.
ATTR_TARGET = "AnatSSL.landmarks.target"
ATTR_SOURCE = "AnatSSL.landmarks.source"
ATTR_ROLE = "AnatSSL.landmarks.role"
LOW_TEXT = "low confidence"


def landmark_table_columns() -> list[tuple[str, str, str]]:
    """``(name, unit, description)`` of the landmark table columns, in order."""
    return [
        ("label", "", "control-point label, as on the reference"),
        ("R", "mm", "right coordinate (RAS, world)"),
        ("A", "mm", "anterior coordinate (RAS, world)"),
        ("S", "mm", "superior coordinate (RAS, world)"),
        ("confidence", "", "cosine similarity at the match (-1..1, higher is surer)"),
        ("low confidence", "", "\"yes\" when the confidence is below the threshold: check this point by eye"),
    ]


def check_volume_node(node, what: str, spatial_dims: int | None = None) -> None:
    """Raise :class:`InputError` unless ``node`` is a loaded, non-labelmap scalar volume.

    Args:
        node: the candidate volume node.
        what: how the message names it ("reference volume", "target volume").
        spatial_dims: the encoder's dimensionality; a 3D encoder needs volumes with more than one slice.
    """
    require_node(node, "vtkMRMLScalarVolumeNode", what)
    name = node.GetName()
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"{what} {name!r}: is a label map; choose an image volume (e.g. a T1 or CT scan)")
    image_data = node.GetImageData()
    if image_data is None or image_data.GetPointData() is None or image_data.GetPointData().GetScalars() is None:
        raise InputError(f"{what} {name!r}: has no voxels yet (still loading?); wait until it is shown, then retry")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise InputError(f"{what} {name!r}: has {image_data.GetNumberOfScalarComponents()} components per voxel; "
                         "expected a grey-level volume")
    dims = image_data.GetDimensions()
    if spatial_dims == 3 and min(dims) < 2:
        raise InputError(f"{what} {name!r}: is a single slice {tuple(dims)} but the encoder is 3D; "
                         "choose a 3D encoder for 2D images or a 3D volume")
    if spatial_dims == 2 and sorted(dims)[0] > 1:
        raise InputError(f"{what} {name!r}: is a 3D volume {tuple(dims)} but the encoder is 2D; "
                         "choose a 3D encoder (Advanced tab)")


@dataclasses.dataclass
class LandmarkResult:
    """What one propagation wrote for one target volume."""

    target_node: object
    markups_node: object
    table_node: object
    points: PointSet  # LPS mm, with confidence
    low_confidence: list[str]  # labels below the threshold
    recomputed: list[str]  # labels located anew in this run (the rest came from the previous run)


def check_landmark_inputs(reference_node, markups_node, target_nodes: Sequence, spatial_dims: int | None = None) -> PointSet:
    """Check every input of a propagation (see the module docstring); returns the reference points (LPS mm).

    ``spatial_dims``: the encoder's dimensionality (from its manifest: no weights are loaded here).
    """
    check_volume_node(reference_node, "reference volume", spatial_dims)
    require_node(markups_node, "vtkMRMLMarkupsNode", "reference landmarks")
    if not target_nodes:
        raise InputError("no target volumes: tick at least one volume to propagate the landmarks to")
    seen = set()
    for node in target_nodes:
        check_volume_node(node, "target volume", spatial_dims)
        if node is reference_node or node.GetID() == reference_node.GetID():
            raise InputError(f"target volume {node.GetName()!r} is the reference volume; untick it")
        if node.GetID() in seen:
            raise InputError(f"target volume {node.GetName()!r} is listed twice")
        seen.add(node.GetID())
    points = points_from_markups_node(markups_node)
    if len(points) == 0:
        raise InputError(f"reference landmarks {markups_node.GetName()!r}: no points placed; place at least one "
                         "point on the reference volume")
    duplicates = sorted({lab for lab in points.labels if points.labels.count(lab) > 1})
    if duplicates:
        raise InputError(f"reference landmarks {markups_node.GetName()!r}: labels {duplicates} are used more than "
                         "once; give every point its own label")
    return points


def prepare_landmarks(scene, reference_node, markups_node, target_nodes: Sequence, spatial_dims: int | None = None,
                      read_images: bool = True) -> dict:
    """Check the inputs and read the points (and, with ``read_images``, the volumes) on the main thread.

    Returns the plan :meth:`LandmarkPropagator.compute` and :func:`write_landmarks` take:
    ``{"reference", "points", "markups_node", "reference_node", "targets": [(node, Image or None)]}``.
    """
    require_scene(scene)
    points = check_landmark_inputs(reference_node, markups_node, target_nodes, spatial_dims)
    reference = image_from_volume_node(reference_node)
    inside = reference.contains(points.positions)
    if not np.all(inside):
        bad = [lab for lab, ok in zip(points.labels, inside) if not ok]
        raise InputError(f"reference landmarks {bad} lie outside the reference volume {reference_node.GetName()!r}; "
                         "move them onto it or choose the volume they were placed on")
    return {"reference": reference, "points": points, "markups_node": markups_node, "reference_node": reference_node,
            "targets": [(node, image_from_volume_node(node) if read_images else None) for node in target_nodes]}


def write_landmarks(scene, plan: dict, computed, low_confidence: float = DEFAULT_LOW_CONFIDENCE) -> list[LandmarkResult]:
    """Create or update the output nodes (main thread) from ``computed`` = ``[(target node, PointSet, recomputed)]``.

    Refuses (:class:`InputError`, nothing written) if an input left the scene during the run.
    """
    markups_node = plan["markups_node"]
    for node in [markups_node] + [target for target, _, _ in computed]:
        if node.GetScene() is not scene:
            raise InputError(f"{node.GetName()!r} was removed (or the scene closed) during the run; nothing was written")
    return [_write_target(scene, target_node, markups_node, result, todo, low_confidence)
            for target_node, result, todo in computed]


def _write_target(scene, target_node, markups_node, result: PointSet, recomputed: list[str],
                  low_confidence: float) -> LandmarkResult:
    low = [lab for lab, c in zip(result.labels, result.confidence) if c < low_confidence]
    texts = [LOW_TEXT if lab in low else "" for lab in result.labels]
    points = PointSet(result.labels, result.positions, texts, result.confidence)
    node = _find_output(scene, "vtkMRMLMarkupsFiducialNode", target_node, markups_node)
    node = _fill_markups(scene, node, points, f"{target_node.GetName()} landmarks")
    for index, label in enumerate(result.labels):
        node.SetNthControlPointSelected(index, label not in low)
    table = _find_output(scene, "vtkMRMLTableNode", target_node, markups_node)
    table = fill_landmark_table(scene, points, low_confidence, node=table,
                                name=f"{target_node.GetName()} landmarks table")
    for out in (node, table):
        out.SetAttribute(ATTR_TARGET, target_node.GetID())
        out.SetAttribute(ATTR_SOURCE, markups_node.GetID())
    return LandmarkResult(target_node, node, table, result, low, list(recomputed))


class LandmarkPropagator:
    """Propagates reference landmarks to target volume nodes with one encoder.

    Args:
        store: an :class:`AnatSSLLib.embedding.EmbeddingStore` (keep one per encoder for the session:
            a second run then re-embeds nothing).
        low_confidence: threshold under which a point is flagged.
        locator_kwargs: passed to :class:`~AnatSSLLib.tools.landmarks.LandmarkLocator`.
    """

    def __init__(self, store, *, low_confidence: float = DEFAULT_LOW_CONFIDENCE, **locator_kwargs) -> None:
        from AnatSSLLib.tools.landmarks import LandmarkLocator

        self.store = store
        self.low_confidence = float(low_confidence)
        self.locator = LandmarkLocator(store, **locator_kwargs)
        # (reference key, target key, label) -> (reference LPS position, found LPS position, confidence)
        self._memo: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray, float]] = {}

    @property
    def spatial_dims(self) -> int:
        return int(self.store.encoder.spatial_dims)

    # ---- checks ---------------------------------------------------------------------------------
    def check(self, reference_node, markups_node, target_nodes: Sequence) -> PointSet:
        """Check every input (see the module docstring); returns the reference points (LPS mm)."""
        return check_landmark_inputs(reference_node, markups_node, target_nodes, self.spatial_dims)

    # ---- run ------------------------------------------------------------------------------------
    def propagate(
        self,
        scene,
        reference_node,
        markups_node,
        target_nodes: Sequence,
        *,
        progress: Callable[[float], None] | None = None,
    ) -> list[LandmarkResult]:
        """Locate the reference points in every target and write the output nodes.

        Args:
            scene: the ``vtkMRMLScene``.
            reference_node: the scalar volume the points were placed on.
            markups_node: the markups node holding the reference points (world RAS).
            target_nodes: scalar volume nodes to find the points in.
            progress: called with a fraction in ``[0, 1]``.

        Returns:
            One :class:`LandmarkResult` per target, in order. Nodes are written only after every
            target has been computed, so an error leaves no half-filled node.
        """
        plan = self.prepare(scene, reference_node, markups_node, target_nodes)
        computed = self.compute(plan, progress=progress)
        return self.write(scene, plan, computed)

    def prepare(self, scene, reference_node, markups_node, target_nodes: Sequence) -> dict:
        """Check the inputs and read the volumes and points (main thread: touches MRML nodes only to read)."""
        return prepare_landmarks(scene, reference_node, markups_node, target_nodes, self.spatial_dims)

    def compute(self, plan: dict, *, progress: Callable[[float], None] | None = None,
                cancelled: Callable[[], bool] | None = None) -> list[tuple[object, PointSet, list[str]]]:
        """Locate the points in every target (no MRML access: runs in the tool worker process).

        ``cancelled`` is asked between targets; when it returns True, :class:`InputError` ("cancelled") is raised.
        """
        from AnatSSLLib.embedding import volume_key

        reference, points = plan["reference"], plan["points"]
        ref_key = volume_key(reference)
        computed = []
        for n, (target_node, target) in enumerate(plan["targets"]):
            if cancelled is not None and cancelled():
                from .jobs import TaskCancelled

                raise TaskCancelled("landmark propagation cancelled; no point list was changed")
            tgt_key = volume_key(target)
            todo = [
                label for label, pos in zip(points.labels, points.positions)
                if not self._known(ref_key, tgt_key, label, pos)
            ]
            if todo:
                subset = points.subset(todo)
                found = self.locator.locate(reference, subset, [target])[0]
                for label, ref_pos, pos, conf in zip(todo, subset.positions, found.positions, found.confidence):
                    self._memo[(ref_key, tgt_key, label)] = (np.array(ref_pos), np.array(pos), float(conf))
            rows = [self._memo[(ref_key, tgt_key, label)] for label in points.labels]
            result = PointSet(list(points.labels), np.array([r[1] for r in rows]),
                              confidence=np.array([r[2] for r in rows]))
            computed.append((target_node, result, todo))
            if progress is not None:
                progress((n + 1) / len(plan["targets"]))
        return computed

    def write(self, scene, plan: dict, computed) -> list[LandmarkResult]:
        """Create or update the output nodes (main thread). Refuses if an input left the scene meanwhile."""
        return write_landmarks(scene, plan, computed, self.low_confidence)

    def _known(self, ref_key: str, tgt_key: str, label: str, position: np.ndarray) -> bool:
        previous = self._memo.get((ref_key, tgt_key, label))
        return previous is not None and np.allclose(previous[0], position, atol=1e-6)


def _find_output(scene, class_name: str, target_node, markups_node):
    """The output node of ``class_name`` made earlier for this target and reference markups, else None."""
    nodes = scene.GetNodesByClass(class_name)
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        if (node.GetAttribute(ATTR_TARGET) == target_node.GetID()
                and node.GetAttribute(ATTR_SOURCE) == markups_node.GetID()):
            return node
    return None


def _fill_markups(scene, node, points: PointSet, name: str):
    from .markups import markups_node_from_points

    return markups_node_from_points(scene, points, name, node=node)


def fill_landmark_table(scene, points: PointSet, low_confidence: float, *, node=None, name: str = "landmarks table"):
    """A ``vtkMRMLTableNode`` (new, or refilled in place) with one row per point.

    Columns (:func:`landmark_table_columns`): label, R, A, S in world RAS mm, confidence, and
    ``low confidence`` (``"yes"`` below ``low_confidence``, else ``"no"``).
    """
    import vtk

    created = node is None
    if created:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    was_modifying = node.StartModify()
    try:
        table = node.GetTable()
        table.Initialize()
        specs = landmark_table_columns()
        columns = []
        for col_name, _, _ in specs:
            if col_name in ("label", "low confidence"):
                array = vtk.vtkStringArray()
            else:
                array = vtk.vtkDoubleArray()
            array.SetName(col_name)
            table.AddColumn(array)
            columns.append(array)
        ras = points.to_ras()
        conf = points.confidence if points.confidence is not None else np.full(len(points), np.nan)
        for i, label in enumerate(points.labels):
            columns[0].InsertNextValue(label)
            for c in range(3):
                columns[1 + c].InsertNextValue(float(ras[i, c]))
            columns[4].InsertNextValue(float(conf[i]))
            columns[5].InsertNextValue("yes" if conf[i] < low_confidence else "no")
        for col_name, unit, description in specs:
            if unit:
                node.SetColumnUnitLabel(col_name, unit)
            node.SetColumnDescription(col_name, description)
        from .search import use_titles_as_header

        use_titles_as_header(node)
        table.Modified()
    finally:
        node.EndModify(was_modifying)
    return node
