"""Shared pytest set-up for AnatSSL.

- Puts ``AnatSSL/`` (the scripted module folder) on ``sys.path`` so that its Qt-free MRML bridge,
  ``AnatSSLBridge``, imports as it does inside Slicer. ``AnatSSL/AnatSSL.py`` itself imports ``qt``
  and is never imported by pytest.
- Keeps pytest away from ``Testing/Python/`` (Slicer self-tests, run inside Slicer only).
- ``scene``: a real MRML scene on the ``slicer-core`` wheel with the application logic and the
  Colors, Volumes, Markups, Segmentations and SubjectHierarchy logics registered, as in a running
  Slicer (SLICER.md section 6.1). Skips when slicer-core is missing or when ``import slicer`` finds
  the unrelated PyPI package of that name.
"""

from __future__ import annotations

import os
import sys

import pytest

_TESTING = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTING)
_MODULE_DIR = os.path.join(_ROOT, "AnatSSL")

for _path in (_ROOT, _MODULE_DIR):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# Slicer self-tests import qt and ScriptedLoadableModule: never collect them.
collect_ignore = ["Python"]
pytest_plugins = ["fixtures_data"]


def slicer_core():
    """The ``slicer`` package of the slicer-core wheel, or skip the calling test."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):  # the unrelated PyPI package "slicer"
        pytest.skip("slicer-core is not installed (`import slicer` found another package)")
    return slicer


@pytest.fixture
def scene():
    """A ``vtkMRMLScene`` with the logics a running Slicer registers; cleared after the test."""
    slicer = slicer_core()
    mrml_scene, app = slicer.vtkMRMLScene(), slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(mrml_scene)
    colors = app.GetColorLogic()
    colors.SetMRMLScene(mrml_scene)
    colors.AddDefaultColorNodes()
    app.SetModuleLogic("Colors", colors)
    logics = [app, colors]  # keep every logic alive while the scene is in use
    for name, cls in (
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Markups", slicer.vtkSlicerMarkupsLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
    ):
        logic = cls()
        logic.SetMRMLScene(mrml_scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
        logics.append(logic)
    yield mrml_scene
    mrml_scene.Clear(True)
    del logics


@pytest.fixture
def bare_scene():
    """A ``vtkMRMLScene`` with no module logic registered (what a script might hand the bridge)."""
    slicer = slicer_core()
    mrml_scene = slicer.vtkMRMLScene()
    yield mrml_scene
    mrml_scene.Clear(True)
