"""Segment Editor effect "AnatSSL cross-modality": fill segments from a segmentation of another volume.

With the Segment Editor's current segmentation and source volume (e.g. a T2 or CT), choose a reference
volume (e.g. the T1) and its segmentation; Apply transfers the reference segments through the AnatSSL
encoder (``AnatSSLLib.tools.segmentation.CrossModalitySegmenter``). Segments of the same name are
filled in place (name and colour kept), new ones take the reference name and colour, the user's other
segments are untouched, and one Undo reverts the whole Apply.

Apply runs in three steps (``AnatSSLBridge.segmentation``, Qt-free and tested on slicer-core):
the inputs are checked and read here (``prepare_transfer``), the segmentation is computed in a
worker thread (``compute_transfer``, via ``AnatSSLBridge.jobs.TaskRunner``) while a progress bar
and Cancel show in the options panel, and the result is written back on the main thread with one
undo state (``write_transfer``), unless the run was cancelled, the scene closed, the segmentation
or the source volume was removed, or the editor switched to another segmentation meanwhile.
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

_LOGIC = None


def _logic():
    """One AnatSSL logic for the effect (keeps the embeddings between Applies)."""
    global _LOGIC
    if _LOGIC is None:
        import AnatSSL

        _LOGIC = AnatSSL.AnatSSLLogic()
    return _LOGIC


def _jobs():
    import AnatSSL

    return AnatSSL._bridge_module("jobs")


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Transfers a reference segmentation to the source volume by embedding matching."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "AnatSSL cross-modality"
        scriptedEffect.perSegment = False
        scriptedEffect.requireSegments = False
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self._runner = None  # AnatSSLBridge.jobs.TaskRunner: one Apply at a time
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
                "It runs in the background (Slicer stays usable; Cancel stops it). Segments with the same name are "
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
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onTimer)

        self.referenceVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateMRMLFromGUI)
        self.referenceSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateMRMLFromGUI)
        self.applyButton.connect("clicked()", self.onApply)
        self.cancelButton.connect("clicked()", self.onCancel)

    def setMRMLDefaults(self):
        pass  # node references start empty

    def busy(self) -> bool:
        return self._runner is not None and self._runner.busy

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

    # ---- Apply: prepare here, compute in a thread, write here with one undo state --------------------
    def onApply(self):
        import AnatSSL

        if self.busy():  # the button is disabled while running; a second click (or a script) is refused
            self.statusLabel.text = "A transfer is already running: wait for it to finish or press Cancel."
            return
        node = self.scriptedEffect.parameterSetNode()
        if node is None:
            return
        segmentationNode = node.GetSegmentationNode()
        target = node.GetSourceVolumeNode()
        reference = self.referenceVolumeSelector.currentNode()
        referenceSegmentation = self.referenceSegmentationSelector.currentNode()
        logic = _logic()
        encoderId = logic.getParameterNode().encoderId
        device = AnatSSL.deviceSetting()
        try:
            with slicer.util.WaitCursor():
                plan = logic.prepareTransfer(reference, referenceSegmentation, target, segmentationNode,
                                             encoderId=encoderId, device=device)
        except Exception as exc:
            self._showError(exc)
            return

        def work(progress, cancelled):
            return logic.computeTransfer(plan, encoderId, device, progress=progress, cancelled=cancelled)

        if self._runner is None:
            self._runner = _jobs().TaskRunner()
        try:
            self._runner.start(TITLE, work, self._onFinished)
        except Exception as exc:
            self._showError(exc)
            return
        self._plan = plan
        self.progressBar.value = 0
        self.progressBar.visible = True
        self.statusLabel.text = "Transferring the segmentation in the background (Slicer stays usable; Cancel stops it)..."
        self._timer.start()
        self.updateGUIFromMRML()

    def onCancel(self):
        if self.busy():
            self._runner.cancel("cancelled")
            self.statusLabel.text = "Cancelling: the segmentation will not be changed..."

    def onTimer(self):
        if not self.busy():
            self._stopped()
            return
        self.progressBar.value = int(100 * self._runner.fraction)
        plan = self._plan
        if plan is not None and any(n is not None and n.GetScene() is None
                                    for n in (plan.target_volume_node, plan.output_segmentation_node)):
            self._runner.cancel("the scene was closed, or the segmentation or source volume was removed")
        try:
            self._runner.poll()
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
        plan, self._plan = self._plan, None
        if isinstance(error, _jobs().TaskCancelled):
            self.statusLabel.text = f"Not applied: {error}."
            return
        if error is not None:
            self._showError(error)
            return
        (_, transfer), note = result
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
                                     detailedText=_traceback(error))

    def cleanup(self):
        """Called when the effect is destroyed: stop watching; a running transfer writes nothing."""
        if self._runner is not None:
            self._runner.cancel("the Segment Editor was closed")
        if self._timer is not None:
            self._timer.stop()


def _traceback(error) -> str:
    import traceback

    return "".join(traceback.format_exception(type(error), error, error.__traceback__))
