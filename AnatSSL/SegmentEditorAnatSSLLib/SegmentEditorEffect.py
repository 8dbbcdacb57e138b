"""Segment Editor effect "AnatSSL cross-modality": fill segments from a segmentation of another volume.

With the Segment Editor's current segmentation and source volume (e.g. a T2 or CT), choose a reference
volume (e.g. the T1) and its segmentation; Apply transfers the reference segments through the AnatSSL
encoder (``AnatSSLLib.tools.segmentation.CrossModalitySegmenter``). Segments of the same name are
filled in place (name and colour kept), new ones take the reference name and colour, the user's other
segments are untouched, and one Undo reverts the whole Apply.

Apply first offers to install missing Python packages (the module's own check), then runs in three
steps (``AnatSSLBridge.segmentation``, Qt-free and tested on slicer-core): the inputs are checked
and read here (``prepare_transfer``), the segmentation is computed in the AnatSSL tool worker
process (``compute_transfer`` there, via ``AnatSSLLogic.startTransfer``) while a progress bar and
Cancel show in the options panel, and the result is written back on the main thread with one undo
state (``write_transfer``), unless the run was cancelled, the scene closed, the segmentation or the
source volume was removed, or the editor switched to another segmentation meanwhile.

The effect uses the module's logic (``AnatSSLLogic.shared()``): one worker process, so encoders
and embeddings are loaded once for the module and the effect, and the cache folder chosen in the
module applies here too.
"""

from __future__ import annotations

import logging
import os

import qt
import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

REFERENCE_VOLUME = "AnatSSL.ReferenceVolume"
REFERENCE_SEGMENTATION = "AnatSSL.ReferenceSegmentation"
TITLE = "Transferring the segmentation"


