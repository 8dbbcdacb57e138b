"""Markups fiducial nodes <-> :class:`AnatSSLLib.points.PointSet`.

The node holds RAS millimetres (its ``.mrk.json`` file holds LPS); a :class:`PointSet` holds LPS.
A point's confidence travels in its control-point description as ``confidence=<number>``
(after any free text, separated by ``"; "``), which Slicer shows and saves with the point.
"""

from __future__ import annotations

import math
import re

import numpy as np

from AnatSSLLib.errors import InputError
from AnatSSLLib.image import lps_to_ras, ras_to_lps
from AnatSSLLib.points import PointSet

from .scene import require_node, require_scene

__all__ = [
    "points_from_markups_node",
    "markups_node_from_points",
    "format_description",
    "parse_description",
]

_CONFIDENCE = re.compile(r"(?:^|;\s*)confidence\s*=\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)\s*(?=;|$)",
                         re.IGNORECASE)


def parse_description(description: str) -> tuple[str, float | None]:
    """Split a control-point description into ``(free text, confidence or None)``.

    ``"left eye; confidence=0.87"`` gives ``("left eye", 0.87)``; ``"confidence=0.5"`` gives ``("", 0.5)``.
    """
    description = description or ""
    match = _CONFIDENCE.search(description)
    if match is None:
        return description, None
    text = (description[: match.start()] + description[match.end():]).strip()
    text = text.strip(";").strip()
    return text, float(match.group(1))


def format_description(text: str | None, confidence: float | None) -> str:
    """The control-point description for free ``text`` and a ``confidence`` (omitted when None/NaN)."""
    text = (text or "").strip()
    if confidence is None or (isinstance(confidence, float) and math.isnan(confidence)):
        return text
    token = f"confidence={float(confidence)!r}"
    return f"{text}; {token}" if text else token


def points_from_markups_node(node, world: bool = True) -> PointSet:
    """The control points of a markups node as a :class:`PointSet` (LPS mm).

    Args:
        node: a ``vtkMRMLMarkupsNode`` (fiducial, curve, ...).
        world: positions after the node's parent transforms (where Slicer shows them); ``False``
            gives the node's local coordinates.

    Returns:
        Labels and descriptions (free text, the confidence token removed) of every point whose
        position is defined (points still being placed are skipped); ``confidence`` is ``None``
        when no point has one, else one value per point with NaN where a point has none.
    """
    require_node(node, "vtkMRMLMarkupsNode", "markups node")
    undefined = getattr(node, "PositionUndefined", 0)
    labels, positions, descriptions, confidence = [], [], [], []
    position = np.zeros(3)
    for index in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(index) == undefined:
            continue
        if world:
            node.GetNthControlPointPositionWorld(index, position)
        else:
            node.GetNthControlPointPosition(index, position)
        text, value = parse_description(node.GetNthControlPointDescription(index))
        labels.append(node.GetNthControlPointLabel(index))
        positions.append(ras_to_lps(position))
        descriptions.append(text)
        confidence.append(np.nan if value is None else value)
    has_confidence = any(not math.isnan(c) for c in confidence)
    return PointSet(
        labels=labels,
        positions=np.reshape(np.asarray(positions, dtype=float), (-1, 3)),
        descriptions=descriptions,
        confidence=np.asarray(confidence, dtype=float) if has_confidence else None,
    )


def markups_node_from_points(scene, points: PointSet, name: str, node=None):
    """Create (or refill in place) a fiducial markups node holding ``points``.

    Args:
        scene: the ``vtkMRMLScene`` the new node is added to.
        points: labels, LPS positions (mm), optional descriptions and confidence.
        name: node name for a new node (made unique in the scene); ignored when ``node`` is given.
        node: an existing ``vtkMRMLMarkupsFiducialNode`` whose control points are replaced.

    Returns:
        The node: world RAS positions (a parent transform of ``node`` is taken into account), the
        labels, and descriptions ``"<text>; confidence=<value>"``. Everything is checked before the
        node is touched, so a bad input leaves an existing node as it was and creates no node.
    """
    import slicer

    require_scene(scene)
    if not isinstance(points, PointSet):
        raise InputError(f"points: expected an AnatSSLLib.points.PointSet, got {type(points).__name__}")
    if node is not None:
        require_node(node, "vtkMRMLMarkupsFiducialNode", "node")
        if node.GetScene() is not scene and node.GetScene() is not None:
            raise InputError(f"node {node.GetName()!r}: belongs to another scene")
    ras = lps_to_ras(points.positions)
    texts = points.descriptions if points.descriptions is not None else [""] * len(points)
    scores = points.confidence if points.confidence is not None else [None] * len(points)
    rows = [
        (str(label), [float(x) for x in ras[i]], format_description(texts[i], None if scores[i] is None else float(scores[i])))
        for i, label in enumerate(points.labels)
    ]

    created = node is None
    if created:
        node = slicer.vtkMRMLMarkupsFiducialNode()
        node.SetName(scene.GenerateUniqueName(name or "AnatSSL points"))
    was_modifying = node.StartModify()
    try:
        node.RemoveAllControlPoints()
        for label, position, description in rows:
            index = node.AddControlPoint(position, label)
            node.SetNthControlPointPositionWorld(index, position)  # same as local without a transform
            node.SetNthControlPointDescription(index, description)
    finally:
        node.EndModify(was_modifying)
    if created:
        node = scene.AddNode(node)
        node.CreateDefaultDisplayNodes()
    return node
