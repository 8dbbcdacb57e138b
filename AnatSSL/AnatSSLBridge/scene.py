"""Small scene helpers shared by the bridge: argument checks, temporary nodes, world matrices.

Everything here takes the scene or the nodes as arguments (never ``slicer.mrmlScene``), so that it
runs unchanged on the ``slicer-core`` wheel in tests and inside the Slicer application.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

from AnatSSLLib.errors import InputError

__all__ = [
    "LPS_FROM_RAS",
    "require_scene",
    "require_node",
    "temporary_node",
    "matrix_to_numpy",
    "numpy_to_matrix",
    "parent_to_world_matrix",
]

#: ``diag(-1, -1, 1)``: maps RAS to LPS and back (it is its own inverse).
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def require_scene(scene) -> None:
    """Raise :class:`InputError` unless ``scene`` is a ``vtkMRMLScene``."""
    if scene is None or not hasattr(scene, "IsA") or not scene.IsA("vtkMRMLScene"):
        got = "None" if scene is None else type(scene).__name__
        raise InputError(f"scene: expected a vtkMRMLScene, got {got}")


def require_node(node, class_name: str, what: str) -> None:
    """Raise :class:`InputError` unless ``node`` is an instance of MRML class ``class_name``."""
    if node is None or not hasattr(node, "IsA") or not node.IsA(class_name):
        got = "None" if node is None else (node.GetClassName() if hasattr(node, "GetClassName") else type(node).__name__)
        raise InputError(f"{what}: expected a {class_name}, got {got}")


@contextlib.contextmanager
def temporary_node(scene, class_name: str, name: str = "AnatSSL_tmp") -> Iterator:
    """A node of ``class_name`` added to ``scene`` for the duration of the ``with`` block, then removed."""
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    try:
        yield node
    finally:
        if node.GetScene() is not None:
            # Remove the display and storage nodes it may have created, then the node itself.
            for get_count, get_nth in (
                ("GetNumberOfDisplayNodes", "GetNthDisplayNode"),
                ("GetNumberOfStorageNodes", "GetNthStorageNode"),
            ):
                if hasattr(node, get_count):
                    helpers = [getattr(node, get_nth)(i) for i in range(getattr(node, get_count)())]
                    for helper in helpers:
                        if helper is not None and helper.GetScene() is not None:
                            scene.RemoveNode(helper)
            scene.RemoveNode(node)


def matrix_to_numpy(matrix) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a ``(4, 4)`` float array (a copy)."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def numpy_to_matrix(array: np.ndarray):
    """A ``(4, 4)`` array as a new ``vtkMatrix4x4``."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def parent_to_world_matrix(node, what: str) -> np.ndarray | None:
    """The ``(4, 4)`` RAS matrix of the transforms above ``node``, or ``None`` when it has none.

    Raises:
        InputError: the node sits under a non-linear (e.g. grid or B-spline) transform, which an
            image grid or a rigid point frame cannot represent; harden the transform first.
    """
    parent = node.GetParentTransformNode() if hasattr(node, "GetParentTransformNode") else None
    if parent is None:
        return None
    if not parent.IsTransformToWorldLinear():
        raise InputError(
            f"{what} {node.GetName()!r}: is under the non-linear transform {parent.GetName()!r}; "
            "expected no transform or a linear one (harden the transform first)"
        )
    import vtk

    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return matrix_to_numpy(matrix)