def _logic():
    """The AnatSSL module's logic: the same instance (and worker process) as the module widget."""
    import AnatSSL

    return AnatSSL.AnatSSLLogic.shared()


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Transfers a reference segmentation to the source volume by embedding matching."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "AnatSSL cross-modality"
        scriptedEffect.perSegment = False
        scriptedEffect.requireSegments = False
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self._request = None  # the running Apply's request to the worker process (one at a time)
        self._plan = None  # the running Apply's TransferPlan (its nodes are watched while it runs)
        self._timer = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        here = os.path.dirname(os.path.abspath(__file__))
        for base in (os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
            path = os.path.join(base, "Resources", "Icons", "AnatSSL.png")
            if os.path.exists(path):
                return qt.QIcon(path)
        return qt.QIcon()

    def helpText(self):
        return ("<html>Transfer a segmentation from another volume of the same patient or anatomy (for example "
                "from the T1 to this T2 or CT).<p>Choose the reference volume and its segmentation, then Apply. "
                "It runs in a background process (Slicer stays usable; Cancel stops it). Segments with the same name are "
                "filled in (name and colour kept); your other segments are not changed; Undo reverts the whole "
                "transfer.</html>")

    def setupOptionsFrame(self):
        form = qt.QFormLayout()
        self.referenceVolumeSelector = slicer.qMRMLNodeComboBox()
        self.referenceVolumeSelector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.referenceVolumeSelector.showChildNodeTypes = False  # no label maps
        self.referenceVolumeSelector.noneEnabled = True
        self.referenceVolumeSelector.addEnabled = False
        self.referenceVolumeSelector.removeEnabled = False
        self.referenceVolumeSelector.setMRMLScene(slicer.mrmlScene)
        self.referenceVolumeSelector.toolTip = ("The volume the reference segmentation was drawn on (e.g. the T1); "
                                                "not the source volume.")
        form.addRow("Reference volume:", self.referenceVolumeSelector)

        self.referenceSegmentationSelector = slicer.qMRMLNodeComboBox()
        self.referenceSegmentationSelector.nodeTypes = ["vtkMRMLSegmentationNode"]
        self.referenceSegmentationSelector.noneEnabled = True
        self.referenceSegmentationSelector.addEnabled = False
        self.referenceSegmentationSelector.removeEnabled = False
        self.referenceSegmentationSelector.setMRMLScene(slicer.mrmlScene)
        self.referenceSegmentationSelector.toolTip = "Segments drawn on the reference volume; all are transferred."
        form.addRow("Reference segmentation:", self.referenceSegmentationSelector)

        self.progressBar = qt.QProgressBar()
        self.progressBar.setRange(0, 100)
        self.progressBar.visible = False
        form.addRow(self.progressBar)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        form.addRow(self.statusLabel)
        buttons = qt.QHBoxLayout()
        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.toolTip = "Fill the segments of the current segmentation on the source volume."
        buttons.addWidget(self.applyButton)
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.toolTip = "Stop the transfer; the segmentation is not changed."
        self.cancelButton.enabled = False
        buttons.addWidget(self.cancelButton)
        form.addRow(buttons)
        self.scriptedEffect.addOptionsWidget(form)

        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self.onTimer)

        self.referenceVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateMRMLFromGUI)
        self.referenceSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateMRMLFromGUI)
        self.applyButton.connect("clicked()", self.onApply)
        self.cancelButton.connect("clicked()", self.onCancel)

    def setMRMLDefaults(self):
        pass  # node references start empty

    def busy(self) -> bool:
        return self._request is not None

    def updateGUIFromMRML(self):
        node = self.scriptedEffect.parameterSetNode()
        if node is None:
            return
        for selector, role in ((self.referenceVolumeSelector, REFERENCE_VOLUME),
                               (self.referenceSegmentationSelector, REFERENCE_SEGMENTATION)):
            wasBlocked = selector.blockSignals(True)
            selector.setCurrentNode(node.GetNodeReference(role))
            selector.blockSignals(wasBlocked)
        ready = (self.referenceVolumeSelector.currentNode() is not None
                 and self.referenceSegmentationSelector.currentNode() is not None
                 and node.GetSourceVolumeNode() is not None)
        busy = self.busy()
        self.applyButton.enabled = ready and not busy
        self.cancelButton.enabled = busy
        if busy:
            self.applyButton.toolTip = "A transfer is running: wait for it or press Cancel."
        elif ready:
            self.applyButton.toolTip = "Fill the segments of the current segmentation on the source volume."
        else:
            self.applyButton.toolTip = "Choose the source volume, a reference volume and its segmentation first."

    def updateMRMLFromGUI(self, *args):
        node = self.scriptedEffect.parameterSetNode()
        if node is None:
            return
        for selector, role in ((self.referenceVolumeSelector, REFERENCE_VOLUME),
                               (self.referenceSegmentationSelector, REFERENCE_SEGMENTATION)):
            current = selector.currentNode()
            node.SetNodeReferenceID(role, current.GetID() if current else None)
        self.updateGUIFromMRML()

    # ---- Apply: prepare here, compute in the worker process, write here with one undo state ---------
    def onApply(self):
        import AnatSSL

        if self.busy():  # the button is disabled while running; a second click (or a script) is refused
            self.statusLabel.text = "A transfer is already running: wait for it to finish or press Cancel."
            return
        node = self.scriptedEffect.parameterSetNode()
        if node is None:
            return
        logic = _logic()
        if logic.busy():
            self.statusLabel.text = "AnatSSL is busy with another request (see its module): wait or cancel it there."
            return
        self.applyButton.enabled = False  # the install below processes events: no second Apply meanwhile
        try:
            ready = logic.ensureDependencies(status=self._setStatus)
        finally:
            self.updateGUIFromMRML()
        if not ready:
            return
        segmentationNode = node.GetSegmentationNode()
        target = node.GetSourceVolumeNode()
        reference = self.referenceVolumeSelector.currentNode()
        referenceSegmentation = self.referenceSegmentationSelector.currentNode()
        state = logic.getParameterNode()
        encoderId, contrast = state.encoderId, state.contrast or "auto"
        device = AnatSSL.deviceSetting()
        try:
            with slicer.util.WaitCursor():
                plan = logic.prepareTransfer(reference, referenceSegmentation, target, segmentationNode,
                                             encoderId=encoderId, device=device)
                self._request = logic.startTransfer(plan, encoderId, device, contrast=contrast,
                                                    finished=self._onFinished)
        except Exception as exc:
            self._showError(exc)
            return
        self._plan = plan
        self.progressBar.value = 0
        self.progressBar.visible = True
        self.statusLabel.text = "Transferring the segmentation in the background (Slicer stays usable; Cancel stops it)..."
        self._timer.start()
        self.updateGUIFromMRML()

    def _setStatus(self, text):
        self.statusLabel.text = text

    def onCancel(self):
        if self.busy():
            _logic().cancel("cancelled")
            self.statusLabel.text = "Cancelling: the segmentation will not be changed..."

    def onTimer(self):
        if not self.busy():
            self._stopped()
            return
        logic = _logic()
        self.progressBar.value = int(100 * logic.fraction())
        plan = self._plan
        if plan is not None and any(n is not None and n.GetScene() is None
                                    for n in (plan.target_volume_node, plan.output_segmentation_node)):
            logic.cancel("the scene was closed, or the segmentation or source volume was removed")
        try:
            logic.poll()  # calls self._onFinished on this (the main) thread when the worker has answered
        except Exception as exc:  # writing failed: shown, never a traceback for a user error
            self._showError(exc)
        if not self.busy():
            self._stopped()

    def _stopped(self):
        if self._timer is not None:
            self._timer.stop()
        self._plan = None
        self.progressBar.visible = False
        self.updateGUIFromMRML()

    def _onFinished(self, result, error):
        """Main thread: write the result with one undo state, or report why not."""
        import AnatSSL

        plan, self._plan, self._request = self._plan, None, None
        if isinstance(error, AnatSSL._bridge_module("jobs").TaskCancelled):
            self.statusLabel.text = f"Not applied: {error}."
            return
        if error is not None:
            self._showError(error)
            return
        transfer, note = result
        node = self.scriptedEffect.parameterSetNode()
        editorSegmentation = node.GetSegmentationNode() if node is not None else None
        _, counts = _logic().writeTransfer(plan, transfer, saveUndoState=self.scriptedEffect.saveStateForUndo,
                                           editorSegmentation=editorSegmentation, checkEditor=True)
        found = [name for name, count in counts.items() if count]
        missing = [name for name, count in counts.items() if not count]
        self.statusLabel.text = (f"Filled {len(found)} segment(s)" +
                                 (f"; not found: {', '.join(missing)}" if missing else "") + "." +
                                 (f" {note}" if note else "") + " Undo reverts it.")

    def _showError(self, error):
        import AnatSSL

        logic = _logic()
        message = logic.describeError(error)
        self.statusLabel.text = f"Not applied: {message}"
        if isinstance(error, AnatSSL.AnatSSLError) or logic.isOutOfMemory(error):
            slicer.util.errorDisplay(f"AnatSSL cross-modality segmentation: not applied.\n{message}")
        else:
            logging.exception("AnatSSL cross-modality segmentation failed", exc_info=error)
            slicer.util.errorDisplay(f"AnatSSL cross-modality segmentation failed:\n{message}",
                                     detailedText=getattr(error, "traceback_text", "") or _traceback(error))

    def cleanup(self):
        """Called when the effect is destroyed: stop watching; a running transfer writes nothing."""
        if self.busy():
            _logic().cancel("the Segment Editor was closed")
        if self._timer is not None:
            self._timer.stop()


def _traceback(error) -> str:
    import traceback

    return "".join(traceback.format_exception(type(error), error, error.__traceback__))
