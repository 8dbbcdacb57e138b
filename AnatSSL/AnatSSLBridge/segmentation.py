"""Cross-modality segmentation on MRML nodes: a reference segmentation transferred to a target volume.

The reference volume (e.g. MRI T1) and its segmentation node go in; the segmenter (an object with
``segment(reference: Image, reference_labels: Image, target: Image) -> Image`` on the target grid,
:class:`AnatSSLLib.tools.segmentation.CrossModalitySegmenter` in the module) computes a label image
on the target volume (e.g. T2 or CT); its labels are written into the output segmentation node:

- a segment whose name already exists in the output node is replaced in place (its name, colour
  and any other segment are kept: the user's manual segments are never deleted);
- a new segment takes the name and colour of the reference segment.

The run has three steps, so that the long one stays off the GUI thread:

1. :func:`prepare_transfer` (main thread): every check, then the volumes and the reference labels
   are read into :class:`~AnatSSLLib.image.Image` copies. Bad input raises here and nothing is changed.
2. :func:`compute_transfer` (the tool worker process, or any thread: no MRML access): embeddings and the label image, with
   progress and cancel checks between the stages.
3. :func:`write_transfer` (main thread): refuses if a node it needs left the scene (or the scene
   was closed, or the Segment Editor switched to another segmentation) during the run; otherwise
   one undo state is saved (``vtkSlicerSegmentEditorLogic.SaveStateForUndo`` or the effect's
   ``saveStateForUndo``) right before the first change, so one Undo reverts the whole transfer.

:func:`transfer_segmentation` does the three in a row (batch use).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from AnatSSLLib.errors import InputError
from AnatSSLLib.image import Image

from .landmarks import check_volume_node
from .scene import require_node, require_scene
from .segmentations import labelmap_to_segmentation, segmentation_to_labelmap
from .volumes import image_from_volume_node

__all__ = [
    "TransferPlan",
    "TransferResult",
    "prepare_transfer",
    "compute_transfer",
    "check_writable",
    "write_transfer",
    "transfer_segmentation",
    "reference_segments",
]

#: ``write_transfer(editor_segmentation_node=...)`` default: do not compare with the Segment Editor.
_NOT_CHECKED = object()


@dataclasses.dataclass
class TransferPlan:
    """The checked inputs of one transfer: the nodes (main thread only) and copies of their data."""

    scene: object
    reference_volume_node: object
    reference_segmentation_node: object
    target_volume_node: object
    output_segmentation_node: object | None
    reference: Image  # reference voxels, LPS geometry
    labels: Image  # chosen reference segments as labels on the reference grid
    target: Image  # target voxels, LPS geometry
    segments: list[tuple[str, str, tuple]]  # (reference segment id, name, (r, g, b)) transferred
    value_of: dict[str, int]  # segment name -> label value in ``labels``
    target_name: str = ""  # the target node's name, read here so that the computation reads no node


@dataclasses.dataclass
class TransferResult:
    """What :func:`compute_transfer` found: the label image on the target grid and voxels per segment."""

    labels: Image
    counts: dict[str, int]


def reference_segments(segmentation_node, segment_ids: Sequence[str] | None = None) -> list[tuple[str, str, tuple]]:
    """``(segment id, name, (r, g, b))`` of the chosen (default: all) segments of ``segmentation_node``."""
    if segmentation_node is not None and hasattr(segmentation_node, "IsA") and segmentation_node.IsA(
            "vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"reference segmentation {segmentation_node.GetName()!r}: is a label map volume, not a "
                         "segmentation; convert it first (Data module: right-click it > Convert labelmap to segmentation)")
    require_node(segmentation_node, "vtkMRMLSegmentationNode", "reference segmentation")
    segmentation = segmentation_node.GetSegmentation()
    ids = list(segment_ids) if segment_ids else [segmentation.GetNthSegmentID(i)
                                                 for i in range(segmentation.GetNumberOfSegments())]
    out = []
    for segment_id in ids:
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            raise InputError(f"reference segmentation {segmentation_node.GetName()!r}: has no segment {segment_id!r}")
        out.append((segment_id, segment.GetName(), tuple(float(c) for c in segment.GetColor())))
    if not out:
        raise InputError(f"reference segmentation {segmentation_node.GetName()!r}: has no segments; "
                         "segment the reference volume first")
    return out


def prepare_transfer(
    scene,
    reference_volume_node,
    reference_segmentation_node,
    target_volume_node,
    output_segmentation_node=None,
    *,
    segment_ids: Sequence[str] | None = None,
    spatial_dims: int | None = 3,
) -> TransferPlan:
    """Check the inputs and read them (main thread). Raises :class:`InputError` and changes nothing on bad input.

    Args:
        scene: the ``vtkMRMLScene``.
        reference_volume_node, target_volume_node: scalar (not label map) volume nodes, not the same node.
        reference_segmentation_node: segments drawn on the reference volume.
        output_segmentation_node: the segmentation to fill (``None``: a new one named "<target> segmentation").
        segment_ids: which reference segments to transfer (default all).
        spatial_dims: the encoder's dimensionality (checked against the volumes).
    """
    require_scene(scene)
    check_volume_node(reference_volume_node, "reference volume", spatial_dims)
    check_volume_node(target_volume_node, "target volume", spatial_dims)
    if reference_volume_node.GetID() == target_volume_node.GetID():
        raise InputError(f"the reference volume {reference_volume_node.GetName()!r} is also the target (the Segment "
                         "Editor's source volume): choose as reference the other volume, the one the reference "
                         "segmentation was drawn on")
    chosen = reference_segments(reference_segmentation_node, segment_ids)
    if output_segmentation_node is not None:
        require_node(output_segmentation_node, "vtkMRMLSegmentationNode", "output segmentation")
        if output_segmentation_node.GetID() == reference_segmentation_node.GetID():
            raise InputError("the output segmentation is the reference segmentation: choose or create another one")
    labels, names = segmentation_to_labelmap(scene, reference_segmentation_node, reference_volume_node)
    value_of = {name: value for value, name in names.items()}
    keep = [value_of[name] for _, name, _ in chosen]
    labels = labels.with_array(np.where(np.isin(labels.array, keep), labels.array, 0).astype(labels.array.dtype))
    empty = [name for _, name, _ in chosen if not np.any(labels.array == value_of[name])]
    if empty:
        raise InputError(f"reference segments {empty} are empty on the reference volume "
                         f"{reference_volume_node.GetName()!r}; paint them first or leave them out")
    return TransferPlan(
        scene=scene, reference_volume_node=reference_volume_node,
        reference_segmentation_node=reference_segmentation_node, target_volume_node=target_volume_node,
        output_segmentation_node=output_segmentation_node, reference=image_from_volume_node(reference_volume_node),
        labels=labels, target=image_from_volume_node(target_volume_node), segments=chosen,
        value_of={name: value_of[name] for _, name, _ in chosen}, target_name=target_volume_node.GetName() or "")


def compute_transfer(segmenter, plan: TransferPlan, *, progress: Callable[[float], None] | None = None,
                     cancelled: Callable[[], bool] | None = None) -> TransferResult:
    """Run the segmenter on the plan's images (no MRML access: safe in a worker thread).

    With a segmenter that has an embedding ``store``, both volumes are embedded first (progress
    0.4 and 0.7), so a cancel between the stages stops early. ``cancelled() -> True`` raises
    :class:`~AnatSSLBridge.jobs.TaskCancelled`.

    Raises:
        InputError: the segmenter returned a label image of the wrong shape, or found none of the segments.
    """
    from .jobs import TaskCancelled

    def check_cancel():
        if cancelled is not None and cancelled():
            raise TaskCancelled("cross-modality segmentation cancelled; the segmentation was not changed")

    def report(fraction: float):
        if progress is not None:
            progress(fraction)

    store = getattr(segmenter, "store", None)
    if store is not None and hasattr(store, "get"):
        for fraction, image in ((0.4, plan.reference), (0.7, plan.target)):
            check_cancel()
            store.get(image)
            report(fraction)
    check_cancel()
    result = segmenter.segment(plan.reference, plan.labels, plan.target)
    check_cancel()
    if tuple(result.array.shape) != tuple(plan.target.array.shape):
        raise InputError(f"the segmenter returned a label image of shape {result.array.shape}, "
                         f"expected the target grid {plan.target.array.shape}")
    counts = {name: int(np.count_nonzero(result.array == value)) for name, value in plan.value_of.items()}
    if not any(counts.values()):
        raise InputError(f"none of the segments {list(counts)} was found in {plan.target.name!r}; "
                         "check that both volumes show the same anatomy")
    keep = list(plan.value_of.values())
    target_name = plan.target_name or plan.target.name  # never a node: this runs in the worker process
    labels = result.with_array(np.where(np.isin(result.array, keep), result.array, 0).astype(np.int32),
                               name=f"{target_name} segmentation")
    report(1.0)
    return TransferResult(labels, counts)


def check_writable(plan: TransferPlan, editor_segmentation_node=_NOT_CHECKED) -> None:
    """Raise :class:`InputError` if the result can no longer be written where it was meant to go.

    Args:
        plan: from :func:`prepare_transfer`.
        editor_segmentation_node: the segmentation the Segment Editor edits now (its undo state is
            the one saved); it must still be the plan's output node. Leave out to skip this check.
    """
    scene = plan.scene
    for node, what in ((plan.target_volume_node, "target volume"), (plan.output_segmentation_node, "segmentation")):
        if node is not None and node.GetScene() is not scene:
            raise InputError(f"the {what} {node.GetName()!r} was removed (or the scene was closed) during the run; "
                             "nothing was written")
    if editor_segmentation_node is not _NOT_CHECKED and plan.output_segmentation_node is not None:
        if editor_segmentation_node is None or editor_segmentation_node.GetID() != plan.output_segmentation_node.GetID():
            raise InputError(f"the Segment Editor switched to another segmentation during the run; nothing was "
                             f"written: select {plan.output_segmentation_node.GetName()!r} again and press Apply")


def write_transfer(plan: TransferPlan, result: TransferResult, *, save_undo_state: Callable[[], None] | None = None,
                   closed_surface: bool = False, editor_segmentation_node=_NOT_CHECKED):
    """Write the computed labels into the output segmentation (main thread).

    Returns:
        ``(output segmentation node, {segment name: voxel count on the target})``.

    Raises:
        InputError: see :func:`check_writable`; nothing is changed and no undo state is saved.
    """
    check_writable(plan, editor_segmentation_node)
    output = plan.output_segmentation_node
    existing = set()
    if output is not None:
        segmentation = output.GetSegmentation()
        existing = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
    out_names = {value: name for name, value in plan.value_of.items()}
    colors = {plan.value_of[name]: color for _, name, color in plan.segments if name not in existing}
    if save_undo_state is not None:
        save_undo_state()
    node = labelmap_to_segmentation(plan.scene, result.labels, plan.target_volume_node, names=out_names,
                                    colors=colors, node=output, closed_surface=closed_surface)
    return node, dict(result.counts)


def transfer_segmentation(
    scene,
    segmenter,
    reference_volume_node,
    reference_segmentation_node,
    target_volume_node,
    output_segmentation_node=None,
    *,
    segment_ids: Sequence[str] | None = None,
    save_undo_state: Callable[[], None] | None = None,
    spatial_dims: int | None = 3,
    closed_surface: bool = False,
    progress: Callable[[float], None] | None = None,
):
    """Transfer segments of ``reference_segmentation_node`` to ``target_volume_node`` (blocking).

    Args:
        scene: the ``vtkMRMLScene``.
        segmenter: ``segment(reference, reference_labels, target) -> label Image`` on the target grid.
        reference_volume_node, target_volume_node: scalar (not label map) volume nodes, not the same node.
        reference_segmentation_node: segments drawn on the reference volume.
        output_segmentation_node: the segmentation to fill (``None``: a new one named "<target> segmentation").
        segment_ids: which reference segments to transfer (default all).
        save_undo_state: called once, after every check and the computation, right before the first change.
        spatial_dims: the encoder's dimensionality (checked against the volumes).

    Returns:
        ``(output segmentation node, {segment name: voxel count on the target})``.

    Raises:
        InputError: bad input (nothing is modified), or the segmenter found none of the segments.
    """
    plan = prepare_transfer(scene, reference_volume_node, reference_segmentation_node, target_volume_node,
                            output_segmentation_node, segment_ids=segment_ids, spatial_dims=spatial_dims)
    result = compute_transfer(segmenter, plan, progress=progress)
    return write_transfer(plan, result, save_undo_state=save_undo_state, closed_surface=closed_surface)
