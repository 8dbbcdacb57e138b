"""Render Resources/UI/AnatSSL.ui with PyQt5 (offscreen), Slicer's custom widgets replaced by their nearest
Qt classes, and fail if it does not load. Skips without PyQt5 (``pip install PyQt5``: the ``ui`` test extra).

``python Testing/test_ui_render.py docs`` also writes one picture per panel (docs/panel-*.png) with
example content, the screenshots shown in the README.
"""

from __future__ import annotations

import io
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UI = ROOT / "Resources" / "UI" / "AnatSSL.ui"

#: Slicer/CTK class -> nearest Qt class (property renames: ctkCollapsibleButton's text is a group box title).
REPLACEMENTS = {
    "qMRMLWidget": "QWidget",
    "ctkCollapsibleButton": "QGroupBox",
    "ctkPathLineEdit": "QLineEdit",
    "qMRMLNodeComboBox": "QComboBox",
    "qMRMLCheckableNodeComboBox": "QComboBox",
    "qMRMLSegmentSelectorWidget": "QComboBox",
    "qSlicerMarkupsPlaceWidget": "QToolButton",
    "qMRMLTableView": "QTableWidget",
}
#: Properties the Qt stand-ins understand (Slicer-only ones such as nodeTypes are dropped).
KEEP = {"text", "title", "toolTip", "wordWrap", "checked", "enabled", "readOnly", "placeholderText", "minimum",
        "maximum", "value", "decimals", "singleStep", "currentIndex", "geometry", "orientation", "sizeHint",
        "minimumSize", "SlicerParameterName"}


def qt_compatible_ui(path: Path = UI) -> str:
    """The .ui text with custom widgets replaced and Slicer-only properties and connections removed."""
    root = ET.parse(path).getroot()
    for widget in root.iter("widget"):
        cls = widget.get("class")
        if cls == "ctkCollapsibleButton":
            for prop in widget.findall("property"):
                if prop.get("name") == "text":
                    prop.set("name", "title")
        widget.set("class", REPLACEMENTS.get(cls, cls))
        for prop in list(widget.findall("property")):
            if prop.get("name") not in KEEP:
                widget.remove(prop)
    for tag in ("customwidgets", "connections"):
        for element in root.findall(tag):
            root.remove(element)
    return ET.tostring(root, encoding="unicode")


