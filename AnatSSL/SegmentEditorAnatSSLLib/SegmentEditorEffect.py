"""Segment Editor effect "AnatSSL cross-modality": fill segments from a segmentation of another volume.

With the Segment Editor's current segmentation and source volume (e.g. a T2 or CT), choose a reference
volume (e.g. the T1) and its segmentation; Apply transfers the reference segments through the AnatSSL
encoder (``AnatSSLLib.tools.segmentation.CrossModalitySegmenter``). Segments of the same name are
filled in place (name and colour kept), new ones take the reference name and colour, the user's other
segments are untouched, and one Undo reverts the whole Apply. The work is done by the Qt-free bridge
(``AnatSSLBridge.segmentation.transfer_segmentation``), tested on slicer-core.
"""

from __future__ import annotations

import os

import qt
import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

REFERENCE_VOLUME = "AnatSSL.ReferenceVolume"
REFERENCE_SEGMENTATION = "AnatSSL.ReferenceSegmentation"

_LOGIC = None


def _logic():
    """One AnatSSL logic for the effect (keeps the embeddings between Applies)."""
    global _LOGIC
    if _LOGIC is None:
        import AnatSSL

        _LOGIC = AnatSSL.AnatSSLLogic()
    return _LOGIC


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Transfers a reference segmentation to the source volume by embedding matching."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "AnatSSL cross-modality"
        scriptedEffect.perSegment = False
        scriptedEffect.requireSegments = False
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)

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
                "Segments with the same name are filled in (name and colour kept); your other segments are not "
                "changed; Undo reverts the whole transfer.</html>")

    def setupOptionsFrame(self):
        form = qt.QFormLayout()
        self.referenceVolumeSelector = slicer.qMRMLNodeComboBox()
        self.referenceVolumeSelector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.referenceVolumeSelector.showChildNodeTypes = False
        self.referenceVolumeSelector.noneEnabled = True
        self.referenceVolumeSelector.addEnabled = False
        self.referenceVolumeSelector.removeEnabled = False
        self.referenceVolumeSelector.setMRMLScene(slicer.mrmlScene)
        self.referenceVolumeSelector.toolTip = "The volume the reference segmentation was drawn on (e.g. the T1)."
        form.addRow("Reference volume:", self.referenceVolumeSelector)

        self.referenceSegmentationSelector = slicer.qMRMLNodeComboBox()
        self.referenceSegmentationSelector.nodeTypes = ["vtkMRMLSegmentationNode"]
        self.referenceSegmentationSelector.noneEnabled = True
        self.referenceSegmentationSelector.addEnabled = False
        self.referenceSegmentationSelector.removeEnabled = False
        self.referenceSegmentationSelector.setMRMLScene(slicer.mrmlScene)
        self.referenceSegmentationSelector.toolTip = "Segments drawn on the reference volume; all are transferred."
        form.addRow("Reference segmentation:", self.referenceSegmentationSelector)

        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        form.addRow(self.statusLabel)
        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.toolTip = "Fill the segments of the current segmentation on the source volume."
        form.addRow(self.applyButton)
        self.scriptedEffect.addOptionsWidget(form)

        self.referenceVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateMRMLFromGUI)
        self.referenceSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateMRMLFromGUI)
        self.applyButton.connect("clicked()", self.onApply)

    def setMRMLDefaults(self):
        pass  # node references start empty

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
        self.applyButton.enabled = ready
        self.applyButton.toolTip = ("Fill the segments of the current segmentation on the source volume." if ready else
                                    "Choose the source volume, a reference volume and its segmentation first.")

    def updateMRMLFromGUI(self, *args):
        node = self.scriptedEffect.parameterSetNode()
        if node is None:
            return
        for selector, role in ((self.referenceVolumeSelector, REFERENCE_VOLUME),
                               (self.referenceSegmentationSelector, REFERENCE_SEGMENTATION)):
            current = selector.currentNode()
            node.SetNodeReferenceID(role, current.GetID() if current else None)
        self.updateGUIFromMRML()

    def onApply(self):
        import AnatSSL

        node = self.scriptedEffect.parameterSetNode()
        segmentationNode = node.GetSegmentationNode()
        target = node.GetSourceVolumeNode()
        reference = self.referenceVolumeSelector.currentNode()
        referenceSegmentation = self.referenceSegmentationSelector.currentNode()
        logic = _logic()
        encoderId = logic.getParameterNode().encoderId
        device = AnatSSL.deviceSetting()
        self.statusLabel.text = "Transferring the segmentation..."
        note = ""
        try:
            with slicer.util.WaitCursor():
                slicer.app.processEvents()
                try:
                    _, counts = logic.transferSegmentation(
                        reference, referenceSegmentation, target, segmentationNode, encoderId=encoderId, device=device,
                        saveUndoState=self.scriptedEffect.saveStateForUndo)
                except Exception as exc:
                    # the computation runs before the undo state is saved: a GPU out-of-memory error left
                    # the segmentation unchanged, so the CPU can simply try again
                    if device == "cpu" or not logic.isOutOfMemory(exc):
                        raise
                    note = " The GPU ran out of memory; the CPU was used instead."
                    _, counts = logic.transferSegmentation(
                        reference, referenceSegmentation, target, segmentationNode, encoderId=encoderId, device="cpu",
                        saveUndoState=self.scriptedEffect.saveStateForUndo)
        except Exception as exc:
            message = logic.describeError(exc)
            self.statusLabel.text = f"Not applied: {message}"
            slicer.util.errorDisplay(f"AnatSSL cross-modality segmentation failed:\n{message}")
            return
        found = [name for name, count in counts.items() if count]
        missing = [name for name, count in counts.items() if not count]
        self.statusLabel.text = (f"Filled {len(found)} segment(s)" +
                                 (f"; not found: {', '.join(missing)}" if missing else "") + "." + note)
