"""AnatSSL: the 3D Slicer module (module metadata, widget, logic).

This file is the thin Qt layer. The logic only reads the parameter node and calls the Qt-free MRML
bridge (``AnatSSLBridge``) with ``slicer.mrmlScene``; the bridge hands ``AnatSSLLib`` arrays with
their physical geometry. Heavy dependencies (torch, MONAI) are imported only when a tool runs.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_HERE = os.path.dirname(os.path.abspath(__file__))

# Developer mode ("Additional module paths" = <repo>/AnatSSL): AnatSSLLib/ and Resources/ are one
# level up instead of next to this file as in the installed extension.
if importlib.util.find_spec("AnatSSLLib") is None:
    sys.path.insert(0, os.path.dirname(_HERE))


def _resource(name: str) -> str:
    """Path of ``Resources/<name>``: installed layout first, then the repository layout."""
    for base in (_HERE, os.path.dirname(_HERE)):
        path = os.path.join(base, "Resources", name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"AnatSSL resource {name!r} not found next to {_HERE} or one level up")


def _bridge():
    """The Qt-free MRML bridge (imported on first use, so loading the module stays cheap)."""
    import AnatSSLBridge

    return AnatSSLBridge


#
# AnatSSL
#


class AnatSSL(ScriptedLoadableModule):
    """Module metadata shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "AnatSSL"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Markups", "Segmentations"]
        self.parent.contributors = ["AnatSSL developers"]
        self.parent.helpText = (
            "Anatomy-aware self-supervised image representations and the tools built on them: "
            "one-shot landmark localization, cross-modality segmentation and embedding similarity "
            "search. The panels arrive step by step; tabs marked <i>not available yet</i> do nothing."
            "<br>Methods:"
            "<ul>"
            '<li>AWCL, anatomy-aware contrastive learning (Fu et al., ECCV workshops 2022): '
            '<a href="https://arxiv.org/abs/2208.10642">arXiv:2208.10642</a></li>'
            "<li>LD, unsupervised local discrimination (Chen et al., IEEE TPAMI 2023): "
            '<a href="https://arxiv.org/abs/2108.09440">arXiv:2108.09440</a></li>'
            "<li>Alice, anatomical invariance modeling and semantic alignment (Jiang et al., ICCV 2023): "
            '<a href="https://arxiv.org/abs/2302.05615">arXiv:2302.05615</a></li>'
            "</ul>"
            'Source and documentation: <a href="https://github.com/anatssl/SlicerAnatSSL">'
            "github.com/anatssl/SlicerAnatSSL</a>."
        )
        self.parent.acknowledgementText = (
            "AnatSSL re-implements, in its own code, methods published by Fu, Jiao, Yasrab, Drukker, "
            "Papageorghiou and Noble (AWCL); Chen, Wang, Wang, Li, Fang, Li, Bai, Peng, Meng and Wang (LD); "
            "and Jiang, Sun, Guo, Bai, Yan, Lu and Xu (Alice). It builds on 3D Slicer, MONAI, PyTorch and "
            "SimpleITK."
        )
        try:  # the base class only looks next to this file (installed layout)
            self.parent.icon = qt.QIcon(_resource("Icons/AnatSSL.png"))
        except FileNotFoundError:
            pass

    def resourcePath(self, filename: str) -> str:
        return _resource(filename)

    def runTest(self, msec: int = 100, **kwargs) -> None:
        """Run ``Testing/Python/AnatSSLSelfTest.py`` (found in the repository layout)."""
        candidates = [
            os.path.join(os.path.dirname(_HERE), "Testing", "Python", "AnatSSLSelfTest.py"),
            os.path.join(_HERE, "Testing", "Python", "AnatSSLSelfTest.py"),
        ]
        path = next((p for p in candidates if os.path.exists(p)), None)
        if path is None:
            raise AssertionError(
                "AnatSSL self-test not found: it ships with the source tree (Testing/Python/AnatSSLSelfTest.py); "
                "run it from a developer checkout or through CTest"
            )
        spec = importlib.util.spec_from_file_location("AnatSSLSelfTest", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        test = module.AnatSSLSelfTest()
        test.messageDelay = msec
        test.runTest(**kwargs)


#
# Parameter node
#


@parameterNodeWrapper
class AnatSSLParameterNode:
    """State of the AnatSSL module, saved with the scene.

    inputVolume: the volume the tools work on.
    """

    inputVolume: vtkMRMLScalarVolumeNode


#
# AnatSSLWidget
#


class AnatSSLWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: an input selector and one tab per tool (filled in by later versions)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def resourcePath(self, filename: str) -> str:
        return _resource(filename)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AnatSSL.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = AnatSSLLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: AnatSSLParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)


#
# AnatSSLLogic
#


class AnatSSLLogic(ScriptedLoadableModuleLogic):
    """Node <-> library conversions on ``slicer.mrmlScene``; usable from the Python console and batch
    scripts without the widget. Each method delegates to ``AnatSSLBridge`` (see its docstrings for
    frames and shapes: images and points in the library are LPS, nodes are RAS)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self) -> AnatSSLParameterNode:
        return AnatSSLParameterNode(super().getParameterNode())

    # ---- volumes -------------------------------------------------------------------------------
    def imageFromVolume(self, volumeNode, world: bool = True):
        """The voxels (a copy) and LPS geometry of ``volumeNode`` as an ``AnatSSLLib.image.Image``."""
        return _bridge().image_from_volume_node(volumeNode, world=world)

    def volumeFromImage(self, image, name: str, labelmap: bool = False, node=None):
        """A new (or updated) scalar or labelmap volume node holding ``image``."""
        return _bridge().volume_node_from_image(slicer.mrmlScene, image, name, labelmap=labelmap, node=node)

    # ---- markups -------------------------------------------------------------------------------
    def pointsFromMarkups(self, markupsNode, world: bool = True):
        """The control points of ``markupsNode`` as an ``AnatSSLLib.points.PointSet`` (LPS mm)."""
        return _bridge().points_from_markups_node(markupsNode, world=world)

    def markupsFromPoints(self, points, name: str, node=None):
        """A new (or refilled) fiducial node holding ``points``; confidence goes into descriptions."""
        return _bridge().markups_node_from_points(slicer.mrmlScene, points, name, node=node)

    # ---- segmentations -------------------------------------------------------------------------
    def segmentationFromLabelmap(self, labelImage, referenceVolumeNode=None, names=None, colors=None, node=None,
                                 closedSurface: bool = True):
        """One segment per label of ``labelImage``; an existing ``node`` keeps its other segments."""
        return _bridge().labelmap_to_segmentation(
            slicer.mrmlScene, labelImage, referenceVolumeNode, names=names, colors=colors, node=node,
            closed_surface=closedSurface,
        )

    def labelmapFromSegmentation(self, segmentationNode, referenceVolumeNode=None):
        """``(label image, {label: segment name})`` of ``segmentationNode`` on the reference grid."""
        return _bridge().segmentation_to_labelmap(slicer.mrmlScene, segmentationNode, referenceVolumeNode)