def load_panel(app_args=("anatssl-render",)):
    """``(QApplication, top widget)`` of the .ui loaded with PyQt5 (offscreen unless a display is set)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PyQt5 import QtWidgets, uic

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(list(app_args))
    widget = uic.loadUi(io.StringIO(qt_compatible_ui()))
    return app, widget


EXAMPLES = {
    "encoderSelector": ["MNI brain LD (ld, 3D, bundled)"],
    "deviceSelector": ["Auto (GPU if available)", "CPU", "GPU (CUDA)"],
    "referenceVolumeSelector": ["sub-01 T1"],
    "referenceLandmarksSelector": ["reference landmarks"],
    "targetVolumesSelector": ["sub-02 T1, sub-03 T1"],
    "searchVolumeSelector": ["sub-01 T1"],
    "searchPointsSelector": ["query point"],
    "searchSegmentSelector": ["Segmentation: left hippocampus"],
    "recipeSelector": ["default: the recipe of the bundled default encoder (about 1.5 mm landmark error on T1 in our benchmarks)"],
    "contrastSelector": ["auto (recommended)", "same contrast as the reference", "map targets into the reference's contrast"],
}
TABLES = {
    "landmarksTableView": (["label", "R", "A", "S", "confidence", "low confidence"],
                           [["AC", "0.4", "2.1", "-4.8", "0.91", "no"], ["PC", "0.2", "-25.0", "-2.9", "0.87", "no"],
                            ["culmen", "0.9", "-41.3", "-30.2", "0.42", "yes"]]),
    "searchResultsTableView": (["rank", "volume", "R", "A", "S", "score"],
                               [["1", "sub-02 T1", "-3.0", "4.5", "-1.2", "0.94"],
                                ["2", "sub-03 T1", "-2.1", "3.0", "-0.6", "0.91"]]),
}


def fill_examples(widget) -> None:
    """Example content so a picture shows what a user sees while working."""
    from PyQt5 import QtWidgets

    for name, items in EXAMPLES.items():
        combo = widget.findChild(QtWidgets.QComboBox, name)
        combo.clear()
        combo.addItems(items)
    for name, (columns, rows) in TABLES.items():
        table = widget.findChild(QtWidgets.QTableWidget, name)
        table.setColumnCount(len(columns))
        table.setHorizontalHeaderLabels(columns)
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, value in enumerate(row):
                table.setItem(r, c, QtWidgets.QTableWidgetItem(value))
        table.resizeColumnsToContents()
    for name, text in (("landmarksPlaceWidget", "Place points"), ("searchPlaceWidget", "Place point")):
        widget.findChild(QtWidgets.QToolButton, name).setText(text)
    widget.findChild(QtWidgets.QLineEdit, "cacheFolderPathLineEdit").setText("~/.cache/anatssl/encoders")
    widget.findChild(QtWidgets.QLabel, "recipeInfoLabel").setText(
        "Expected time: about 32 min on a 2-core CPU for 20 volumes at 2 mm (longer with more or larger volumes).")
    widget.findChild(QtWidgets.QLabel, "deviceInfoLabel").setText("Runs on: NVIDIA RTX A4000, 16 GB (cuda:0)")
    widget.findChild(QtWidgets.QLabel, "indexStatusLabel").setText("3 volume(s) indexed (41 250 places): sub-01 T1, sub-02 T1, sub-03 T1")
    widget.findChild(QtWidgets.QLabel, "landmarksResultLabel").setText(
        "2 target(s) updated; 6 point(s) located, the rest reused; 1 low-confidence point(s) marked.")
    log = widget.findChild(QtWidgets.QPlainTextEdit, "pretrainLogTextEdit")
    log.setPlainText("Started ld: 1200 steps on cuda:0\nld: step 200 of 1200, loss 2.914\nld: checkpoint saved at step 200 (a cancelled run resumes from here)\nld: step 400 of 1200, loss 2.351")
    widget.findChild(QtWidgets.QProgressBar, "progressBar").setValue(35)
    widget.findChild(QtWidgets.QLabel, "statusLabel").setText("Pretraining ld: step 420 of 1200, loss 2.317")


PANELS = ["landmarks", "segmentation", "search", "advanced"]


def render_panels(out_dir: Path, width: int = 420) -> list[Path]:
    """Save docs/panel-<tab>.png for every tab; returns the paths."""
    from PyQt5 import QtWidgets

    app, widget = load_panel()
    fill_examples(widget)
    tabs = widget.findChild(QtWidgets.QTabWidget, "toolsTabWidget")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, name in enumerate(PANELS):
        tabs.setCurrentIndex(index)
        widget.resize(width, 100)
        widget.adjustSize()
        widget.resize(width, widget.sizeHint().height())
        app.processEvents()
        path = out_dir / f"panel-{name}.png"
        tmp = path.with_suffix(".tmp.png")
        assert widget.grab().save(str(tmp), "PNG"), path
        os.replace(tmp, path)
        paths.append(path)
    return paths


def test_ui_loads_with_qt_and_has_the_four_panels(tmp_path):
    pytest.importorskip("PyQt5.uic")
    from PyQt5 import QtWidgets

    _, widget = load_panel()
    tabs = widget.findChild(QtWidgets.QTabWidget, "toolsTabWidget")
    assert [tabs.tabText(i) for i in range(tabs.count())] == ["Landmarks", "Segmentation", "Search", "Advanced"]
    for name in ("propagateButton", "searchButton", "pretrainButton", "cancelButton", "openSegmentEditorButton"):
        assert widget.findChild(QtWidgets.QPushButton, name) is not None, name
    kinds = [widget.findChild(QtWidgets.QRadioButton, f"query{k}RadioButton") for k in ("Point", "Segment", "Volume")]
    assert [k.text() for k in kinds] == ["point", "segment", "whole volume"] and kinds[0].isChecked()
    paths = render_panels(tmp_path)
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path


if __name__ == "__main__":
    for written in render_panels(ROOT / (sys.argv[1] if len(sys.argv) > 1 else "docs")):
        print(written)
