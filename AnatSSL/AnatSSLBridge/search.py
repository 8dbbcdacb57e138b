"""Embedding similarity search on MRML nodes: index loaded volumes, query by point or segment.

Wraps :class:`AnatSSLLib.tools.search.EmbeddingSearch` and :class:`AnatSSLLib.index.EmbeddingIndex`.
Loaded volumes are indexed under their node name; a query is a point (world RAS mm) or a segment of
a segmentation node on a volume node; the hits go into a ``vtkMRMLTableNode`` with columns rank,
volume, R, A, S (world RAS mm), score, node ID (the loaded volume node of that name, if any) and
path (the file the index read it from, if any).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from AnatSSLLib.errors import InputError
from AnatSSLLib.image import lps_to_ras, ras_to_lps

from .landmarks import check_volume_node
from .scene import require_node, require_scene
from .segmentations import segmentation_to_labelmap
from .volumes import image_from_volume_node

__all__ = [
    "add_volume_nodes_to_index",
    "search_from_point",
    "search_from_segment",
    "hits_to_table",
    "hit_from_table_row",
    "SEARCH_COLUMNS",
]

#: ``(name, unit)`` of the result table columns, in order.
SEARCH_COLUMNS = [("rank", ""), ("volume", ""), ("R", "mm"), ("A", "mm"), ("S", "mm"), ("score", ""),
                  ("node ID", ""), ("path", "")]


def add_volume_nodes_to_index(search, index, volume_nodes: Sequence, *, replace: bool = True,
                              progress: Callable[[float], None] | None = None) -> list[str]:
    """Embed ``volume_nodes`` and add them to ``index`` under their node names.

    Args:
        search: an :class:`~AnatSSLLib.tools.search.EmbeddingSearch` (its store is shared with the other tools).
        index: an :class:`~AnatSSLLib.index.EmbeddingIndex` built with the same encoder.
        volume_nodes: loaded scalar volume nodes (label maps are refused).
        replace: a volume already in the index under the same name is replaced (else an error).

    Returns:
        The names added.
    """
    if not volume_nodes:
        raise InputError("no volumes to index: load volumes or choose a folder")
    for node in volume_nodes:
        check_volume_node(node, "volume to index", search.store.encoder.spatial_dims)
    search.check_index(index)
    images = [image_from_volume_node(node) for node in volume_nodes]
    names = [node.GetName() for node in volume_nodes]
    if len(set(names)) != len(names):
        raise InputError(f"volumes to index: names must differ, got {names}; rename the volumes first")
    if replace:
        for name in names:
            if name in index.volume_names():
                index.remove_volume(name)
    search.add(index, images, names=names, progress=progress)
    return names


def search_from_point(search, index, volume_node, point_ras: Sequence[float], *, k: int = 10,
                      one_per_volume: bool = True, exclude_self: bool = True):
    """Hits most similar to the place ``point_ras`` (world RAS mm) of ``volume_node``."""
    check_volume_node(volume_node, "query volume", search.store.encoder.spatial_dims)
    point = np.asarray(point_ras, dtype=float).reshape(-1)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise InputError(f"query point: expected 3 finite RAS coordinates, got {point_ras!r}")
    image = image_from_volume_node(volume_node)
    return search.search_point(index, image, ras_to_lps(point), k=k, one_per_volume=one_per_volume,
                               exclude_self=exclude_self)


def search_from_segment(scene, search, index, volume_node, segmentation_node, segment_id: str, *, k: int = 10,
                        one_per_volume: bool = True, exclude_self: bool = True):
    """Hits most similar to the region of segment ``segment_id`` painted on ``volume_node``."""
    require_scene(scene)
    check_volume_node(volume_node, "query volume", search.store.encoder.spatial_dims)
    require_node(segmentation_node, "vtkMRMLSegmentationNode", "query segmentation")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id or "")
    if segment is None:
        raise InputError(f"segmentation {segmentation_node.GetName()!r}: has no segment {segment_id!r}; pick a segment")
    labels, names = segmentation_to_labelmap(scene, segmentation_node, volume_node)
    value = next((v for v, n in names.items() if n == segment.GetName()), None)
    mask = labels.with_array((labels.array == value).astype(np.uint8), name=segment.GetName())
    if not mask.array.any():
        raise InputError(f"segment {segment.GetName()!r} is empty on volume {volume_node.GetName()!r}; paint it first")
    image = image_from_volume_node(volume_node)
    return search.search_mask(index, image, mask, k=k, one_per_volume=one_per_volume, exclude_self=exclude_self)


def _node_ids_by_name(scene) -> dict[str, str]:
    out: dict[str, str] = {}
    nodes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if not node.IsA("vtkMRMLLabelMapVolumeNode"):
            out.setdefault(node.GetName(), node.GetID())
    return out


def hits_to_table(scene, hits, *, node=None, name: str = "AnatSSL search results"):
    """Write ``hits`` (:class:`~AnatSSLLib.index.SearchHit`, LPS positions) into a table node (RAS mm).

    A volume-level hit (no position) gets NaN coordinates. Returns the (new or refilled) node.
    """
    import vtk

    require_scene(scene)
    by_name = _node_ids_by_name(scene)
    created = node is None
    if created:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    was_modifying = node.StartModify()
    try:
        table = node.GetTable()
        table.Initialize()
        arrays = []
        for col_name, _ in SEARCH_COLUMNS:
            if col_name in ("volume", "node ID", "path"):
                array = vtk.vtkStringArray()
            elif col_name == "rank":
                array = vtk.vtkIntArray()
            else:
                array = vtk.vtkDoubleArray()
            array.SetName(col_name)
            table.AddColumn(array)
            arrays.append(array)
        for rank, hit in enumerate(hits, start=1):
            ras = (np.full(3, np.nan) if hit.position is None
                   else lps_to_ras(np.asarray(hit.position, dtype=float).reshape(3)))
            arrays[0].InsertNextValue(rank)
            arrays[1].InsertNextValue(str(hit.volume))
            for c in range(3):
                arrays[2 + c].InsertNextValue(float(ras[c]))
            arrays[5].InsertNextValue(float(hit.score))
            arrays[6].InsertNextValue(by_name.get(str(hit.volume), ""))
            arrays[7].InsertNextValue(str(hit.path or ""))
        for col_name, unit in SEARCH_COLUMNS:
            if unit:
                node.SetColumnUnitLabel(col_name, unit)
        node.SetColumnDescription("score", "cosine similarity of the embeddings (higher is more similar)")
        table.Modified()
    finally:
        node.EndModify(was_modifying)
    return node


def hit_from_table_row(table_node, row: int) -> tuple[str, str, np.ndarray]:
    """``(volume name, node ID or "", RAS position (3,))`` of result ``row`` (0-based) of a results table."""
    require_node(table_node, "vtkMRMLTableNode", "results table")
    table = table_node.GetTable()
    if not 0 <= row < table.GetNumberOfRows():
        raise InputError(f"results table: no row {row} (it has {table.GetNumberOfRows()})")
    ras = np.array([table.GetValueByName(row, c).ToDouble() for c in ("R", "A", "S")])
    return (table.GetValueByName(row, "volume").ToString(), table.GetValueByName(row, "node ID").ToString(), ras)
