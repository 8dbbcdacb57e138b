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
        """Run the self-test ``AnatSSLSelfTest.py`` (installed beside this file, or in a source checkout)."""
        path = selfTestPath()
        if path is None:
            raise AssertionError("AnatSSL self-test not found; looked in: " + ", ".join(selfTestCandidates()))
        spec = importlib.util.spec_from_file_location("AnatSSLSelfTest", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        test = module.AnatSSLSelfTest()
        test.messageDelay = msec
        test.runTest(**kwargs)


def selfTestCandidates(here: str = _HERE) -> list[str]:
    """Where the self-test may be: installed beside the module (CMake copies ``Testing/Python/`` there),
    then the source checkout's ``Testing/Python/`` (developer mode)."""
    return [os.path.join(here, "Testing", "Python", "AnatSSLSelfTest.py"),
            os.path.join(os.path.dirname(here), "Testing", "Python", "AnatSSLSelfTest.py")]


def selfTestPath(here: str = _HERE) -> str | None:
    return next((p for p in selfTestCandidates(here) if os.path.exists(p)), None)


#
# Parameter node
#


@parameterNodeWrapper
class AnatSSLParameterNode:
    """State of the AnatSSL module, saved with the scene (restores the panels).

    referenceVolume, referenceLandmarks: the reference volume and the points clicked on it.
    targetVolumes: the volumes to find the landmarks in (kept in sync with the checkable list).
    lowConfidence: points below this confidence (cosine similarity) are flagged.
    contrast: the landmark and segmentation tools' contrast handling: "auto" (the tools decide),
        or an override, "same" or "match" (map each target into the reference's contrast).
    encoderId: the encoder the tools use ("" = the default one).
    searchVolume, searchPoints, searchSegmentation, searchSegmentId: the search query;
    searchQueryKind: what is searched for ("point", "segment" or "volume": the whole volume).
    numberOfResults: how many search results to list.
    recipe, pretrainBatchSize, pretrainName, pretrainFolder: pretraining settings (a named recipe
        from ``AnatSSLLib.recipes``, the batch size, the new encoder's name, the data folder).
    """

    referenceVolume: vtkMRMLScalarVolumeNode
    referenceLandmarks: vtkMRMLMarkupsFiducialNode
    targetVolumes: list[vtkMRMLScalarVolumeNode]
    lowConfidence: Annotated[float, WithinRange(-1.0, 1.0)] = 0.5
    contrast: str = "auto"
    encoderId: str = ""
    searchVolume: vtkMRMLScalarVolumeNode
    searchPoints: vtkMRMLMarkupsFiducialNode
    searchSegmentation: vtkMRMLSegmentationNode
    searchSegmentId: str = ""
    searchQueryKind: str = "point"
    numberOfResults: Annotated[int, WithinRange(1, 100)] = 10
    recipe: str = ""
    pretrainBatchSize: Annotated[int, WithinRange(1, 64)] = 2
    pretrainName: str = ""
    pretrainFolder: str = ""


#
# Settings (per user, not per scene)
#

SETTINGS_CACHE = "AnatSSL/EncoderCacheFolder"
SETTINGS_DEVICE = "AnatSSL/Device"
DEVICES = [("Auto (GPU if available)", "auto"), ("CPU", "cpu"), ("GPU (CUDA)", "cuda")]
CONTRASTS = [("auto (recommended)", "auto"), ("same contrast as the reference", "same"),
             ("map targets into the reference's contrast", "match")]


def cacheFolderSetting() -> str:
    """The encoder cache folder chosen in the module ("" = the library default)."""
    return str(qt.QSettings().value(SETTINGS_CACHE, "") or "")


def deviceSetting() -> str:
    value = str(qt.QSettings().value(SETTINGS_DEVICE, "auto") or "auto")
    return value if value in {d for _, d in DEVICES} else "auto"


def recipes() -> list:
    """The pretraining recipes in offer order (``AnatSSLLib.recipes.RECIPES``: the bundled default's first)."""
    from AnatSSLLib.recipes import RECIPES

    return list(RECIPES.values())


#
# Background work: every tool request goes to one long-lived worker process
# (AnatSSLBridge.workerclient.ToolWorker, polled by a QTimer); pretraining runs in its own process
# (AnatSSLBridge.jobs.PretrainJob). The MRML scene is read before and written after, on the main
# thread only.
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
        self._job = None
        self._timer = None
        self._updatingGUI = False
        self._installing = False
        self._cacheLineEdit = None

    def resourcePath(self, filename: str) -> str:
        return _resource(filename)

    # ---- set-up -------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AnatSSL.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AnatSSLLogic.shared()  # the Segment Editor effect uses the same one

        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self.onTimer)

        for label, value in DEVICES:
            self.ui.deviceSelector.addItem(label, value)
        self.ui.deviceSelector.setCurrentIndex(max(0, [d for _, d in DEVICES].index(deviceSetting())))
        for label, value in CONTRASTS:
            self.ui.contrastSelector.addItem(label, value)
        for recipe in recipes():
            self.ui.recipeSelector.addItem(f"{recipe.name}: {recipe.description}", recipe.name)
        self.ui.cacheFolderPathLineEdit.currentPath = cacheFolderSetting() or self.logic.defaultCacheFolder()
        self.ui.targetVolumesSelector.setMRMLScene(slicer.mrmlScene)
        self.ui.landmarksPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.ui.searchPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup

        # connections (state fields bound through SlicerParameterName are connected by connectGui)
        self.ui.encoderSelector.connect("currentIndexChanged(int)", self.onEncoderChanged)
        self.ui.importEncoderButton.connect("clicked(bool)", self.onImportEncoder)
        self.ui.deviceSelector.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.contrastSelector.connect("currentIndexChanged(int)", self.onContrastChanged)
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
        self.ui.recipeSelector.connect("currentIndexChanged(int)", self.onRecipeChanged)
        self.ui.pretrainLoadedRadioButton.connect("toggled(bool)", self.updateGUIFromState)
        self.ui.pretrainFolderRadioButton.connect("toggled(bool)", self.updateGUIFromState)
        self.ui.pretrainFolderPathLineEdit.connect("currentPathChanged(QString)", self.onPretrainFolderChanged)
        self.ui.pretrainButton.connect("clicked(bool)", self.onPretrain)
        # ctkPathLineEdit.currentPathChanged fires on every keystroke (from textChanged): typed paths are taken
        # when the user has finished (Enter or focus out: the inner line edit's editingFinished), a folder
        # picked with the browse button (no keyboard focus) at once; either only if it exists
        self.ui.cacheFolderPathLineEdit.connect("currentPathChanged(QString)", self.onCacheFolderPathChanged)
        try:
            self._cacheLineEdit = self.ui.cacheFolderPathLineEdit.comboBox().lineEdit()
        except AttributeError:  # comboBox() not wrapped: its line edit is the path edit's only QLineEdit
            found = slicer.util.findChildren(self.ui.cacheFolderPathLineEdit, className="QLineEdit")
            self._cacheLineEdit = found[0] if found else None
        if self._cacheLineEdit is not None:
            self._cacheLineEdit.connect("editingFinished()", self.onCacheFolderEdited)
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
        if self.logic is not None:  # the module is closed or reloaded: end its worker process
            self.logic.cancel("the AnatSSL module was closed")
            self.logic.shutdown()
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
        if self.logic is not None and self.logic.cancel("the scene was closed"):
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
        """Widgets without a parameter-node binding (checkable list, segment selector, path, combos) from the state."""
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
            self.ui.contrastSelector.setCurrentIndex(max(0, self.ui.contrastSelector.findData(p.contrast or "auto")))
            self.ui.recipeSelector.setCurrentIndex(max(0, self.ui.recipeSelector.findData(p.recipe)))
        finally:
            self._updatingGUI = False
        self.onRecipeChanged(self.ui.recipeSelector.currentIndex)

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
        hasIndex = self.logic is not None and self.logic.hasIndex()
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
        self.ui.cacheFolderPathLineEdit.enabled = not busy
        self.ui.cancelButton.enabled = busy and not self._installing

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
        if self.logic is not None and self.logic.deviceDescription():
            self.ui.deviceInfoLabel.text = f"Runs on: {self.logic.deviceDescription()}"
        logging.info("AnatSSL: " + text)

    # ---- GUI -> state -----------------------------------------------------------------------------
    def onEncoderChanged(self, index) -> None:
        if self._updatingGUI or not self._parameterNode:
            return
        self._parameterNode.encoderId = str(self.ui.encoderSelector.itemData(index) or "")

    def onDeviceChanged(self, index) -> None:
        qt.QSettings().setValue(SETTINGS_DEVICE, str(self.ui.deviceSelector.itemData(index) or "auto"))

    def onContrastChanged(self, index) -> None:
        if self._updatingGUI or not self._parameterNode:
            return
        self._parameterNode.contrast = str(self.ui.contrastSelector.itemData(index) or "auto")

    def onRecipeChanged(self, index) -> None:
        name = str(self.ui.recipeSelector.itemData(index) or "")
        recipe = next((r for r in recipes() if r.name == name), None)
        self.ui.recipeInfoLabel.text = (f"Expected time: {recipe.describe_time(self.device())}. "
                                        f"Settings: {' '.join(recipe.cli_args)}") if recipe else ""
        if self._parameterNode and not self._updatingGUI:
            self._parameterNode.recipe = name

    def onCacheFolderPathChanged(self, path) -> None:
        if self._cacheLineEdit is not None and self._cacheLineEdit.hasFocus():
            return  # the user is typing: wait for editingFinished
        self.onCacheFolderEdited()

    def onCacheFolderEdited(self, *args) -> None:
        """The cache folder was edited: act once, and only on an existing folder (not on every keystroke)."""
        path = str(self.ui.cacheFolderPathLineEdit.currentPath or "")
        current = cacheFolderSetting() or self.logic.defaultCacheFolder()
        if not path or os.path.normpath(path) == os.path.normpath(current):
            return
        if not os.path.isdir(path):
            self.setStatus(f"Encoder cache folder {path!r} does not exist; the cache stays {current!r}.")
            return
        qt.QSettings().setValue(SETTINGS_CACHE, str(path))
        self.logic.resetEncoders()
        self.refreshEncoders()
        self.setStatus(f"Encoder cache folder: {path}")

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

    def contrast(self) -> str:
        return str((self._parameterNode.contrast if self._parameterNode else "") or "auto")

    def queryKind(self) -> str:
        """``"point"``, ``"segment"`` or ``"volume"``: what the Search panel looks up."""
        if self.ui.querySegmentRadioButton.checked:
            return "segment"
        if self.ui.queryVolumeRadioButton.checked:
            return "volume"
        return "point"

    def busy(self) -> bool:
        # a pretraining job counts until its exit event was polled (not merely until its process ended)
        return bool(self._installing or (self.logic is not None and self.logic.busy()) or self._job is not None)

    # ---- running work -------------------------------------------------------------------------
    def _ensureReady(self) -> bool:
        """Dependencies present (offer to install), nothing else running."""
        if self.busy():
            slicer.util.warningDisplay("AnatSSL is still working on the previous request; wait or press Cancel.")
            return False
        return self.ensureDependencies()

    def _started(self, title: str) -> None:
        """A request went to the worker process: show it and poll."""
        self.ui.progressBar.setValue(0)
        self.setStatus(f"{title}... (Slicer stays usable; Cancel stops it)")
        self._timer.start()
        self.updateGUIFromState()

    def onTimer(self) -> None:
        if self.logic.busy():
            self.ui.progressBar.setValue(int(100 * self.logic.fraction()))
            title = self.logic.taskTitle()
            try:
                delivered = self.logic.poll()
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
        if self.logic.busy():
            self.setStatus(f"Cancelling {self.logic.taskTitle().lower()}: nothing will be written...")
            self.logic.cancel("cancelled")
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
            detail = getattr(error, "traceback_text", "") or "".join(
                traceback.format_exception(type(error), error, error.__traceback__))
            slicer.util.errorDisplay(f"{what} failed:\n{message}", detailedText=detail)
        return True

    # ---- landmarks --------------------------------------------------------------------------------
    def onPropagate(self) -> None:
        if not self._ensureReady():
            return
        p = self._parameterNode

        def finished(result, error):
            if self._reportError(error, "Landmark propagation"):
                return
            results, note = result
            low = sum(len(r.low_confidence) for r in results)
            recomputed = sum(len(r.recomputed) for r in results)
            self.ui.landmarksResultLabel.text = (
                f"{len(results)} target(s) updated; {recomputed} point(s) located, the rest reused; "
                f"{low} low-confidence point(s) marked." + (f" {note}" if note else ""))
            if results:
                self.ui.landmarksTableView.setMRMLTableNode(results[0].table_node)
            self.setStatus("Landmarks propagated." + (f" {note}" if note else ""))

        try:
            with slicer.util.WaitCursor():
                self.logic.startPropagation(p.referenceVolume, p.referenceLandmarks, list(p.targetVolumes),
                                            encoderId=p.encoderId, device=self.device(),
                                            lowConfidence=float(p.lowConfidence), contrast=self.contrast(),
                                            finished=finished)
        except Exception as exc:
            self._reportError(exc, "Landmark propagation")
            return
        self._started("Propagating landmarks")

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
        self._index(volumes, None)

    def onIndexFolder(self) -> None:
        if not self._ensureReady():
            return
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Folder of volumes to index")
        if not folder:
            return
        self._index(None, folder)

    def _index(self, volumeNodes, folder: str | None = None) -> None:
        p = self._parameterNode

        def finished(result, error):
            self.ui.indexStatusLabel.text = self.logic.describeIndex()
            if isinstance(error, _bridge_module("jobs").TaskCancelled):
                self.setStatus("Indexing cancelled. " + self.logic.describeIndex())
                return
            if self._reportError(error, "Indexing"):
                return
            self.setStatus(f"Indexed {len(result['added'])} volume(s).")

        try:
            with slicer.util.WaitCursor():
                self.logic.startIndexing(volumeNodes, folder, encoderId=p.encoderId, device=self.device(),
                                         finished=finished)
        except Exception as exc:
            self._reportError(exc, "Indexing")
            return
        self._started("Indexing volumes")

    def onOpenIndex(self) -> None:
        if self.busy():
            return
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Open an AnatSSL index folder")
        if not folder:
            return

        def finished(result, error):
            if self._reportError(error, "Opening the index"):
                return
            self.ui.indexStatusLabel.text = self.logic.describeIndex()
            self.setStatus("Index opened.")

        with slicer.util.tryWithErrorDisplay("Cannot open the index.", waitCursor=True):
            self.logic.startOpenIndex(folder, finished=finished)
            self._started("Opening the index")

    def onSaveIndex(self) -> None:
        if self.busy():
            return
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Save the index into a folder")
        if not folder:
            return

        def finished(result, error):
            if self._reportError(error, "Saving the index"):
                return
            self.setStatus(f"Index saved in {result['path']}.")

        with slicer.util.tryWithErrorDisplay("Cannot save the index.", waitCursor=True):
            self.logic.startSaveIndex(folder, finished=finished)
            self._started("Saving the index")

    def onSearch(self) -> None:
        if not self._ensureReady():
            return
        p = self._parameterNode
        kind = self.queryKind()

        def finished(result, error):
            if self._reportError(error, "Search"):
                return
            hits, query, table = result
            self.ui.searchResultsTableView.setMRMLTableNode(table)
            what = "volume(s) most like the query volume" if kind == "volume" else "result(s)"
            self.setStatus(f"{len(hits)} {what} ({query.description}). Click a row to show it in the slice views.")

        try:  # the query is read from the scene here; the worker process embeds and looks up
            with slicer.util.WaitCursor():
                self.logic.startSearch(kind, p.searchVolume, pointsNode=p.searchPoints,
                                       segmentationNode=p.searchSegmentation, segmentId=p.searchSegmentId,
                                       k=int(p.numberOfResults), encoderId=p.encoderId, device=self.device(),
                                       finished=finished)
        except Exception as exc:
            self._reportError(exc, "Search")
            return
        self._started("Searching")

    def onSearchResultClicked(self, index) -> None:
        view = self.ui.searchResultsTableView
        table = view.mrmlTableNode()
        if table is None or not index.isValid():
            return
        if hasattr(view, "sortFilterProxyModel") and view.sortFilterProxyModel() is not None:
            index = view.sortFilterProxyModel().mapToSource(index)
        # qMRMLTableModel.mrmlTableRowIndex is not wrapped for Python: map the view's row ourselves
        row = _bridge_module("search").table_row_of_view_row(table, index.row())
        if row < 0:
            return  # the column-title row (only when the titles are not in the header)
        try:
            volume, ras, whole = self.logic.jumpToHit(table, int(row))
        except Exception as exc:
            self._reportError(exc, "Showing this result")
            return
        self.setStatus(f"Showing result {row + 1}: {volume.GetName()}" + (
            " (whole-volume result)." if whole else f" at R {ras[0]:.1f}, A {ras[1]:.1f}, S {ras[2]:.1f} mm."))

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
            recipeName = str(self.ui.recipeSelector.itemData(self.ui.recipeSelector.currentIndex) or "")
            self._job = self.logic.pretrainJob(data, self.device(), recipeName, int(p.pretrainBatchSize),
                                               p.pretrainName or None)
            self.ui.pretrainLogTextEdit.clear()
            self.ui.pretrainLogTextEdit.appendPlainText(self.ui.recipeInfoLabel.text)
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
        if job.finished:  # the exit event and every line before it have been read
            self._job = None
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
        if self.busy():
            return
        if self.ensureDependencies(force_message=True):
            self.setStatus("All Python packages AnatSSL needs are installed.")

    def ensureDependencies(self, force_message: bool = False) -> bool:
        """Offer to install what is missing (torch through the PyTorch extension); True when all present.

        While installing, every button that starts work is disabled (``pip_install`` processes events,
        so a second click would otherwise start a second install)."""
        def status(text):
            self.setStatus(text)

        self._installing = True
        self.updateGUIFromState()
        try:
            return self.logic.ensureDependencies(force_message=force_message, status=status)
        finally:
            self._installing = False
            self.updateGUIFromState()


