"""AnatSSL self-test, run inside 3D Slicer (CTest ``py_AnatSSLSelfTest``, or the module's "Reload and Test").

It drives the module logic on ``slicer.mrmlScene`` with data generated in code: volume, markups
and segmentation round trips through the Qt-free bridge, with the geometry checked against what
Slicer computes. pytest never collects this file (it imports ``qt`` through ScriptedLoadableModule);
the same checks run headless in ``Testing/test_mrml_bridge.py``.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for _path in (os.path.join(_REPO, "AnatSSL"), _REPO):  # developer checkout; installed trees are on sys.path
    if os.path.isdir(_path) and _path not in sys.path:
        sys.path.append(_path)


class AnatSSLSelfTest(ScriptedLoadableModuleTest):
    """Round trips of volumes, markups and segmentations through the AnatSSL logic."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_volume_round_trip()
        self.setUp()
        self.test_markups_round_trip()
        self.setUp()
        self.test_segmentation_round_trip()

    # ---- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _logic():
        import AnatSSL

        return AnatSSL.AnatSSLLogic()

    @staticmethod
    def _oblique_image(array):
        from AnatSSLLib.image import Image

        a, b = 0.4, -0.7
        rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
        return Image(array, spacing=(0.8, 1.2, 2.5), origin=(15.0, -22.5, 3.0), direction=rz @ rx, name="selftest")

    # ---- tests ----------------------------------------------------------------------------------
    def test_volume_round_trip(self):
        self.delayDisplay("Volume round trip")
        from AnatSSLLib.image import lps_to_ras

        logic = self._logic()
        image = self._oblique_image(np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7))
        node = logic.volumeFromImage(image, "AnatSSL self-test volume")
        back = logic.imageFromVolume(node)
        np.testing.assert_array_equal(back.array, image.array)
        self.assertTrue(back.same_geometry(image, atol=1e-4))
        ijk_to_ras = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(ijk_to_ras)
        ijk = [6.0, 2.5, 4.0]
        ras = ijk_to_ras.MultiplyPoint([*ijk, 1.0])[:3]
        np.testing.assert_allclose(lps_to_ras(image.index_to_physical(ijk)), ras, atol=1e-4)
        self.delayDisplay("Volume round trip passed")

    def test_markups_round_trip(self):
        self.delayDisplay("Markups round trip")
        from AnatSSLLib.points import PointSet

        logic = self._logic()
        points = PointSet(["A", "B"], [[1.0, 2.0, 3.0], [-4.5, 0.25, 9.0]], ["first", ""], [0.9, 0.25])
        node = logic.markupsFromPoints(points, "AnatSSL self-test points")
        np.testing.assert_allclose(slicer.util.arrayFromMarkupsControlPoints(node), [[-1, -2, 3], [4.5, -0.25, 9]])
        back = logic.pointsFromMarkups(node)
        self.assertEqual(back.labels, ["A", "B"])
        self.assertEqual(back.descriptions, ["first", ""])
        np.testing.assert_allclose(back.positions, points.positions)
        np.testing.assert_allclose(back.confidence, points.confidence)
        self.delayDisplay("Markups round trip passed")

    def test_segmentation_round_trip(self):
        self.delayDisplay("Segmentation round trip")
        logic = self._logic()
        labels = np.zeros((5, 6, 7), np.uint8)
        labels[1:4, 1:4, 1:5] = 2
        labels[3:5, 4:6, 4:7] = 5
        label_image = self._oblique_image(labels)
        reference = logic.volumeFromImage(label_image.with_array(labels.astype(np.int16) * 100), "reference")
        seg = logic.segmentationFromLabelmap(label_image, reference, names={2: "two", 5: "five"})
        self.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), 2)
        self.assertTrue(seg.GetSegmentation().ContainsRepresentation("Closed surface"))
        back, names = logic.labelmapFromSegmentation(seg, reference)
        self.assertEqual(names, {2: "two", 5: "five"})
        np.testing.assert_array_equal(back.array, labels)
        self.assertTrue(back.same_geometry(label_image, atol=1e-4))
        self.delayDisplay("Segmentation round trip passed")
