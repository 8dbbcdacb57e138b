"""Volume nodes <-> :class:`AnatSSLLib.image.Image` (voxels plus LPS geometry).

A Slicer volume node holds its grid as an ``IJKToRAS`` matrix (RAS mm); an :class:`Image` holds
spacing, origin and direction in LPS mm (the ITK frame). The conversion is exact:
``origin_lps = diag(-1,-1,1) @ origin_ras`` and ``direction_lps = diag(-1,-1,1) @ direction_ras``,
so a voxel ``(i, j, k)`` is at the same physical place in both.
"""

from __future__ import annotations

import numpy as np

from AnatSSLLib.errors import InputError
from AnatSSLLib.image import Image

from .scene import (
    LPS_FROM_RAS,
    matrix_to_numpy,
    numpy_to_matrix,
    parent_to_world_matrix,
    require_node,
    require_scene,
)

__all__ = ["image_from_volume_node", "volume_node_from_image", "ijk_to_ras_matrix"]


def ijk_to_ras_matrix(image: Image) -> np.ndarray:
    """``(4, 4)`` matrix mapping a voxel index ``(i, j, k, 1)`` of a 3D ``image`` to RAS mm."""
    m = image.index_to_physical_matrix
    out = np.eye(4)
    out[:3, :4] = LPS_FROM_RAS @ m[:3, :4]
    return out


def image_from_volume_node(node, world: bool = True) -> Image:
    """The voxels and geometry of a scalar (or labelmap) volume node as an :class:`Image`.

    Args:
        node: a ``vtkMRMLScalarVolumeNode`` (labelmap nodes included) holding image data.
        world: apply the node's parent transforms (linear only) so the geometry is in world space,
            which is where Slicer shows the volume. With ``False`` the node's own ``IJKToRAS`` is used.

    Returns:
        An :class:`Image` whose ``array`` is a **copy** indexed ``[k, j, i]`` (shape ``(nz, ny, nx)``)
        and whose ``spacing`` (mm), ``origin`` and ``direction`` are LPS.

    Raises:
        InputError: not a scalar volume node, no voxels, several components per voxel, or a
            non-linear / shearing parent transform.
    """
    require_node(node, "vtkMRMLScalarVolumeNode", "volume node")
    name = node.GetName() or node.GetID() or "volume"
    image_data = node.GetImageData()
    if image_data is None or image_data.GetPointData() is None or image_data.GetPointData().GetScalars() is None:
        raise InputError(f"volume {name!r}: expected a volume with voxels, got an empty node")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"volume {name!r}: expected one scalar per voxel, got {image_data.GetNumberOfScalarComponents()}"
        )
    from vtk.util import numpy_support

    dims = image_data.GetDimensions()  # (nx, ny, nz)
    array = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(tuple(reversed(dims))).copy()

    import vtk

    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    m = matrix_to_numpy(ijk_to_ras)
    if world:
        parent = parent_to_world_matrix(node, "volume")
        if parent is not None:
            m = parent @ m
    axes = m[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if not np.all(spacing > 0):
        raise InputError(f"volume {name!r}: expected a non-degenerate IJKToRAS matrix, got {m[:3, :3].tolist()}")
    direction_ras = axes / spacing
    if not np.allclose(direction_ras.T @ direction_ras, np.eye(3), atol=1e-4):
        raise InputError(
            f"volume {name!r}: its parent transform shears the grid; expected a rigid or scaling transform "
            "(harden the transform and resample the volume first)"
        )
    return Image(
        array,
        spacing=tuple(spacing),
        origin=tuple(LPS_FROM_RAS @ m[:3, 3]),
        direction=LPS_FROM_RAS @ direction_ras,
        name=name,
    )


def _vtk_ready_array(array: np.ndarray, labelmap: bool, name: str) -> np.ndarray:
    """``array`` in a dtype VTK volumes handle: bool -> uint8, 64-bit ints -> int32, labelmaps integral."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if labelmap and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise InputError(f"{name}: a labelmap must hold whole numbers, got non-integer values ({array.dtype})")
        array = array.astype(np.int64)
    if array.dtype in (np.int64, np.uint64):  # Slicer rejects "long long" volumes
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        info = np.iinfo(np.int32)
        if lo < info.min or hi > info.max:
            raise InputError(f"{name}: values {lo}..{hi} do not fit the 32-bit integers a volume can hold")
        return array.astype(np.int32)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"{name}: expected integer, float or bool voxels, got {array.dtype}")
    return array


def volume_node_from_image(scene, image: Image, name: str, labelmap: bool = False, node=None):
    """Create (or update in place) a volume node holding ``image``.

    Args:
        scene: the ``vtkMRMLScene`` the new node is added to.
        image: voxels ``[k, j, i]`` with LPS geometry; a 2D image becomes a one-slice volume.
        name: node name for a new node (made unique in the scene); ignored when ``node`` is given.
        labelmap: create a ``vtkMRMLLabelMapVolumeNode`` (integer voxels) instead of a
            ``vtkMRMLScalarVolumeNode``.
        node: an existing scalar/labelmap volume node to overwrite (voxels and geometry).

    Returns:
        The volume node; its ``IJKToRAS`` matrix is the image geometry converted to RAS and its
        voxels are a copy of ``image.array``.
    """
    require_scene(scene)
    if not isinstance(image, Image):
        raise InputError(f"image: expected an AnatSSLLib.image.Image, got {type(image).__name__}")
    if image.ndim == 2:  # one slice, unit thickness, axial
        direction = np.eye(3)
        direction[:2, :2] = image.direction
        image = Image(image.array[None], (*image.spacing, 1.0), (*image.origin, 0.0), direction, image.name)
    array = _vtk_ready_array(image.array, labelmap, image.name)
    node_class = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    if node is not None:
        require_node(node, node_class, "node")
        if not labelmap and node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError(f"node {node.GetName()!r}: is a labelmap volume; pass labelmap=True to update it")
    m = ijk_to_ras_matrix(image)

    import vtk
    from vtk.util import numpy_support

    image_data = vtk.vtkImageData()
    image_data.SetDimensions(*reversed(array.shape))
    vtk_array = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True,
                                           array_type=numpy_support.get_vtk_array_type(array.dtype))
    vtk_array.SetName("ImageScalars")
    image_data.GetPointData().SetScalars(vtk_array)

    created = node is None
    if created:
        node = scene.AddNewNodeByClass(node_class, scene.GenerateUniqueName(name or "AnatSSL volume"))
    was_modifying = node.StartModify()
    try:
        node.SetIJKToRASMatrix(numpy_to_matrix(m))  # spacing, origin and directions at once
        node.SetAndObserveImageData(image_data)
    except Exception:
        if created:
            scene.RemoveNode(node)
        raise
    finally:
        node.EndModify(was_modifying)
    if created and node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node
