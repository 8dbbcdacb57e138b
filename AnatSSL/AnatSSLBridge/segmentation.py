"""Cross-modality segmentation on MRML nodes: a reference segmentation transferred to a target volume.

The reference volume (e.g. MRI T1) and its segmentation node go in; the segmenter (an object with
``segment(reference: Image, reference_labels: Image, target: Image) -> Image`` on the target grid,
:class:`AnatSSLLib.tools.segmentation.CrossModalitySegmenter` in the module) computes a label image
on the target volume (e.g. T2 or CT); its labels are written into the output segmentation node:

- a segment whose name already exists in the output node is replaced in place (its name, colour
  and any other segment are kept: the user's manual segments are never deleted);
- a new segment takes the name and colour of the reference segment.

With a Segment Editor logic (``vtkSlicerSegmentEditorLogic``, or the effect's ``saveStateForUndo``)
one undo state is saved *before* anything is modified, so one Undo reverts the whole transfer.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from AnatSSLLib.errors import InputError

from .landmarks import check_volume_node
from .scene import require_node, require_scene
from .segmentations import labelmap_to_segmentation, segmentation_to_labelmap
from .volumes import image_from_volume_node

__all__ = ["transfer_segmentation", "reference_segments"]


def reference_segments(segmentation_node, segment_ids: Sequence[str] | None = None) -> list[tuple[str, str, tuple]]:
    """``(segment id, name, (r, g, b))`` of the chosen (default: all) segments of ``segmentation_node``."""
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
):
    """Transfer segments of ``reference_segmentation_node`` to ``target_volume_node``.

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
    require_scene(scene)
    check_volume_node(reference_volume_node, "reference volume", spatial_dims)
    check_volume_node(target_volume_node, "target volume", spatial_dims)
    if reference_volume_node.GetID() == target_volume_node.GetID():
        raise InputError(f"the reference volume {reference_volume_node.GetName()!r} is also the target: "
                         "choose the volume the reference segmentation was drawn on as reference")
    if output_segmentation_node is not None:
        require_node(output_segmentation_node, "vtkMRMLSegmentationNode", "output segmentation")
        if output_segmentation_node.GetID() == reference_segmentation_node.GetID():
            raise InputError("the output segmentation is the reference segmentation: choose or create another one")
    chosen = reference_segments(reference_segmentation_node, segment_ids)
    labels, names = segmentation_to_labelmap(scene, reference_segmentation_node, reference_volume_node)
    value_of = {name: value for value, name in names.items()}
    keep = [value_of[name] for _, name, _ in chosen]
    labels = labels.with_array(np.where(np.isin(labels.array, keep), labels.array, 0).astype(labels.array.dtype))
    empty = [name for _, name, _ in chosen if not np.any(labels.array == value_of[name])]
    if empty:
        raise InputError(f"reference segments {empty} are empty on the reference volume "
                         f"{reference_volume_node.GetName()!r}; paint them first or leave them out")

    reference = image_from_volume_node(reference_volume_node)
    target = image_from_volume_node(target_volume_node)
    result = segmenter.segment(reference, labels, target)
    if tuple(result.array.shape) != tuple(target.array.shape):
        raise InputError(f"the segmenter returned a label image of shape {result.array.shape}, "
                         f"expected the target grid {target.array.shape}")
    counts = {name: int(np.count_nonzero(result.array == value_of[name])) for _, name, _ in chosen}
    if not any(counts.values()):
        raise InputError(f"none of the segments {list(counts)} was found in {target_volume_node.GetName()!r}; "
                         "check that both volumes show the same anatomy")
    result = result.with_array(np.where(np.isin(result.array, keep), result.array, 0).astype(np.int32),
                               name=f"{target_volume_node.GetName()} segmentation")

    existing = set()
    if output_segmentation_node is not None:
        segmentation = output_segmentation_node.GetSegmentation()
        existing = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
    out_names = {value_of[name]: name for _, name, _ in chosen}
    colors = {value_of[name]: color for _, name, color in chosen if name not in existing}
    if save_undo_state is not None:
        save_undo_state()
    node = labelmap_to_segmentation(scene, result, target_volume_node, names=out_names, colors=colors,
                                    node=output_segmentation_node, closed_surface=closed_surface)
    return node, counts
