"""AnatSSL: the 3D Slicer module (module metadata, widget, logic).

This file is the thin Qt layer. The logic only reads the parameter node and calls the Qt-free MRML
bridge (``AnatSSLBridge``) with ``slicer.mrmlScene``; the bridge hands ``AnatSSLLib`` arrays with
their physical geometry. Heavy dependencies (torch, MONAI) are imported only when a tool runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import traceback
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
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


class AnatSSLError(Exception):
    """Stand-in until the library is importable (replaced below by ``AnatSSLLib.errors.AnatSSLError``)."""


try:  # the library's error base class: a user error gets a plain message, not a traceback
    from AnatSSLLib.errors import AnatSSLError  # noqa: F811
except ImportError:  # pragma: no cover - the library is missing: the module still loads
    pass


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
            "search, with a tab to pretrain your own encoder in the background."
            "<ul>"
            "<li><b>Landmarks</b>: place points on a reference volume, tick target volumes, press Propagate.</li>"
            "<li><b>Segmentation</b>: in the Segment Editor, effect <i>AnatSSL cross-modality</i>.</li>"
            "<li><b>Search</b>: index volumes, then search for a point or a segment.</li>"
            "<li><b>Advanced</b>: pretrain an encoder, encoder cache folder, Python packages.</li>"
            "</ul>"
            "Methods:"
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
    """State of the AnatSSL module, saved with the scene (restores the panels).

    referenceVolume, referenceLandmarks: the reference volume and the points clicked on it.
    targetVolumes: the volumes to find the landmarks in (kept in sync with the checkable list).
    lowConfidence: points below this confidence (cosine similarity) are flagged.
    matchContrast: the targets have another contrast than the reference (the landmark tool maps
        each target into the reference's contrast before matching).
    encoderId: the encoder the tools use ("" = the default one).
    searchVolume, searchPoints, searchSegmentation, searchSegmentId: the search query;
    searchQueryKind: what is searched for ("point", "segment" or "volume": the whole volume).
    numberOfResults: how many search results to list.
    pretrainSteps, pretrainBatchSize, pretrainName, pretrainFolder: pretraining settings.
    """

    referenceVolume: vtkMRMLScalarVolumeNode
    referenceLandmarks: vtkMRMLMarkupsFiducialNode
    targetVolumes: list[vtkMRMLScalarVolumeNode]
    lowConfidence: Annotated[float, WithinRange(-1.0, 1.0)] = 0.5
    matchContrast: bool = False
    encoderId: str = ""
    searchVolume: vtkMRMLScalarVolumeNode
    searchPoints: vtkMRMLMarkupsFiducialNode
    searchSegmentation: vtkMRMLSegmentationNode
    searchSegmentId: str = ""
    searchQueryKind: str = "point"
    numberOfResults: Annotated[int, WithinRange(1, 100)] = 10
    pretrainSteps: Annotated[int, WithinRange(1, 1000000)] = 1200
    pretrainBatchSize: Annotated[int, WithinRange(1, 64)] = 2
    pretrainName: str = ""
    pretrainFolder: str = ""


#
# Settings (per user, not per scene)
#

SETTINGS_CACHE = "AnatSSL/EncoderCacheFolder"
SETTINGS_DEVICE = "AnatSSL/Device"
DEVICES = [("Auto (GPU if available)", "auto"), ("CPU", "cpu"), ("GPU (CUDA)", "cuda")]


def cacheFolderSetting() -> str:
    """The encoder cache folder chosen in the module ("" = the library default)."""
    return str(qt.QSettings().value(SETTINGS_CACHE, "") or "")


def deviceSetting() -> str:
    value = str(qt.QSettings().value(SETTINGS_DEVICE, "auto") or "auto")
    return value if value in {d for _, d in DEVICES} else "auto"


#
# Background tasks: AnatSSLBridge.jobs.TaskRunner (one thread at a time, polled by a QTimer; the MRML
# scene is read before and written after, on the main thread only).
#


#
# AnatSSLWidget
#


class AnatSSLWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: encoder and device, then one tab per tool, and a shared progress/status row."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._runner = None  # AnatSSLBridge.jobs.TaskRunner, made in setup()
        self._job = None
        self._timer = None
        self._updatingGUI = False

    def resourcePath(self, filename: str) -> str:
        return _resource(filename)

    # ---- set-up -------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AnatSSL.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AnatSSLLogic()
        self._runner = _bridge_module("jobs").TaskRunner()

        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onTimer)

        for label, value in DEVICES:
            self.ui.deviceSelector.addItem(label, value)
        self.ui.deviceSelector.setCurrentIndex(max(0, [d for _, d in DEVICES].index(deviceSetting())))
        self.ui.methodSelector.addItem("LD (local discrimination, 3D)", "ld")
        self.ui.cacheFolderPathLineEdit.currentPath = cacheFolderSetting() or self.logic.defaultCacheFolder()
        self.ui.targetVolumesSelector.setMRMLScene(slicer.mrmlScene)
        self.ui.landmarksPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.ui.searchPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup

        # connections (state fields bound through SlicerParameterName are connected by connectGui)
        self.ui.encoderSelector.connect("currentIndexChanged(int)", self.onEncoderChanged)
        self.ui.importEncoderButton.connect("clicked(bool)", self.onImportEncoder)
        self.ui.deviceSelector.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.referenceLandmarksSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onReferenceLandmarksChanged)
        self.ui.targetVolumesSelector.connect("checkedNodesChanged()", self.onTargetVolumesChanged)
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagate)
        self.ui.openSegmentEditorButton.connect("clicked(bool)", self.onOpenSegmentEditor)
        self.ui.indexLoadedVolumesButton.connect("clicked(bool)", self.onIndexLoadedVolumes)
        self.ui.indexFolderButton.connect("clicked(bool)", self.onIndexFolder)
        self.ui.openIndexButton.connect("clicked(bool)", self.onOpenIndex)
        self.ui.saveIndexButton.connect("clicked(bool)", self.onSaveIndex)
        self.ui.searchVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSearchVolumeChanged)
        self.ui.searchPointsSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSearchPointsChanged)
        self.ui.searchSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSearchSegmentChanged)
        self.ui.searchSegmentSelector.connect("currentSegmentChanged(QString)", self.onSearchSegmentChanged)
        self.ui.queryPointRadioButton.connect("toggled(bool)", self.onQueryKindChanged)
        self.ui.querySegmentRadioButton.connect("toggled(bool)", self.onQueryKindChanged)
        self.ui.queryVolumeRadioButton.connect("toggled(bool)", self.onQueryKindChanged)
        self.ui.searchButton.connect("clicked(bool)", self.onSearch)
        self.ui.searchResultsTableView.connect("clicked(QModelIndex)", self.onSearchResultClicked)
        self.ui.pretrainLoadedRadioButton.connect("toggled(bool)", self.updateGUIFromState)
        self.ui.pretrainFolderRadioButton.connect("toggled(bool)", self.updateGUIFromState)
        self.ui.pretrainFolderPathLineEdit.connect("currentPathChanged(QString)", self.onPretrainFolderChanged)
        self.ui.pretrainButton.connect("clicked(bool)", self.onPretrain)
        self.ui.cacheFolderPathLineEdit.connect("currentPathChanged(QString)", self.onCacheFolderChanged)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.refreshEncoders()
        self.updateGUIFromState()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._job is not None and self._job.running:
            self._job.kill()
        if self._runner is not None:
            self._runner.cancel("the AnatSSL module was closed")
        if self._timer is not None:
            self._timer.stop()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromState)

    def onSceneStartClose(self, caller, event) -> None:
        if self._runner is not None and self._runner.cancel("the scene was closed"):
            self.setStatus("The scene is closing: the running task is cancelled and its result will not be written.")
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.referenceVolume:
            volume = self.logic.firstImageVolume()
            if volume:
                self._parameterNode.referenceVolume = volume

    def setParameterNode(self, inputParameterNode: AnatSSLParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromState)
            self._restoreUnboundWidgets()
        self.updateGUIFromState()

    def _restoreUnboundWidgets(self) -> None:
        """Widgets without a parameter-node binding (checkable list, segment selector, path) from the state."""
        p = self._parameterNode
        self._updatingGUI = True
        try:
            wanted = {node.GetID() for node in p.targetVolumes if node}
            for index in range(self.ui.targetVolumesSelector.nodeCount()):
                node = self.ui.targetVolumesSelector.nodeFromIndex(index)
                state = qt.Qt.Checked if node.GetID() in wanted else qt.Qt.Unchecked
                self.ui.targetVolumesSelector.setCheckState(node, state)
            self.ui.landmarksPlaceWidget.setCurrentNode(p.referenceLandmarks)
            self.ui.searchPlaceWidget.setCurrentNode(p.searchPoints)
            self.ui.searchSegmentSelector.setCurrentNode(p.searchSegmentation)
            if p.searchSegmentId:
                self.ui.searchSegmentSelector.setCurrentSegmentID(p.searchSegmentId)
            kinds = {"segment": self.ui.querySegmentRadioButton, "volume": self.ui.queryVolumeRadioButton}
            kinds.get(p.searchQueryKind, self.ui.queryPointRadioButton).checked = True
            self.ui.pretrainFolderPathLineEdit.currentPath = p.pretrainFolder
        finally:
            self._updatingGUI = False

    # ---- state -> GUI ---------------------------------------------------------------------------
    def updateGUIFromState(self, *args) -> None:
        p = self._parameterNode
        busy = self.busy()
        ready = p is not None and not busy
        self.ui.propagateButton.enabled = bool(ready and p.referenceVolume and p.referenceLandmarks and p.targetVolumes)
        self.ui.propagateButton.toolTip = (
            "Find the reference landmarks in every ticked target volume." if self.ui.propagateButton.enabled else
            "Choose a reference volume, a point list with points on it and at least one target volume.")
        kind = self.queryKind()
        for widget in (self.ui.searchPointsSelector, self.ui.searchPlaceWidget):
            widget.enabled = kind == "point"
        self.ui.searchSegmentSelector.enabled = kind == "segment"
        hasIndex = self.logic is not None and self.logic.index is not None and len(self.logic.index) > 0
        hasQuery = {"point": bool(p and p.searchPoints), "segment": bool(p and p.searchSegmentation),
                    "volume": True}[kind]
        self.ui.searchButton.enabled = bool(ready and p.searchVolume and hasIndex and hasQuery)
        self.ui.searchButton.toolTip = ("Look the query up in the index." if hasIndex else
                                        "Build or open an index first (Index section above).")
        self.ui.saveIndexButton.enabled = bool(hasIndex and not busy)
        for button in (self.ui.indexLoadedVolumesButton, self.ui.indexFolderButton, self.ui.openIndexButton,
                       self.ui.importEncoderButton, self.ui.installDependenciesButton):
            button.enabled = not busy
        self.ui.pretrainFolderPathLineEdit.enabled = self.ui.pretrainFolderRadioButton.checked
        self.ui.pretrainButton.enabled = not busy
        self.ui.cancelButton.enabled = busy

    def refreshEncoders(self, select: str | None = None) -> None:
        """Fill the encoder list from the cache; keep (or set) the chosen one, else the default."""
        combo = self.ui.encoderSelector
        wanted = select or (self._parameterNode.encoderId if self._parameterNode else "") or ""
        self._updatingGUI = True
        try:
            combo.clear()
            try:
                rows, default = self.logic.listEncoders()
            except Exception as exc:
                rows, default = [], None
                self.setStatus(f"Cannot read the encoder cache: {exc}")
            for encoderId, text in rows:
                combo.addItem(text, encoderId)
            if not rows:
                combo.addItem("No encoder yet: pretrain one (Advanced) or import a file", "")
            target = wanted or default or ""
            index = max(0, combo.findData(target))
            combo.setCurrentIndex(index)
        finally:
            self._updatingGUI = False
        self.onEncoderChanged(combo.currentIndex)

    def setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text
        if self.logic is not None and self.logic.deviceDescription:
            self.ui.deviceInfoLabel.text = f"Runs on: {self.logic.deviceDescription}"
        logging.info("AnatSSL: " + text)

    # ---- GUI -> state -----------------------------------------------------------------------------
    def onEncoderChanged(self, index) -> None:
        if self._updatingGUI or not self._parameterNode:
            return
        self._parameterNode.encoderId = str(self.ui.encoderSelector.itemData(index) or "")

    def onDeviceChanged(self, index) -> None:
        qt.QSettings().setValue(SETTINGS_DEVICE, str(self.ui.deviceSelector.itemData(index) or "auto"))

    def onCacheFolderChanged(self, path) -> None:
        qt.QSettings().setValue(SETTINGS_CACHE, str(path))
        self.logic.resetEncoders()
        self.refreshEncoders()

    def onReferenceLandmarksChanged(self, node) -> None:
        self.ui.landmarksPlaceWidget.setCurrentNode(node)

    def onTargetVolumesChanged(self) -> None:
        if self._updatingGUI or not self._parameterNode:
            return
        self._parameterNode.targetVolumes = list(self.ui.targetVolumesSelector.checkedNodes())

    def onSearchVolumeChanged(self, node) -> None:
        if node is not None:
            self.ui.searchSegmentSelector.setCurrentNode(self._parameterNode.searchSegmentation if self._parameterNode else None)

    def onSearchPointsChanged(self, node) -> None:
        self.ui.searchPlaceWidget.setCurrentNode(node)

    def onSearchSegmentChanged(self, *args) -> None:
        if self._updatingGUI or not self._parameterNode:
            return
        self._parameterNode.searchSegmentation = self.ui.searchSegmentSelector.currentNode()
        self._parameterNode.searchSegmentId = self.ui.searchSegmentSelector.currentSegmentID() or ""

    def onQueryKindChanged(self, checked: bool = True) -> None:
        if checked and self._parameterNode and not self._updatingGUI:
            self._parameterNode.searchQueryKind = self.queryKind()
        self.updateGUIFromState()

    def onPretrainFolderChanged(self, path) -> None:
        if self._parameterNode and not self._updatingGUI:
            self._parameterNode.pretrainFolder = str(path)

    def device(self) -> str:
        return str(self.ui.deviceSelector.itemData(self.ui.deviceSelector.currentIndex) or "auto")

    def queryKind(self) -> str:
        """``"point"``, ``"segment"`` or ``"volume"``: what the Search panel looks up."""
        if self.ui.querySegmentRadioButton.checked:
            return "segment"
        if self.ui.queryVolumeRadioButton.checked:
            return "volume"
        return "point"

    def busy(self) -> bool:
        return bool((self._runner is not None and self._runner.busy) or (self._job is not None and self._job.running))

    # ---- running work -------------------------------------------------------------------------
    def _ensureReady(self) -> bool:
        """Dependencies present (offer to install), nothing else running."""
        if self.busy():
            slicer.util.warningDisplay("AnatSSL is still working on the previous request; wait or press Cancel.")
            return False
        return self.ensureDependencies()

    def _startTask(self, title: str, work, finished) -> None:
        """Run ``work(progress, cancelled)`` in a thread; ``finished(result, error)`` runs here when it ends."""
        try:
            self._runner.start(title, work, finished)
        except AnatSSLError as exc:  # a second request while one runs
            slicer.util.warningDisplay(str(exc))
            return
        self.ui.progressBar.setValue(0)
        self.setStatus(f"{title}... (Slicer stays usable; Cancel stops it)")
        self._timer.start()
        self.updateGUIFromState()

    def onTimer(self) -> None:
        if self._runner.busy:
            self.ui.progressBar.setValue(int(100 * self._runner.fraction))
            title = self._runner.task.title
            try:
                delivered = self._runner.poll()
            except Exception as exc:  # writing the result failed: plain message for user errors
                delivered = True
                self._reportError(exc, title)
            if delivered:
                self.updateGUIFromState()
        if self._job is not None:
            self._pollJob()
        if not self.busy():
            self._timer.stop()

    def onCancel(self) -> None:
        if self._runner.busy:
            self.setStatus(f"Cancelling {self._runner.task.title.lower()}: nothing will be written...")
            self._runner.cancel("cancelled")
        if self._job is not None and self._job.running:
            self._job.cancel(grace_s=20.0)
            self.setStatus("Cancelling pretraining: saving a checkpoint (start again to resume)...")

    def _reportError(self, error, what: str) -> bool:
        """Show ``error`` (None: nothing); user errors and GPU memory errors get a plain message."""
        if error is None:
            return False
        if isinstance(error, _bridge_module("jobs").TaskCancelled):  # the user's Cancel, or the scene closed
            self.ui.progressBar.setValue(0)
            self.setStatus(f"{what} cancelled; nothing was changed.")
            return True
        message = self.logic.describeError(error)
        self.setStatus(f"{what} failed: {message}")
        if isinstance(error, AnatSSLError) or self.logic.isOutOfMemory(error):
            slicer.util.errorDisplay(f"{what} failed:\n{message}")
        else:
            slicer.util.errorDisplay(f"{what} failed:\n{message}", detailedText="".join(
                traceback.format_exception(type(error), error, error.__traceback__)))
        return True

    # ---- landmarks --------------------------------------------------------------------------------
    def onPropagate(self) -> None:
        if not self._ensureReady():
            return
        p = self._parameterNode
        # the worker reads no MRML
        encoderId, device, lowConfidence, matchContrast = p.encoderId, self.device(), float(p.lowConfidence), bool(p.matchContrast)
        try:
            with slicer.util.WaitCursor():
                propagator = self.logic.landmarkPropagator(encoderId, device, lowConfidence, matchContrast)
                plan = propagator.prepare(slicer.mrmlScene, p.referenceVolume, p.referenceLandmarks, list(p.targetVolumes))
        except Exception as exc:
            self._reportError(exc, "Landmark propagation")
            return

        def work(progress, cancelled):
            return self.logic.withDeviceFallback(
                lambda prop: prop.compute(plan, progress=progress, cancelled=cancelled),
                lambda dev: self.logic.landmarkPropagator(encoderId, dev, lowConfidence, matchContrast),
                device)

        def finished(result, error):
            if self._reportError(error, "Landmark propagation"):
                return
            (propagator_used, computed), note = result
            results = propagator_used.write(slicer.mrmlScene, plan, computed)
            low = sum(len(r.low_confidence) for r in results)
            recomputed = sum(len(r.recomputed) for r in results)
            self.ui.landmarksResultLabel.text = (
                f"{len(results)} target(s) updated; {recomputed} point(s) located, the rest reused; "
                f"{low} low-confidence point(s) marked." + (f" {note}" if note else ""))
            if results:
                self.ui.landmarksTableView.setMRMLTableNode(results[0].table_node)
            self.setStatus("Landmarks propagated." + (f" {note}" if note else ""))

        self._startTask("Propagating landmarks", work, finished)

    # ---- segmentation -----------------------------------------------------------------------------
    def onOpenSegmentEditor(self) -> None:
        slicer.util.selectModule("SegmentEditor")

    # ---- search -----------------------------------------------------------------------------------
    def onIndexLoadedVolumes(self) -> None:
        if not self._ensureReady():
            return
        volumes = self.logic.imageVolumes()
        if not volumes:
            slicer.util.warningDisplay("No image volume is loaded: load volumes first (or index a folder).")
            return
        self._indexImages([(v.GetName(), self.logic.imageFromVolume(v)) for v in volumes])

    def onIndexFolder(self) -> None:
        if not self._ensureReady():
            return
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Folder of volumes to index")
        if not folder:
            return
        self._indexImages(None, folder)

    def _indexImages(self, named_images, folder: str | None = None) -> None:
        p = self._parameterNode
        try:
            with slicer.util.WaitCursor():
                search = self.logic.embeddingSearch(p.encoderId, self.device())
        except Exception as exc:
            self._reportError(exc, "Indexing")
            return

        def work(progress, cancelled):
            return self.logic.addToIndex(search, named_images, folder, progress, cancelled)

        def finished(result, error):
            self.ui.indexStatusLabel.text = self.logic.describeIndex()
            if isinstance(error, _bridge_module("jobs").TaskCancelled):  # stops between volumes
                self.setStatus("Indexing cancelled; the volumes indexed before the cancel are kept.")
                return
            if self._reportError(error, "Indexing"):
                return
            self.setStatus(f"Indexed {len(result)} volume(s).")

        self._startTask("Indexing volumes", work, finished)

    def onOpenIndex(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Open an AnatSSL index folder")
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay("Cannot open the index.", waitCursor=True):
            self.logic.openIndex(folder)
            self.ui.indexStatusLabel.text = self.logic.describeIndex()
            self.updateGUIFromState()

    def onSaveIndex(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Save the index into a folder")
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay("Cannot save the index.", waitCursor=True):
            path = self.logic.saveIndex(folder)
            self.setStatus(f"Index saved in {path}.")

    def onSearch(self) -> None:
        if not self._ensureReady():
            return
        p = self._parameterNode
        kind = self.queryKind()
        try:  # the query is read from the scene here; the thread only embeds and looks up
            with slicer.util.WaitCursor():
                search = self.logic.embeddingSearch(p.encoderId, self.device())
                if kind == "point":
                    query = self.logic.pointQuery(p.searchVolume, p.searchPoints, search)
                elif kind == "segment":
                    query = self.logic.segmentQuery(p.searchVolume, p.searchSegmentation, p.searchSegmentId, search)
                else:
                    query = self.logic.volumeQuery(p.searchVolume, search)
        except Exception as exc:
            self._reportError(exc, "Search")
            return
        k = int(p.numberOfResults)

        def work(progress, cancelled):
            hits = self.logic.runQuery(search, query, k)
            progress(1.0)
            return hits

        def finished(hits, error):
            if self._reportError(error, "Search"):
                return
            table = self.logic.showHits(hits)
            self.ui.searchResultsTableView.setMRMLTableNode(table)
            what = "volume(s) most like the query volume" if kind == "volume" else "result(s)"
            self.setStatus(f"{len(hits)} {what} ({query.description}). Click a row to show it in the slice views.")

        self._startTask("Searching", work, finished)

    def onSearchResultClicked(self, index) -> None:
        view = self.ui.searchResultsTableView
        table = view.mrmlTableNode()
        if table is None or not index.isValid():
            return
        if hasattr(view, "sortFilterProxyModel") and view.sortFilterProxyModel() is not None:
            index = view.sortFilterProxyModel().mapToSource(index)
        model = view.tableModel() if hasattr(view, "tableModel") else None
        row = model.mrmlTableRowIndex(index) if model is not None and hasattr(model, "mrmlTableRowIndex") else index.row()
        try:
            volume, ras, whole = self.logic.jumpToHit(table, int(row))
        except Exception as exc:
            self._reportError(exc, "Showing this result")
            return
        self.setStatus(f"Showing {volume.GetName()}" + (" (whole-volume result)." if whole else
                                                        f" at R {ras[0]:.1f}, A {ras[1]:.1f}, S {ras[2]:.1f} mm."))

    # ---- pretraining ------------------------------------------------------------------------------
    def onPretrain(self) -> None:
        if not self._ensureReady():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Cannot start pretraining.", waitCursor=True):
            if self.ui.pretrainFolderRadioButton.checked:
                data = [p.pretrainFolder] if p.pretrainFolder else []
                if not data:
                    raise AnatSSLError("choose the data folder to pretrain on")
            else:
                data = self.logic.exportLoadedVolumes()
            self._job = self.logic.pretrainJob(data, self.device(), int(p.pretrainSteps), int(p.pretrainBatchSize),
                                               p.pretrainName or None)
            self.ui.pretrainLogTextEdit.clear()
            self.ui.pretrainLogTextEdit.appendPlainText(" ".join(self._job.command()))
            self._job.start()
            self.ui.progressBar.setValue(0)
            self.setStatus("Pretraining in the background; Slicer stays usable.")
            self._timer.start()
            self.updateGUIFromState()

    def _pollJob(self) -> None:
        job = self._job
        for event in job.poll():
            kind = event.get("event")
            if kind == "progress" and event.get("total"):
                self.ui.progressBar.setValue(int(100 * event.get("step", 0) / max(1, event["total"])))
                loss = event.get("loss")
                self.ui.statusLabel.text = (f"Pretraining {event.get('stage', '')}: step {event.get('step')} of "
                                            f"{event['total']}" + (f", loss {loss:.3f}" if isinstance(loss, (int, float)) else ""))
            if kind != "progress" or int(event.get("step") or 0) % 50 == 0:
                self.ui.pretrainLogTextEdit.appendPlainText(_bridge_module("jobs").describe_event(event))
            if kind == "exit":
                self._pretrainFinished(job)
        self.updateGUIFromState()

    def _pretrainFinished(self, job) -> None:
        code = job.returncode
        if code == 0 and job.encoder_id:
            self.refreshEncoders(select=job.encoder_id)
            self.setStatus(f"Pretraining finished: encoder {job.encoder_id} is selected.")
        elif code == 3 or job.cancel_requested:
            self.setStatus("Pretraining cancelled; a checkpoint was kept: start again to resume.")
        else:
            message = job.last_error or "see the log in the Advanced tab"
            if "out of memory" in message.lower():
                message += ". The GPU ran out of memory: lower the batch size or choose CPU as device."
            self.setStatus(f"Pretraining failed (exit code {code}): {message}")
            slicer.util.errorDisplay(f"Pretraining failed (exit code {code}):\n{message}")

    # ---- encoders and dependencies -------------------------------------------------------------
    def onImportEncoder(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Import an AnatSSL encoder", "",
                                              "AnatSSL encoders (*.anatssl *.zip);;All files (*)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Cannot import the encoder.", waitCursor=True):
            encoderId = self.logic.importEncoder(path)
            self.refreshEncoders(select=encoderId)
            self.setStatus(f"Encoder {encoderId} imported and selected.")

    def onInstallDependencies(self) -> None:
        if self.ensureDependencies(force_message=True):
            self.setStatus("All Python packages AnatSSL needs are installed.")

    def ensureDependencies(self, force_message: bool = False) -> bool:
        """Offer to install what is missing (torch through the PyTorch extension); True when all present."""
        plan = _bridge_module("dependencies").install_plan()
        if plan.empty:
            if force_message:
                slicer.util.infoDisplay("All Python packages AnatSSL needs are installed.")
            return True
        if not slicer.util.confirmOkCancelDisplay(plan.describe(), windowTitle="AnatSSL: install Python packages"):
            self.setStatus("Python packages not installed: the tools cannot run without them "
                           "(Advanced tab > Check / install Python packages).")
            return False
        try:
            with slicer.util.WaitCursor():
                self.logic.installDependencies(plan)
        except Exception as exc:
            slicer.util.errorDisplay(f"Installing the Python packages failed:\n{exc}\n\nCheck the internet connection "
                                     "(or a proxy), then try again from the Advanced tab.")
            return False
        return _bridge_module("dependencies").install_plan().empty


#
# AnatSSLLogic
#


class AnatSSLLogic(ScriptedLoadableModuleLogic):
    """Node <-> library conversions and the tools on ``slicer.mrmlScene``; usable from the Python console
    and batch scripts without the widget. Each method delegates to ``AnatSSLBridge`` (see its docstrings
    for frames and shapes: images and points in the library are LPS, nodes are RAS).

    One embedding store is kept per (encoder, device), so a second Propagate or Search re-embeds nothing.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._encoders = {}
        self._stores = {}
        self._propagators = {}
        self._searches = {}
        self.index = None
        self.resultsTable = None
        self.deviceDescription = ""

    def getParameterNode(self) -> AnatSSLParameterNode:
        return AnatSSLParameterNode(super().getParameterNode())

    # ---- encoders -------------------------------------------------------------------------------
    @staticmethod
    def defaultCacheFolder() -> str:
        from AnatSSLLib.cache import default_cache_dir

        return str(default_cache_dir())

    def cache(self):
        from AnatSSLLib.cache import EncoderCache

        return EncoderCache(cacheFolderSetting() or None)

    def listEncoders(self):
        """``([(id, text for the list)], default id or None)``."""
        cache = self.cache()
        rows = []
        for encoderId, manifest, origin in cache.list():
            name = getattr(manifest, "name", "") or ""
            dims = f"{manifest.spatial_dims}D"
            rows.append((encoderId, f"{name or encoderId} ({manifest.method}, {dims}{', bundled' if origin == 'bundled' else ''})"))
        try:
            default = cache.default_encoder_id()
        except Exception:
            default = None
        return rows, default

    def importEncoder(self, path: str) -> str:
        return self.cache().import_(path)

    def resetEncoders(self) -> None:
        self._encoders.clear()
        self._stores.clear()
        self._propagators.clear()
        self._searches.clear()

    def encoder(self, encoderId: str, device: str):
        from AnatSSLLib.encoders import load_encoder

        key = (encoderId or "", device)
        if key not in self._encoders:
            self._encoders[key] = load_encoder(encoderId or None, cache=self.cache(), device=device)
        try:
            from AnatSSLLib.device import describe_device

            self.deviceDescription = describe_device(self._encoders[key].device)
        except Exception:
            self.deviceDescription = str(self._encoders[key].device)
        return self._encoders[key]

    def store(self, encoderId: str, device: str, whiten: bool = False):
        """The session's embedding store for an encoder; ``whiten``: each volume's embedding whitened
        (the landmark and segmentation tools match those; the search tool's indexes hold raw ones)."""
        from AnatSSLLib.embedding import EmbeddingStore

        key = (encoderId or "", device, bool(whiten))
        if key not in self._stores:
            self._stores[key] = EmbeddingStore(self.encoder(encoderId, device), whiten=whiten)
        return self._stores[key]

    def landmarkPropagator(self, encoderId: str, device: str, lowConfidence: float = 0.5, matchContrast: bool = False):
        """The session's propagator for an encoder; ``matchContrast``: targets of another contrast than the
        reference are registered and mapped into its contrast first (``AnatSSLLib.contrast``)."""
        key = (encoderId or "", device, bool(matchContrast))
        if key not in self._propagators:
            options = {"initial_alignment": "registration", "match_contrast": True} if matchContrast else {}
            self._propagators[key] = _bridge_module("landmarks").LandmarkPropagator(
                self.store(encoderId, device, whiten=True), **options)
        propagator = self._propagators[key]
        propagator.low_confidence = float(lowConfidence)
        return propagator

    def embeddingSearch(self, encoderId: str, device: str):
        from AnatSSLLib.tools.search import EmbeddingSearch

        key = (encoderId or "", device)
        if key not in self._searches:
            self._searches[key] = EmbeddingSearch(self.store(encoderId, device))
        return self._searches[key]

    def crossModalitySegmenter(self, encoderId: str, device: str):
        """The segmentation tool as the effect runs it: registration start, the target mapped into the
        reference's contrast (measured best across contrasts and no worse within one: benchmarks/README.md)."""
        from AnatSSLLib.tools.segmentation import CrossModalitySegmenter

        return CrossModalitySegmenter(self.store(encoderId, device, whiten=True), initial_alignment="registration",
                                      match_contrast=True)

    # ---- device and errors ----------------------------------------------------------------------
    @staticmethod
    def isOutOfMemory(error) -> bool:
        try:
            from AnatSSLLib.device import is_out_of_memory

            return bool(is_out_of_memory(error))
        except Exception:
            return "out of memory" in str(error).lower()

    def describeError(self, error) -> str:
        if self.isOutOfMemory(error):
            return ("the GPU ran out of memory. Choose CPU as device (Encoder and device), close other GPU programs, "
                    "or use smaller volumes.")
        return str(error) or type(error).__name__

    def withDeviceFallback(self, run, make, device: str):
        """``((tool, run(tool)), note)``: run on ``device``; on a GPU out-of-memory error, once more on the CPU."""
        tool = make(device)
        try:
            return (tool, run(tool)), ""
        except Exception as exc:
            if device == "cpu" or not self.isOutOfMemory(exc):
                raise
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:
            pass
        tool = make("cpu")
        return (tool, run(tool)), "The GPU ran out of memory; this run used the CPU instead."

    # ---- volumes --------------------------------------------------------------------------------
    def imageVolumes(self) -> list:
        nodes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
        return [n for n in nodes if not n.IsA("vtkMRMLLabelMapVolumeNode") and n.GetImageData() is not None]

    def firstImageVolume(self):
        volumes = self.imageVolumes()
        return volumes[0] if volumes else None

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

    # ---- tools (batch use: blocking) -----------------------------------------------------------
    def propagateLandmarks(self, referenceVolume, referenceLandmarks, targetVolumes, encoderId: str = "",
                           device: str = "auto", lowConfidence: float = 0.5, matchContrast: bool = False):
        """One markups node and table per target (see ``AnatSSLBridge.landmarks``); blocking."""
        propagator = self.landmarkPropagator(encoderId, device, lowConfidence, matchContrast)
        return propagator.propagate(slicer.mrmlScene, referenceVolume, referenceLandmarks, list(targetVolumes))

    def transferSegmentation(self, referenceVolume, referenceSegmentation, targetVolume, outputSegmentation=None,
                             encoderId: str = "", device: str = "auto", segmentIds=None, saveUndoState=None):
        """Fill ``outputSegmentation`` on ``targetVolume`` from the reference segmentation; blocking."""
        plan = self.prepareTransfer(referenceVolume, referenceSegmentation, targetVolume, outputSegmentation,
                                    encoderId, device, segmentIds)
        (_, result), _ = self.computeTransfer(plan, encoderId, device)
        return self.writeTransfer(plan, result, saveUndoState=saveUndoState)

    # The Segment Editor effect runs these three steps: prepare and write on the main thread, compute in a thread.
    def prepareTransfer(self, referenceVolume, referenceSegmentation, targetVolume, outputSegmentation=None,
                        encoderId: str = "", device: str = "auto", segmentIds=None):
        """Check and read the inputs (``AnatSSLBridge.segmentation.TransferPlan``); bad input raises, nothing changes."""
        return _bridge_module("segmentation").prepare_transfer(
            slicer.mrmlScene, referenceVolume, referenceSegmentation, targetVolume, outputSegmentation,
            segment_ids=segmentIds, spatial_dims=self.encoder(encoderId, device).spatial_dims)

    def computeTransfer(self, plan, encoderId: str = "", device: str = "auto", progress=None, cancelled=None):
        """``((segmenter, TransferResult), note)``: the label image (no MRML access), on the CPU after a GPU OOM."""
        segmentation = _bridge_module("segmentation")
        return self.withDeviceFallback(
            lambda segmenter: segmentation.compute_transfer(segmenter, plan, progress=progress, cancelled=cancelled),
            lambda dev: self.crossModalitySegmenter(encoderId, dev), device)

    def writeTransfer(self, plan, result, saveUndoState=None, editorSegmentation=None, checkEditor: bool = False):
        """Write the result (one undo state first); refused if a node left the scene or the editor changed segmentation."""
        kwargs = {"editor_segmentation_node": editorSegmentation} if checkEditor else {}
        return _bridge_module("segmentation").write_transfer(plan, result, save_undo_state=saveUndoState, **kwargs)

    # ---- search ---------------------------------------------------------------------------------
    def addToIndex(self, search, namedImages=None, folder: str | None = None, progress=None, cancelled=None):
        """Add ``[(name, Image)]`` (read on the main thread) or every volume file of ``folder`` to the index."""
        from AnatSSLLib.errors import InputError

        if self.index is None or self.index.encoder_id != search.encoder_id:
            self.index = search.new_index()
        if folder:
            from AnatSSLLib.datasets import find_volumes

            paths = [str(p) for p in find_volumes([folder], None)]
            if not paths:
                raise InputError(f"no volume files found in {folder}")
            items = [(p, p) for p in paths]
        else:
            items = list(namedImages or [])
        added = []
        for n, (name, source) in enumerate(items):
            if cancelled is not None and cancelled():
                break
            if isinstance(source, str):
                search.add(self.index, [source])
                added.append(self.index.volume_names()[-1])
            else:
                if name in self.index.volume_names():
                    self.index.remove_volume(name)
                search.add(self.index, [source], names=[name])
                added.append(name)
            if progress is not None:
                progress((n + 1) / len(items))
        return added

    def describeIndex(self) -> str:
        if self.index is None or not len(self.index):
            return "No index yet."
        names = self.index.volume_names()
        return f"{len(names)} volume(s) indexed ({len(self.index)} places): " + ", ".join(names[:6]) + \
            (", ..." if len(names) > 6 else "")

    def openIndex(self, folder: str) -> None:
        from AnatSSLLib.index import EmbeddingIndex

        self.index = EmbeddingIndex.open(folder)

    def saveIndex(self, folder: str):
        from AnatSSLLib.errors import InputError

        if self.index is None:
            raise InputError("there is no index to save: build one first")
        return self.index.save(folder)

    def _spatialDims(self, search) -> int | None:
        try:
            return int(search.store.encoder.spatial_dims)
        except Exception:
            return None

    def pointQuery(self, volumeNode, pointsNode, search=None):
        """The last placed point of ``pointsNode`` on ``volumeNode`` (``AnatSSLBridge.search.SearchQuery``)."""
        from AnatSSLLib.errors import InputError

        if pointsNode is None:
            raise InputError("no query point list: choose (or create) one and click the query point")
        return _bridge_module("search").point_query(volumeNode, pointsNode,
                                                    spatial_dims=self._spatialDims(search) if search else None)

    def segmentQuery(self, volumeNode, segmentationNode, segmentId: str, search=None):
        """The region of one segment on ``volumeNode``."""
        return _bridge_module("search").segment_query(slicer.mrmlScene, volumeNode, segmentationNode, segmentId,
                                                      spatial_dims=self._spatialDims(search) if search else None)

    def volumeQuery(self, volumeNode, search=None):
        """The whole of ``volumeNode``: the indexed volumes most like it."""
        return _bridge_module("search").volume_query(volumeNode,
                                                     spatial_dims=self._spatialDims(search) if search else None)

    def runQuery(self, search, query, k: int = 10):
        """The hits of a query from :meth:`pointQuery` / :meth:`segmentQuery` / :meth:`volumeQuery` (no MRML access)."""
        return _bridge_module("search").run_query(search, self.index, query, k=k)

    def showHits(self, hits):
        self.resultsTable = _bridge_module("search").hits_to_table(
            slicer.mrmlScene, hits, node=self.resultsTable if self.resultsTable and self.resultsTable.GetScene() else None)
        return self.resultsTable

    def jumpToHit(self, tableNode, row: int):
        """Show the hit's volume in the slice views, centred on its position (a whole-volume hit: the volume fitted)."""
        volume, ras, whole = _bridge_module("search").jump_to_hit(slicer.mrmlScene, tableNode, row)
        if whole:
            slicer.util.resetSliceViews()
        return volume, ras, whole

    # ---- pretraining ----------------------------------------------------------------------------
    def exportLoadedVolumes(self) -> list[str]:
        """Write the loaded image volumes to a temporary folder (NIfTI) for the pretraining process."""
        from AnatSSLLib.errors import InputError
        from AnatSSLLib.image import write_image

        volumes = self.imageVolumes()
        if len(volumes) < 2:
            raise InputError(f"pretraining needs at least 2 loaded volumes, {len(volumes)} loaded; "
                             "load more or train on a folder")
        folder = os.path.join(slicer.util.tempDirectory(), "anatssl-pretrain-data")
        os.makedirs(folder, exist_ok=True)
        paths = []
        for n, volume in enumerate(volumes):
            paths.append(str(write_image(self.imageFromVolume(volume), os.path.join(folder, f"volume{n:03d}.nii.gz"))))
        return paths

    def pretrainJob(self, data, device: str, steps: int, batchSize: int, name: str | None = None):
        """A :class:`AnatSSLBridge.jobs.PretrainJob` (not started) writing into the module's encoder cache."""
        return _bridge_module("jobs").PretrainJob(
            data=data, cache_dir=cacheFolderSetting() or self.defaultCacheFolder(), device=device,
            ld_steps=steps, batch_size=batchSize, name=name)

    # ---- dependencies ---------------------------------------------------------------------------
    @staticmethod
    def installDependencies(plan) -> None:
        """Install ``plan`` (``AnatSSLBridge.dependencies.InstallPlan``): torch via PyTorchUtils, then pip."""
        if plan.torch:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError("the PyTorch extension is not installed: install 'PyTorch' from the Extensions "
                                   "Manager, restart Slicer, then try again") from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                torch = torchLogic.installTorch(askConfirmation=False)
                if torch is None:
                    raise RuntimeError("PyTorch could not be installed (see the Python console)")
        for requirement in plan.pip:
            slicer.util.pip_install(requirement)


def _bridge_module(name: str):
    """A sub-module of the bridge (``landmarks``, ``search``, ``segmentation``, ``jobs``, ``dependencies``)."""
    return importlib.import_module(f"AnatSSLBridge.{name}")