#
# AnatSSLLogic
#

_SHARED_LOGIC = None


class AnatSSLLogic(ScriptedLoadableModuleLogic):
    """Node <-> library conversions and the tools on ``slicer.mrmlScene``; usable from the Python console
    and batch scripts without the widget. Each method delegates to ``AnatSSLBridge`` (see its docstrings
    for frames and shapes: images and points in the library are LPS, nodes are RAS).

    The module widget and the Segment Editor effect share one instance (:meth:`shared`). Every tool
    runs in one long-lived worker process (``AnatSSLBridge.workerclient.ToolWorker``) that keeps the
    loaded encoders, embeddings and the search index between requests; this process only reads the
    nodes before a request and writes them after it, and imports neither torch nor MONAI.

    ``start*`` methods send a request and return at once; ``finished(result, error)`` is called from
    :meth:`poll` (the widget and the effect poll from a ``qt.QTimer``). The blocking methods
    (:meth:`propagateLandmarks`, :meth:`transferSegmentation`, ...) wait for the answer (batch use).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.worker = None
        self._files = None
        self._installingDependencies = False
        self.indexInfo = {"encoder_id": None, "volumes": [], "entries": 0}
        self.resultsTable = None
        self.lastDevice = ""

    @classmethod
    def shared(cls) -> "AnatSSLLogic":
        """The one logic of this Slicer session (the module widget and the Segment Editor effect use it)."""
        global _SHARED_LOGIC
        if _SHARED_LOGIC is None:
            _SHARED_LOGIC = cls()
        return _SHARED_LOGIC

    def getParameterNode(self) -> AnatSSLParameterNode:
        return AnatSSLParameterNode(super().getParameterNode())

    # ---- encoders (read from the cache on disk: no weights are loaded in this process) -----------
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

    def encoderSpatialDims(self, encoderId: str = "") -> int | None:
        """The encoder's dimensionality from its manifest (None when unknown: the worker checks again)."""
        try:
            cache = self.cache()
            eid = cache.resolve(encoderId) if encoderId else cache.default_encoder_id()
            return int(cache.manifest(eid).spatial_dims) if eid else None
        except Exception:
            return None

    def importEncoder(self, path: str) -> str:
        return self.cache().import_(path)

    def resetEncoders(self) -> None:
        """The cache folder changed. Nothing to drop here: no encoder is loaded in this process, and every
        request names its cache folder, so the worker loads the new folder's encoders on their first use."""
        self.indexInfo = dict(self.indexInfo)

    def deviceDescription(self) -> str:
        return self.lastDevice

    # ---- the worker process ---------------------------------------------------------------------
    def toolWorker(self):
        """The worker process client (started on the first request)."""
        if self.worker is None:
            workerclient = _bridge_module("workerclient")
            self.worker = workerclient.ToolWorker()
            self._files = workerclient.VolumeFiles(os.path.join(self.worker.folder, "volumes"))
        return self.worker

    def busy(self) -> bool:
        return self.worker is not None and self.worker.busy

    def fraction(self) -> float:
        return self.worker.fraction if self.worker is not None else 0.0

    def taskTitle(self) -> str:
        request = self.worker.request if self.worker is not None else None
        return request.title if request is not None else ""

    def poll(self) -> bool:
        """Deliver the running request's end (True when it ended): call from a timer on the main thread."""
        return bool(self.worker is not None and self.worker.poll())

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the running request ended (batch use and tests)."""
        return bool(self.worker is not None and self.worker.wait(timeout))

    def cancel(self, reason: str = "cancelled") -> bool:
        """Cancel the running request (True if there was one); its answer arrives within a second."""
        return bool(self.worker is not None and self.worker.cancel(reason))

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def workerArgs(self, encoderId: str, device: str, contrast: str = "auto") -> dict:
        """What every tool request carries; ``contrast`` only when the user overrode "auto"."""
        args = {"encoder": encoderId or "", "cache_dir": cacheFolderSetting() or "", "device": device or "auto"}
        if contrast and contrast != "auto":
            args["contrast"] = contrast
        return args

    def volumeMessage(self, node) -> dict:
        """The node's voxels as a file for the worker (written again only when the node changed)."""
        self.toolWorker()
        imageData = node.GetImageData()
        transform = node.GetParentTransformNode()
        key = (node.GetMTime(), imageData.GetMTime() if imageData is not None else 0,
               transform.GetMTime() if transform is not None else 0)
        return self._files.message(node.GetID(), key, lambda: self.imageFromVolume(node), name=node.GetName())

    def imageMessage(self, slot: str, image) -> dict:
        """An image (a label map, a mask) as a file for the worker, written every time."""
        self.toolWorker()
        return self._files.message(slot, None, image)

    def _submit(self, op: str, args: dict, title: str, done, finished):
        """Send ``op``; its answer goes through ``done(result) -> value`` to ``finished(value, error)``."""
        worker = self.toolWorker()

        def delivered(result, error):
            self.lastDevice = worker.last_device or self.lastDevice
            if error is not None:
                if finished is not None:
                    finished(None, error)
                return
            try:
                value = done(result, worker.last_note)
            except Exception as exc:
                if finished is None:
                    raise
                finished(None, exc)
                return
            if finished is not None:
                finished(value, None)

        return worker.submit(op, args, title, delivered)

    def _blocking(self, start, *args, timeout: float | None = None, **kwargs):
        box = {}
        start(*args, finished=lambda value, error: box.update(value=value, error=error), **kwargs)
        self.wait(timeout)
        if box.get("error") is not None:
            raise box["error"]
        return box.get("value")

    # ---- device and errors ----------------------------------------------------------------------
    @staticmethod
    def isOutOfMemory(error) -> bool:
        return bool(getattr(error, "oom", False)) or "out of memory" in str(error).lower()

    def describeError(self, error) -> str:
        if self.isOutOfMemory(error):
            return ("the GPU ran out of memory. Choose CPU as device (Encoder and device), close other GPU programs, "
                    "or use smaller volumes.")
        return str(error) or type(error).__name__

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

    # ---- landmarks ------------------------------------------------------------------------------
    def startPropagation(self, referenceVolume, referenceLandmarks, targetVolumes, encoderId: str = "",
                         device: str = "auto", lowConfidence: float = 0.5, contrast: str = "auto", finished=None):
        """Check and read the inputs here, locate the points in the worker, write one markups node and table
        per target when the answer arrives: ``finished(([LandmarkResult], note), error)``."""
        import numpy as np
        from AnatSSLLib.points import PointSet

        landmarks = _bridge_module("landmarks")
        scene = slicer.mrmlScene
        plan = landmarks.prepare_landmarks(scene, referenceVolume, referenceLandmarks, list(targetVolumes),
                                           self.encoderSpatialDims(encoderId), read_images=False)
        points = plan["points"]
        args = self.workerArgs(encoderId, device, contrast)
        args.update(reference=self.volumeMessage(referenceVolume), labels=list(points.labels),
                    positions=np.asarray(points.positions, dtype=float).tolist(), low_confidence=float(lowConfidence),
                    targets=[{"tag": node.GetID(), "image": self.volumeMessage(node)} for node, _ in plan["targets"]])
        nodes = {node.GetID(): node for node, _ in plan["targets"]}

        def done(result, note):
            computed = [(nodes[t["tag"]], PointSet(list(t["labels"]), np.asarray(t["positions"], dtype=float),
                                                   confidence=np.asarray(t["confidence"], dtype=float)),
                         list(t["recomputed"])) for t in result["targets"]]
            return landmarks.write_landmarks(scene, plan, computed, float(lowConfidence)), note

        return self._submit("landmarks", args, "Propagating landmarks", done, finished)

    def propagateLandmarks(self, referenceVolume, referenceLandmarks, targetVolumes, encoderId: str = "",
                           device: str = "auto", lowConfidence: float = 0.5, contrast: str = "auto"):
        """One markups node and table per target (see ``AnatSSLBridge.landmarks``); blocking."""
        results, _ = self._blocking(self.startPropagation, referenceVolume, referenceLandmarks, targetVolumes,
                                    encoderId=encoderId, device=device, lowConfidence=lowConfidence, contrast=contrast)
        return results

    # ---- segmentation transfer (the Segment Editor effect) -------------------------------------
    def prepareTransfer(self, referenceVolume, referenceSegmentation, targetVolume, outputSegmentation=None,
                        encoderId: str = "", device: str = "auto", segmentIds=None):
        """Check and read the inputs (``AnatSSLBridge.segmentation.TransferPlan``); bad input raises, nothing changes."""
        return _bridge_module("segmentation").prepare_transfer(
            slicer.mrmlScene, referenceVolume, referenceSegmentation, targetVolume, outputSegmentation,
            segment_ids=segmentIds, spatial_dims=self.encoderSpatialDims(encoderId))

    def startTransfer(self, plan, encoderId: str = "", device: str = "auto", contrast: str = "auto", finished=None):
        """Compute the label image in the worker: ``finished((TransferResult, note), error)``; nothing is written."""
        segmentation = _bridge_module("segmentation")
        worker = _bridge_module("worker")
        self.toolWorker()
        out_dir = os.path.join(self.worker.folder, "transfer")
        os.makedirs(out_dir, exist_ok=True)
        args = self.workerArgs(encoderId, device, contrast)
        args.update(reference=self.volumeMessage(plan.reference_volume_node), target=self.volumeMessage(plan.target_volume_node),
                    labels=self.imageMessage("transfer-labels", plan.labels), value_of=dict(plan.value_of),
                    target_name=plan.target_name, out_dir=out_dir)

        def done(result, note):
            labels = worker.image_from_message(result["labels"])
            return segmentation.TransferResult(labels, {k: int(v) for k, v in result["counts"].items()}), note

        return self._submit("segment", args, "Transferring the segmentation", done, finished)

    def writeTransfer(self, plan, result, saveUndoState=None, editorSegmentation=None, checkEditor: bool = False):
        """Write the result (one undo state first); refused if a node left the scene or the editor changed segmentation."""
        kwargs = {"editor_segmentation_node": editorSegmentation} if checkEditor else {}
        return _bridge_module("segmentation").write_transfer(plan, result, save_undo_state=saveUndoState, **kwargs)

    def transferSegmentation(self, referenceVolume, referenceSegmentation, targetVolume, outputSegmentation=None,
                             encoderId: str = "", device: str = "auto", segmentIds=None, saveUndoState=None,
                             contrast: str = "auto"):
        """Fill ``outputSegmentation`` on ``targetVolume`` from the reference segmentation; blocking."""
        plan = self.prepareTransfer(referenceVolume, referenceSegmentation, targetVolume, outputSegmentation,
                                    encoderId, device, segmentIds)
        result, _ = self._blocking(self.startTransfer, plan, encoderId=encoderId, device=device, contrast=contrast)
        return self.writeTransfer(plan, result, saveUndoState=saveUndoState)

    # ---- search ---------------------------------------------------------------------------------
    def hasIndex(self) -> bool:
        return int(self.indexInfo.get("entries") or 0) > 0

    def _indexAnswer(self, result) -> None:
        if result and "index" in result:
            self.indexInfo = dict(result["index"])

    def startIndexing(self, volumeNodes=None, folder: str | None = None, encoderId: str = "", device: str = "auto",
                      finished=None):
        """Add loaded volumes (under their node names) or every volume file of ``folder`` to the worker's index."""
        from AnatSSLLib.errors import InputError

        args = self.workerArgs(encoderId, device)
        if folder:
            args["folder"] = str(folder)
        else:
            nodes = list(volumeNodes or [])
            if not nodes:
                raise InputError("no volumes to index: load volumes or choose a folder")
            check = _bridge_module("landmarks").check_volume_node
            dims = self.encoderSpatialDims(encoderId)
            for node in nodes:
                check(node, "volume to index", dims)
            names = [node.GetName() for node in nodes]
            if len(set(names)) != len(names):
                raise InputError(f"volumes to index: names must differ, got {names}; rename the volumes first")
            args["volumes"] = [{"name": node.GetName(), "image": self.volumeMessage(node)} for node in nodes]

        def done(result, note):
            self._indexAnswer(result)
            return result

        def finishedAndRefresh(value, error):
            if error is not None:  # cancelled between volumes: those added are kept; a killed worker kept none
                partial = getattr(error, "partial", None)
                if partial:
                    self._indexAnswer(partial)
                elif not self.worker.running:
                    self.indexInfo = {"encoder_id": None, "volumes": [], "entries": 0}
            if finished is not None:
                finished(value, error)

        return self._submit("index_add", args, "Indexing volumes", done, finishedAndRefresh)

    def indexLoadedVolumes(self, encoderId: str = "", device: str = "auto") -> list[str]:
        """Index every loaded image volume (blocking); returns the names added."""
        return self._blocking(self.startIndexing, self.imageVolumes(), None, encoderId=encoderId, device=device)["added"]

    def describeIndex(self) -> str:
        names = list(self.indexInfo.get("volumes") or [])
        if not self.hasIndex():
            return "No index yet."
        return f"{len(names)} volume(s) indexed ({self.indexInfo.get('entries')} places): " + ", ".join(names[:6]) + \
            (", ..." if len(names) > 6 else "")

    def startOpenIndex(self, folder: str, finished=None):
        return self._submit("index_open", {"folder": str(folder)}, "Opening the index",
                            lambda result, note: self._indexAnswer(result) or result, finished)

    def startSaveIndex(self, folder: str, finished=None):
        return self._submit("index_save", {"folder": str(folder)}, "Saving the index",
                            lambda result, note: self._indexAnswer(result) or result, finished)

    def openIndex(self, folder: str) -> None:
        self._blocking(self.startOpenIndex, folder)

    def saveIndex(self, folder: str):
        return self._blocking(self.startSaveIndex, folder)["path"]

    def startSearch(self, kind: str, volumeNode, pointsNode=None, segmentationNode=None, segmentId: str = "",
                    k: int = 10, encoderId: str = "", device: str = "auto", finished=None):
        """Read the query here (``"point"``: the last point of ``pointsNode``; ``"segment"``; ``"volume"``),
        look it up in the worker, fill the results table: ``finished((hits, query, table node), error)``."""
        import numpy as np
        from AnatSSLLib.errors import InputError
        from AnatSSLLib.index import SearchHit

        search = _bridge_module("search")
        if not self.hasIndex():
            raise InputError("there is no index (or it is empty): build one (Index loaded volumes / Index a folder) "
                             "or open one first")
        dims = self.encoderSpatialDims(encoderId)
        if kind == "point":
            if pointsNode is None:
                raise InputError("no query point list: choose (or create) one and click the query point")
            query = search.point_query(volumeNode, pointsNode, spatial_dims=dims)
        elif kind == "segment":
            query = search.segment_query(slicer.mrmlScene, volumeNode, segmentationNode, segmentId, spatial_dims=dims)
        elif kind == "volume":
            query = search.volume_query(volumeNode, spatial_dims=dims)
        else:
            raise InputError(f"query kind: expected 'point', 'segment' or 'volume', got {kind!r}")
        args = self.workerArgs(encoderId, device)
        args.update(kind=kind, image=self.volumeMessage(volumeNode), k=int(k),
                    point_lps=None if query.point_lps is None else np.asarray(query.point_lps, dtype=float).tolist(),
                    mask=self.imageMessage("search-mask", query.mask) if query.mask is not None else None)

        def done(result, note):
            hits = [SearchHit(h["volume"], None if h["position"] is None else np.asarray(h["position"], dtype=float),
                              float(h["score"]), h.get("path") or "") for h in result["hits"]]
            return hits, query, self.showHits(hits)

        return self._submit("search", args, "Searching", done, finished)

    def search(self, kind: str, volumeNode, **kwargs):
        """Blocking :meth:`startSearch`: ``(hits, query, table node)``."""
        return self._blocking(self.startSearch, kind, volumeNode, **kwargs)

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

    def pretrainJob(self, data, device: str, recipe: str = "", batchSize: int = 2, name: str | None = None):
        """A :class:`AnatSSLBridge.jobs.PretrainJob` (not started) running ``recipe`` (``AnatSSLLib.recipes``;
        "" = the first, the bundled default's) into the module's encoder cache."""
        return _bridge_module("jobs").PretrainJob.from_recipe(
            recipe or recipes()[0].name, data=data, cache_dir=cacheFolderSetting() or self.defaultCacheFolder(),
            device=device, batch_size=batchSize, name=name)

    # ---- dependencies ---------------------------------------------------------------------------
    def ensureDependencies(self, force_message: bool = False, status=None) -> bool:
        """Offer to install what is missing (torch through the PyTorch extension); True when all present.

        Shared by the module and the Segment Editor effect. Refuses to start a second install while one
        runs (``pip_install`` processes Qt events, so a second click could arrive meanwhile).
        """
        dependencies = _bridge_module("dependencies")
        if self._installingDependencies:
            if status is not None:
                status("The Python packages are being installed; wait until it has finished.")
            return False
        plan = dependencies.install_plan()
        if plan.empty:
            if force_message:
                slicer.util.infoDisplay("All Python packages AnatSSL needs are installed.")
            return True
        if not slicer.util.confirmOkCancelDisplay(plan.describe(), windowTitle="AnatSSL: install Python packages"):
            if status is not None:
                status("Python packages not installed: the tools cannot run without them "
                       "(Advanced tab > Check / install Python packages).")
            return False
        self._installingDependencies = True
        try:
            with slicer.util.WaitCursor():
                self.installDependencies(plan)
        except Exception as exc:
            slicer.util.errorDisplay(f"Installing the Python packages failed:\n{exc}\n\nCheck the internet connection "
                                     "(or a proxy), then try again from the Advanced tab.")
            return False
        finally:
            self._installingDependencies = False
        if self.worker is not None:  # a worker started before the install cannot see the new packages
            self.worker.stop()
            self.worker = None
        return dependencies.install_plan().empty

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
    """A sub-module of the bridge (``landmarks``, ``search``, ``segmentation``, ``jobs``, ``dependencies``,
    ``workerclient``, ``worker``)."""
    return importlib.import_module(f"AnatSSLBridge.{name}")
