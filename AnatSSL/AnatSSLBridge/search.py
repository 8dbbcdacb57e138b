"""Embedding similarity search on MRML nodes: index loaded volumes, query by point, segment or whole volume.

Wraps :class:`AnatSSLLib.tools.search.EmbeddingSearch` and :class:`AnatSSLLib.index.EmbeddingIndex`.
Loaded volumes are indexed under their node name. A query is read from the scene on the main
thread (:func:`point_query`: the last point of a markups node, or world RAS mm; :func:`segment_query`:
a segment on the query volume's grid; :func:`volume_query`: the whole volume) and answered by
:func:`run_query` without touching MRML (in the tool worker process). The hits go into a ``vtkMRMLTableNode``
with columns rank, volume, R, A, S (world RAS mm; NaN for a whole-volume hit), score, node ID (the
loaded volume node of that name, if any) and path (the file the index read it from, if any);
:func:`jump_to_hit` shows a row's volume in the slice views, centred on its position.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from AnatSSLLib.errors import InputError
from AnatSSLLib.image import Image, lps_to_ras, ras_to_lps

from .landmarks import check_volume_node
from .markups import points_from_markups_node
from .scene import require_node, require_scene
from .segmentations import segmentation_to_labelmap
from .volumes import image_from_volume_node

__all__ = [
    "SearchQuery",
    "add_volume_nodes_to_index",
    "point_query",
    "segment_query",
    "volume_query",
    "run_query",
    "search_from_point",
    "search_from_segment",
    "search_from_volume",
    "hits_to_table",
    "hit_from_table_row",
    "table_row_of_view_row",
    "use_titles_as_header",
    "jump_to_hit",
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


@dataclasses.dataclass
class SearchQuery:
    """A query read from the scene (main thread); :func:`run_query` answers it without touching MRML.

    ``kind`` is ``"point"`` (``point_lps``: LPS mm), ``"segment"`` (``mask``: a label Image on the
    query volume's grid) or ``"volume"`` (the whole query volume).
    """

    kind: str
    volume_node: object
    image: Image
    point_lps: np.ndarray | None = None
    mask: Image | None = None
    description: str = ""


def point_query(volume_node, point, *, spatial_dims: int | None = None) -> SearchQuery:
    """A point query on ``volume_node``: ``point`` is a markups node (its last placed point) or world RAS mm."""
    check_volume_node(volume_node, "query volume", spatial_dims)
    if hasattr(point, "IsA"):
        require_node(point, "vtkMRMLMarkupsNode", "query point list")
        points = points_from_markups_node(point)
        if len(points) == 0:
            raise InputError(f"query point list {point.GetName()!r}: no point placed; click the query point on "
                             f"{volume_node.GetName()!r} (Place point)")
        lps, label = np.asarray(points.positions[-1], dtype=float), points.labels[-1]
    else:
        ras = np.asarray(point, dtype=float).reshape(-1)
        if ras.shape != (3,) or not np.all(np.isfinite(ras)):
            raise InputError(f"query point: expected 3 finite RAS coordinates, got {point!r}")
        lps, label = ras_to_lps(ras), "point"
    image = image_from_volume_node(volume_node)
    if not image.contains(lps[None])[0]:
        ras = lps_to_ras(lps)
        raise InputError(f"query point {label!r} at R {ras[0]:.1f}, A {ras[1]:.1f}, S {ras[2]:.1f} mm lies outside the "
                         f"query volume {volume_node.GetName()!r}; place it on that volume or choose the volume it is on")
    return SearchQuery("point", volume_node, image, point_lps=lps, description=f"point {label}")


def segment_query(scene, volume_node, segmentation_node, segment_id: str, *,
                  spatial_dims: int | None = None) -> SearchQuery:
    """A region query: segment ``segment_id`` of ``segmentation_node`` on the grid of ``volume_node``."""
    require_scene(scene)
    check_volume_node(volume_node, "query volume", spatial_dims)
    if segmentation_node is None or not segment_id:
        raise InputError("no query segment: pick a segmentation and one of its segments")
    require_node(segmentation_node, "vtkMRMLSegmentationNode", "query segmentation")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id or "")
    if segment is None:
        raise InputError(f"segmentation {segmentation_node.GetName()!r}: has no segment {segment_id!r}; pick a segment")
    labels, names = segmentation_to_labelmap(scene, segmentation_node, volume_node)
    value = next((v for v, n in names.items() if n == segment.GetName()), None)
    mask = labels.with_array((labels.array == value).astype(np.uint8), name=segment.GetName())
    if not mask.array.any():
        raise InputError(f"segment {segment.GetName()!r} is empty on volume {volume_node.GetName()!r}; paint it first")
    return SearchQuery("segment", volume_node, image_from_volume_node(volume_node), mask=mask,
                       description=f"segment {segment.GetName()}")


def volume_query(volume_node, *, spatial_dims: int | None = None) -> SearchQuery:
    """A whole-volume query: the indexed volumes most like ``volume_node`` as a whole."""
    check_volume_node(volume_node, "query volume", spatial_dims)
    return SearchQuery("volume", volume_node, image_from_volume_node(volume_node),
                       description=f"volume {volume_node.GetName()}")


def run_query(search, index, query: SearchQuery, *, k: int = 10, one_per_volume: bool = True,
              exclude_self: bool = True):
    """The :class:`~AnatSSLLib.index.SearchHit` list of ``query`` (no MRML access: safe in a worker thread).

    Point and segment queries give places (LPS positions, at most one per volume with
    ``one_per_volume``); a volume query gives volume-level hits (no position).
    """
    if index is None or not len(index):
        raise InputError("there is no index (or it is empty): build one (Index loaded volumes / Index a folder) "
                         "or open one first")
    if query.kind == "point":
        return search.search_point(index, query.image, query.point_lps, k=k, one_per_volume=one_per_volume,
                                   exclude_self=exclude_self)
    if query.kind == "segment":
        return search.search_mask(index, query.image, query.mask, k=k, one_per_volume=one_per_volume,
                                  exclude_self=exclude_self)
    if query.kind == "volume":
        return search.search_volume(index, query.image, k=k, exclude_self=exclude_self)
    raise InputError(f"query kind: expected 'point', 'segment' or 'volume', got {query.kind!r}")


def search_from_point(search, index, volume_node, point_ras: Sequence[float], *, k: int = 10,
                      one_per_volume: bool = True, exclude_self: bool = True):
    """Hits most similar to the place ``point_ras`` (world RAS mm, or a markups node) of ``volume_node``."""
    query = point_query(volume_node, point_ras, spatial_dims=search.store.encoder.spatial_dims)
    return run_query(search, index, query, k=k, one_per_volume=one_per_volume, exclude_self=exclude_self)


def search_from_segment(scene, search, index, volume_node, segmentation_node, segment_id: str, *, k: int = 10,
                        one_per_volume: bool = True, exclude_self: bool = True):
    """Hits most similar to the region of segment ``segment_id`` painted on ``volume_node``."""
    query = segment_query(scene, volume_node, segmentation_node, segment_id,
                          spatial_dims=search.store.encoder.spatial_dims)
    return run_query(search, index, query, k=k, one_per_volume=one_per_volume, exclude_self=exclude_self)


def search_from_volume(search, index, volume_node, *, k: int = 10, exclude_self: bool = True):
    """Indexed volumes ranked by similarity to the whole of ``volume_node`` (volume-level hits, no position)."""
    query = volume_query(volume_node, spatial_dims=search.store.encoder.spatial_dims)
    return run_query(search, index, query, k=k, exclude_self=exclude_self)


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
        use_titles_as_header(node)
        table.Modified()
    finally:
        node.EndModify(was_modifying)
    return node


def use_titles_as_header(table_node) -> None:
    """Show the column titles in the header, not as row 0 of the view (as SegmentStatistics does).

    With ``UseColumnTitleAsColumnHeader`` off (the node's default) ``qMRMLTableView`` shows the
    column names as the first row, so view row k is table row k - 1 (:func:`table_row_of_view_row`).
    """
    if hasattr(table_node, "SetUseColumnTitleAsColumnHeader"):
        table_node.SetUseColumnTitleAsColumnHeader(True)
    else:  # Slicer before the rename
        table_node.SetUseColumnNameAsColumnHeader(True)


def table_row_of_view_row(table_node, view_row: int) -> int:
    """The ``vtkTable`` row (0-based) shown at row ``view_row`` of a ``qMRMLTableView`` of ``table_node``.

    ``qMRMLTableModel.mrmlTableRowIndex`` does this in C++ but is not wrapped for Python; the
    view's row is the table's row unless the column titles are shown as the view's first row.
    Returns -1 for that title row.
    """
    getter = getattr(table_node, "GetUseColumnTitleAsColumnHeader", None) or table_node.GetUseColumnNameAsColumnHeader
    return int(view_row) if getter() else int(view_row) - 1


def hit_from_table_row(table_node, row: int) -> tuple[str, str, np.ndarray]:
    """``(volume name, node ID or "", RAS position (3,))`` of result ``row`` (0-based) of a results table."""
    require_node(table_node, "vtkMRMLTableNode", "results table")
    table = table_node.GetTable()
    if not 0 <= row < table.GetNumberOfRows():
        raise InputError(f"results table: no row {row} (it has {table.GetNumberOfRows()})")
    ras = np.array([table.GetValueByName(row, c).ToDouble() for c in ("R", "A", "S")])
    return (table.GetValueByName(row, "volume").ToString(), table.GetValueByName(row, "node ID").ToString(), ras)


def _volume_by_name(scene, name: str):
    nodes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if not node.IsA("vtkMRMLLabelMapVolumeNode") and node.GetName() == name:
            return node
    return None


def jump_to_hit(scene, table_node, row: int):
    """Show result ``row`` (0-based) of a results table: its volume in every slice view, centred on its position.

    The volume becomes the background layer of every slice view (``vtkMRMLSliceCompositeNode``) and
    all slice views are centred on the hit (``vtkMRMLSliceNode.JumpAllSlices``, as Slicer's markups
    "jump to point" does); a whole-volume hit (no position) is centred on the middle of its volume.

    Returns:
        ``(volume node, RAS position (3,) the views were centred on, whole-volume hit?)``.

    Raises:
        InputError: no such row, or the hit's volume is not loaded (the message names its file).
    """
    import slicer

    require_scene(scene)
    name, node_id, ras = hit_from_table_row(table_node, row)
    volume = scene.GetNodeByID(node_id) if node_id else None
    if volume is None or not volume.IsA("vtkMRMLScalarVolumeNode") or volume.GetName() != name:
        volume = _volume_by_name(scene, name)
    if volume is None:
        path = table_node.GetTable().GetValueByName(row, "path").ToString()
        raise InputError(f"result {row + 1}: volume {name!r} is not loaded; load it"
                         + (f" (file {path})" if path else "") + " to jump there")
    whole = not np.all(np.isfinite(ras))
    if whole:
        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        ras = np.array([(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2])
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(composites.GetNumberOfItems()):
        composites.GetItemAsObject(i).SetBackgroundVolumeID(volume.GetID())
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, float(ras[0]), float(ras[1]), float(ras[2]),
                                          slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    return volume, np.asarray(ras, dtype=float), whole
