"""AnatSSLBridge: the Qt-free MRML layer of the AnatSSL module.

Converts between Slicer nodes (RAS) and the library's types (LPS): volume nodes <->
:class:`AnatSSLLib.image.Image`, markups nodes <-> :class:`AnatSSLLib.points.PointSet`, segmentation
nodes <-> label images. Every function takes the scene or the nodes as arguments and imports no
``qt``, so it runs on the ``slicer-core`` wheel (pytest) and inside Slicer unchanged.

The tools on MRML nodes live in sub-modules imported on use (they load torch lazily):
``landmarks`` (:class:`~AnatSSLBridge.landmarks.LandmarkPropagator`), ``search`` (index loaded
volumes, point/segment/whole-volume queries, results table, jump to a result), ``segmentation``
(cross-modality transfer into a segmentation node: prepare / compute / write), ``jobs``
(:class:`~AnatSSLBridge.jobs.TaskRunner`, one tool run at a time in a thread;
:class:`~AnatSSLBridge.jobs.PretrainJob`, pretraining in a subprocess) and ``dependencies`` (what
to install inside Slicer).
"""

from __future__ import annotations

from .markups import format_description, markups_node_from_points, parse_description, points_from_markups_node
from .scene import require_node, require_scene, temporary_node
from .segmentations import (
    LABEL_TAG,
    labelmap_to_segmentation,
    register_segmentation_converter_rules,
    segment_tag,
    segmentation_to_labelmap,
)
from .volumes import ijk_to_ras_matrix, image_from_volume_node, volume_node_from_image

__all__ = [
    "LABEL_TAG",
    "format_description",
    "ijk_to_ras_matrix",
    "image_from_volume_node",
    "labelmap_to_segmentation",
    "markups_node_from_points",
    "parse_description",
    "points_from_markups_node",
    "register_segmentation_converter_rules",
    "require_node",
    "require_scene",
    "segment_tag",
    "segmentation_to_labelmap",
    "temporary_node",
    "volume_node_from_image",
]
