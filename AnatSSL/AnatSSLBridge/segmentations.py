"""Label images <-> segmentation nodes: one segment per label value, names and colours kept.

A label image is an :class:`AnatSSLLib.image.Image` of whole numbers (0 = background) with LPS
geometry. Each segment created here remembers its label value in the segment tag
:data:`LABEL_TAG`, so that :func:`segmentation_to_labelmap` gives every segment its original
value back. Existing segmentation nodes are updated in place: segments whose name matches a label
are overwritten, every other segment (for example one painted by the user) is left alone.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from AnatSSLLib.errors import InputError
from AnatSSLLib.image import Image

from .scene import require_node, require_scene, temporary_node
from .volumes import image_from_volume_node, volume_node_from_image

__all__ = [
    "LABEL_TAG",
    "register_segmentation_converter_rules",
    "labelmap_to_segmentation",
    "segmentation_to_labelmap",
    "segment_tag",
]

#: Segment tag holding the label value a segment was imported from (a decimal integer).
LABEL_TAG = "AnatSSL.LabelValue"

_RULE_CLASSES = (
    "vtkBinaryLabelmapToClosedSurfaceConversionRule",
    "vtkClosedSurfaceToBinaryLabelmapConversionRule",
    "vtkClosedSurfaceToFractionalLabelmapConversionRule",
    "vtkFractionalLabelmapToClosedSurfaceConversionRule",
)


def register_segmentation_converter_rules() -> list[str]:
    """Register the segmentation representation converters Slicer registers at start-up.

    The Segmentations module does this when the application starts; a bare ``slicer-core`` scene
    has none, and then a closed surface (3D view) cannot be made from a binary labelmap. Rules that
    are already registered are left alone, so calling this again is harmless.

    Returns:
        The names of the rules that were added (empty when all were there).
    """
    import slicer

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    present = {rule.GetName() for rule in factory.GetConverterRules()}
    added = []
    for class_name in _RULE_CLASSES:
        cls = getattr(slicer, class_name, None)
        if cls is None:
            continue
        rule = cls()
        if rule.GetName() not in present:
            factory.RegisterConverterRule(rule)
            added.append(rule.GetName())
    return added


def _label_values(image: Image) -> list[int]:
    array = image.array
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise InputError(f"{image.name}: a label image must hold whole numbers, got {array.dtype} values")
    values = np.unique(array)
    if values.size and values[0] < 0:
        raise InputError(f"{image.name}: label values must be >= 0 (0 = background), got {int(values[0])}")
    return [int(v) for v in values if v != 0]


def _check_color(label: int, color: Sequence[float]) -> tuple[float, float, float]:
    rgb = tuple(float(c) for c in color)[:3]
    if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
        raise InputError(f"colors[{label}]: expected (r, g, b) in 0..1, got {tuple(color)}")
    return rgb


def segment_tag(segment, key: str) -> str | None:
    """The value of tag ``key`` of a ``vtkSegment``, or ``None`` when it has none."""
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(key, value) else None


def _segments(segmentation) -> list[tuple[str, object]]:
    return [(segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i)) for i in range(segmentation.GetNumberOfSegments())]


def labelmap_to_segmentation(
    scene,
    label_image: Image,
    reference_volume_node=None,
    names: Mapping[int, str] | None = None,
    colors: Mapping[int, Sequence[float]] | None = None,
    node=None,
    closed_surface: bool = False,
):
    """Turn a label image into segments of a segmentation node (one segment per non-zero label).

    Args:
        scene: the ``vtkMRMLScene``.
        label_image: whole-number voxels ``[k, j, i]`` (0 = background) with LPS geometry.
        reference_volume_node: the volume whose grid the segmentation is edited and exported on;
            ``None`` uses the label image's own grid.
        names: segment name per label value; missing labels are called ``"Label <value>"``.
        colors: ``(r, g, b)`` in 0..1 per label value; missing labels get Slicer's default colours
            for label maps.
        node: an existing ``vtkMRMLSegmentationNode`` to update: segments with the same name as a
            label are overwritten (their colour is kept unless ``colors`` names it), other segments
            are kept. ``None`` creates a new node.
        closed_surface: also build the closed-surface (3D) representation.

    Returns:
        The segmentation node.
    """
    import slicer

    require_scene(scene)
    if not isinstance(label_image, Image):
        raise InputError(f"label_image: expected an AnatSSLLib.image.Image, got {type(label_image).__name__}")
    if reference_volume_node is not None:
        require_node(reference_volume_node, "vtkMRMLScalarVolumeNode", "reference_volume_node")
    if node is not None:
        require_node(node, "vtkMRMLSegmentationNode", "node")
    labels = _label_values(label_image)
    names = {int(k): str(v) for k, v in (names or {}).items()}
    colors = {int(k): _check_color(int(k), v) for k, v in (colors or {}).items()}
    final_names = [names.get(value, f"Label {value}") for value in labels]
    duplicates = sorted({n for n in final_names if final_names.count(n) > 1})
    if duplicates:
        raise InputError(f"names: each label needs its own segment name, got {duplicates} more than once")
    register_segmentation_converter_rules()
    logic = slicer.vtkSlicerSegmentationsModuleLogic

    created = node is None
    with temporary_node(scene, "vtkMRMLLabelMapVolumeNode", "AnatSSL_labels") as label_node, \
            temporary_node(scene, "vtkMRMLSegmentationNode", "AnatSSL_import") as imported:
        volume_node_from_image(scene, label_image, "", labelmap=True, node=label_node)
        label_node.CreateDefaultDisplayNodes()  # Slicer's label colours for the import
        reference = reference_volume_node if reference_volume_node is not None else label_node
        imported.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        if labels and not logic.ImportLabelmapToSegmentationNode(label_node, imported):
            raise InputError(f"{label_image.name}: Slicer could not import the label image into segments")
        source = imported.GetSegmentation()
        by_label = {}
        for segment_id, segment in _segments(source):
            by_label[int(segment.GetLabelValue())] = segment_id
        missing = [v for v in labels if v not in by_label]
        if missing:
            raise InputError(f"{label_image.name}: labels {missing} were not imported as segments")

        if created:
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                           scene.GenerateUniqueName(label_image.name or "AnatSSL segmentation"))
            node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        try:
            target = node.GetSegmentation()
            was_modifying = node.StartModify()
            try:
                for value in labels:
                    source_id = by_label[value]
                    name = names.get(value, f"Label {value}")
                    existing = target.GetSegmentIdBySegmentName(name)
                    if existing:
                        oriented = slicer.vtkOrientedImageData()
                        logic.GetSegmentBinaryLabelmapRepresentation(imported, source_id, oriented)
                        logic.SetBinaryLabelmapToSegment(oriented, node, existing, logic.MODE_REPLACE)
                        segment = target.GetSegment(existing)
                    else:
                        if not target.CopySegmentFromSegmentation(source, source_id):
                            raise InputError(f"{label_image.name}: could not copy the segment of label {value}")
                        segment = target.GetSegment(source_id)
                        segment.SetName(name)
                    segment.SetTag(LABEL_TAG, str(value))
                    if value in colors:
                        segment.SetColor(*colors[value])
            finally:
                node.EndModify(was_modifying)
        except Exception:
            if created:
                scene.RemoveNode(node)
            raise
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    if closed_surface:
        node.CreateClosedSurfaceRepresentation()
    return node


def _label_for_segments(segments: list[tuple[str, object]]) -> list[int]:
    """One distinct label value per segment: its :data:`LABEL_TAG`, else its labelmap value, else the next free."""
    chosen: list[int | None] = []
    used: set[int] = set()
    for _, segment in segments:
        value = None
        tag = segment_tag(segment, LABEL_TAG)
        if tag is not None and tag.strip().lstrip("-").isdigit() and int(tag) > 0 and int(tag) not in used:
            value = int(tag)
        chosen.append(value)
        if value is not None:
            used.add(value)
    for n, (_, segment) in enumerate(segments):
        if chosen[n] is None:
            value = int(segment.GetLabelValue())
            if value <= 0 or value in used:
                value = 1
                while value in used:
                    value += 1
            chosen[n] = value
            used.add(value)
    return [int(v) for v in chosen]


def segmentation_to_labelmap(scene, seg_node, reference_volume_node=None) -> tuple[Image, dict[int, str]]:
    """Paint every segment of ``seg_node`` into one label image on the reference grid.

    Args:
        scene: the ``vtkMRMLScene``.
        seg_node: a ``vtkMRMLSegmentationNode``.
        reference_volume_node: the volume whose grid the label image takes; ``None`` uses the
            segmentation's reference geometry.

    Returns:
        ``(label_image, names)``: whole-number voxels ``[k, j, i]`` (0 = background, where segments
        overlap the later one wins) with LPS geometry, and ``{label value: segment name}``. Segments
        made by :func:`labelmap_to_segmentation` get their original label values back.
    """
    import slicer
    import vtk

    require_scene(scene)
    require_node(seg_node, "vtkMRMLSegmentationNode", "seg_node")
    if reference_volume_node is not None:
        require_node(reference_volume_node, "vtkMRMLScalarVolumeNode", "reference_volume_node")
    segments = _segments(seg_node.GetSegmentation())
    if not segments:
        raise InputError(f"segmentation {seg_node.GetName()!r}: expected at least one segment, got none")
    values = _label_for_segments(segments)
    ids = vtk.vtkStringArray()
    for segment_id, _ in segments:
        ids.InsertNextValue(segment_id)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    with temporary_node(scene, "vtkMRMLLabelMapVolumeNode", "AnatSSL_export") as label_node:
        if reference_volume_node is not None:
            ok = logic.ExportSegmentsToLabelmapNode(seg_node, ids, label_node, reference_volume_node)
        else:
            ok = logic.ExportSegmentsToLabelmapNode(
                seg_node, ids, label_node, None, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
            )
        if not ok or label_node.GetImageData() is None:
            raise InputError(f"segmentation {seg_node.GetName()!r}: Slicer could not export its segments")
        exported = image_from_volume_node(label_node)
    # The export numbers segments 1..N in the order given; map to the chosen label values.
    lut_dtype = np.uint8 if max(values) < 256 else (np.uint16 if max(values) < 65536 else np.int32)
    lut = np.zeros(len(values) + 1, dtype=lut_dtype)
    lut[1:] = values
    if exported.array.size and (exported.array.min() < 0 or exported.array.max() > len(values)):
        raise InputError(f"segmentation {seg_node.GetName()!r}: export gave unexpected values")
    array = lut[exported.array.astype(np.intp)]
    names = {value: segment.GetName() for value, (_, segment) in zip(values, segments)}
    image = exported.with_array(array, name=seg_node.GetName() or "segmentation")
    return image, names
