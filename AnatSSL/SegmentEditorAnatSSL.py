"""Hidden module that registers the "AnatSSL cross-modality" Segment Editor effect on start-up."""

from __future__ import annotations

import os

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

_HERE = os.path.dirname(os.path.abspath(__file__))


class SegmentEditorAnatSSL(ScriptedLoadableModule):
    """Registers the effect; shows nothing in the module list."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SegmentEditorAnatSSL"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["AnatSSL developers"]
        self.parent.hidden = True
        self.parent.helpText = "Registers the AnatSSL cross-modality effect in the Segment Editor."
        self.parent.acknowledgementText = "See the AnatSSL module."
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self) -> None:
        import qSlicerSegmentationsEditorEffectsPythonQt as qSlicerSegmentationsEditorEffects

        instance = qSlicerSegmentationsEditorEffects.qSlicerSegmentEditorScriptedEffect(None)
        effectFilename = os.path.join(_HERE, "SegmentEditorAnatSSLLib", "SegmentEditorEffect.py")
        instance.setPythonSource(effectFilename.replace("\\", "/"))
        instance.self().register()


class SegmentEditorAnatSSLTest(ScriptedLoadableModuleTest):
    """The effect's logic is tested through the AnatSSL self-test (Testing/Python/AnatSSLSelfTest.py)."""

    def runTest(self):
        slicer.mrmlScene.Clear(0)
        self.delayDisplay("The AnatSSL effect is tested by AnatSSLSelfTest")
