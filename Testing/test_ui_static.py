"""Static checks of the module's Qt layer, without Qt: the .ui file against AnatSSL/AnatSSL.py (ast).

- every ``self.ui.<name>`` the code uses is a widget of Resources/UI/AnatSSL.ui;
- every ``SlicerParameterName`` in the .ui is a field of the ``@parameterNodeWrapper`` class;
- every input widget of the .ui is either bound to the parameter node or used by the code, and every
  push button is connected (``self.ui.<button>.connect("clicked(bool)", ...)``);
- every MRML widget gets the scene (a ``mrmlSceneChanged`` connection in the .ui), and every custom
  widget class used is declared.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UI = ROOT / "Resources" / "UI" / "AnatSSL.ui"
MODULE = ROOT / "AnatSSL" / "AnatSSL.py"

INPUT_CLASSES = {"QPushButton", "QRadioButton", "QComboBox", "QSpinBox", "QDoubleSpinBox", "QLineEdit", "QCheckBox",
                 "ctkPathLineEdit", "qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox", "qMRMLSegmentSelectorWidget",
                 "qSlicerMarkupsPlaceWidget", "qMRMLTableView", "QPlainTextEdit", "QProgressBar"}
MRML_CLASSES = {"qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox", "qMRMLSegmentSelectorWidget",
                "qSlicerMarkupsPlaceWidget", "qMRMLTableView"}


def _ui():
    return ET.parse(UI).getroot()


def _widgets() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in _ui().iter("widget")}


def _bound() -> dict[str, str]:
    out = {}
    for w in _ui().iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                out[w.get("name")] = p.find("string").text
    return out


def _tree() -> ast.Module:
    return ast.parse(MODULE.read_text(encoding="utf-8"))


def _ui_attributes(tree: ast.AST) -> set[str]:
    """Names X in every ``self.ui.X`` expression."""
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def _connected(tree: ast.AST) -> dict[str, list[str]]:
    """``{widget: [signal, ...]}`` for every ``self.ui.<widget>.connect("<signal>", handler)`` call."""
    out: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"
                and isinstance(node.func.value, ast.Attribute)
                and isinstance(node.func.value.value, ast.Attribute) and node.func.value.value.attr == "ui"
                and node.args and isinstance(node.args[0], ast.Constant)):
            out.setdefault(node.func.value.attr, []).append(node.args[0].value)
    return out


def _parameter_fields(tree: ast.AST) -> dict[str, str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            return {s.target.id: ast.unparse(s.annotation) for s in node.body
                    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    raise AssertionError("no @parameterNodeWrapper class in AnatSSL.py")


def test_every_ui_name_used_by_the_code_exists():
    widgets = _widgets()
    used = _ui_attributes(_tree())
    assert len(used) > 30
    assert sorted(used - set(widgets)) == []


def test_every_bound_widget_is_a_parameter_node_field_of_a_fitting_type():
    fields = _parameter_fields(_tree())
    bound = _bound()
    widgets = _widgets()
    assert len(bound) >= 8
    assert sorted(set(bound.values()) - set(fields)) == []
    for widget, field in bound.items():
        kind, annotation = widgets[widget], fields[field]
        if kind == "qMRMLNodeComboBox":
            node_types = [s.text for p in _ui().iter("widget") if p.get("name") == widget
                          for q in p.findall("property") if q.get("name") == "nodeTypes" for s in q.iter("string")]
            assert annotation in node_types, (widget, annotation, node_types)
        elif kind == "QSpinBox":
            assert re.search(r"\bint\b", annotation), (widget, annotation)
        elif kind == "QDoubleSpinBox":
            assert re.search(r"\bfloat\b", annotation), (widget, annotation)
        elif kind == "QLineEdit":
            assert annotation == "str", (widget, annotation)
    # one widget per field: two widgets bound to one field fight each other
    assert len(set(bound.values())) == len(bound)


def test_every_input_widget_is_bound_or_used_and_buttons_are_connected():
    tree = _tree()
    widgets = _widgets()
    used, bound, connected = _ui_attributes(tree), set(_bound()), _connected(tree)
    inputs = {name for name, cls in widgets.items() if cls in INPUT_CLASSES}
    assert sorted(inputs - used - bound) == []
    buttons = {name for name, cls in widgets.items() if cls == "QPushButton"}
    assert len(buttons) >= 10
    unconnected = sorted(b for b in buttons if not any(s.startswith("clicked") for s in connected.get(b, [])))
    assert unconnected == []
    # radio buttons and unbound selectors drive something
    for name, cls in widgets.items():
        if cls in {"QRadioButton", "qMRMLCheckableNodeComboBox", "qMRMLSegmentSelectorWidget", "ctkPathLineEdit"}:
            assert name in connected, name


def test_mrml_widgets_get_the_scene_and_custom_classes_are_declared():
    root = _ui()
    widgets = _widgets()
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml = {name for name, cls in widgets.items() if cls in MRML_CLASSES}
    assert sorted(mrml - receivers) == []
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {cls for cls in widgets.values() if not cls.startswith("Q")}
    assert sorted(used - declared) == []


def test_every_tab_has_help_text_and_every_input_a_label_or_tooltip():
    root = _ui()
    tabs = root.find(".//widget[@class='QTabWidget']")
    for tab in tabs.findall("widget"):
        labels = [w for w in tab.iter("widget") if w.get("class") == "QLabel"]
        assert any(len(w.findtext("property[@name='text']/string") or "") > 60 for w in labels), tab.get("name")
    for w in root.iter("widget"):
        if w.get("class") in INPUT_CLASSES - {"QProgressBar"}:
            has_tip = w.find("property[@name='toolTip']") is not None
            has_text = w.find("property[@name='text']") is not None
            assert has_tip or has_text, w.get("name")


def test_widget_calls_only_logic_methods_that_exist():
    tree = _tree()
    classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    logic = classes["AnatSSLLogic"]
    defined = {n.name for n in logic.body if isinstance(n, ast.FunctionDef)}
    defined |= {t.attr for n in ast.walk(logic) if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    called = {n.attr for n in ast.walk(classes["AnatSSLWidget"]) if isinstance(n, ast.Attribute)
              and isinstance(n.value, ast.Attribute) and n.value.attr == "logic"}
    assert len(called) > 10
    assert sorted(called - defined) == []
    # every bridge sub-module the module imports by name exists (and is listed for packaging)
    modules = {n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
               and n.func.id == "_bridge_module" and n.args and isinstance(n.args[0], ast.Constant)}
    assert modules == {"dependencies", "jobs", "landmarks", "search", "segmentation", "worker", "workerclient"}
    cmake = (ROOT / "AnatSSL" / "CMakeLists.txt").read_text(encoding="utf-8")
    for name in modules:
        assert (ROOT / "AnatSSL" / "AnatSSLBridge" / f"{name}.py").is_file()
        assert f"AnatSSLBridge/{name}.py" in cmake


EFFECT = ROOT / "AnatSSL" / "SegmentEditorAnatSSLLib" / "SegmentEditorEffect.py"


def _effect_methods() -> dict[str, ast.FunctionDef]:
    tree = ast.parse(EFFECT.read_text(encoding="utf-8"))
    (effect,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegmentEditorEffect"]
    return {n.name: n for n in effect.body if isinstance(n, ast.FunctionDef)}


def _called_names(node: ast.AST) -> set[str]:
    return {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
            for n in ast.walk(node) if isinstance(n, ast.Call)}


def test_effect_computes_off_the_gui_thread_and_writes_once_with_undo():
    """The effect's Apply only prepares and sends the request to the worker process (through the shared
    logic); the write (with the undo state) happens in the main-thread callback the logic's poll calls."""
    methods = _effect_methods()
    heavy = {"computeTransfer", "compute_transfer", "transferSegmentation", "transfer_segmentation", "segment"}
    apply_ = methods["onApply"]
    assert not _called_names(apply_) & heavy
    assert {"prepareTransfer", "startTransfer", "ensureDependencies"} <= _called_names(apply_)
    starts = [n for n in ast.walk(apply_) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
              and n.func.attr == "startTransfer"]
    assert len(starts) == 1 and any(k.arg == "finished" and ast.unparse(k.value) == "self._onFinished"
                                    for k in starts[0].keywords)
    for name, method in methods.items():  # no method computes
        assert not _called_names(method) & heavy, name
    # the write and its undo state: only in the callback, called on the main thread
    users = sorted(name for name, m in methods.items()
                   if any(isinstance(n, ast.Attribute) and n.attr in ("saveStateForUndo", "writeTransfer")
                          for n in ast.walk(m)))
    assert users == ["_onFinished"]
    # Apply refuses while running (and offers the install before anything else); Cancel and the timer exist
    setup = ast.unparse(methods["setupOptionsFrame"])
    for widget, signal in (("applyButton", "clicked()"), ("cancelButton", "clicked()"), ("_timer", "timeout()")):
        assert f"self.{widget}.connect('{signal}'" in setup, widget
    text = ast.unparse(apply_)
    assert text.index("self.busy()") < text.index("ensureDependencies") < text.index("prepareTransfer")
    assert "progressBar" in setup and "logic.fraction()" in ast.unparse(methods["onTimer"])


def test_no_tool_work_in_a_thread_of_slicers_process():
    """Issue 29, defect 1: the module and the effect send tools to the worker process; neither starts
    a thread nor uses the thread runner, and the logic does not import torch (the worker does)."""
    for path in (ROOT / "AnatSSL" / "AnatSSL.py", EFFECT):
        source = path.read_text(encoding="utf-8")
        for word in ("threading", "TaskRunner", "BackgroundTask", "Thread("):
            assert word not in source, (path.name, word)
        tree = ast.parse(source)
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                    for a in n.names} | {n.module.split(".")[0] for n in ast.walk(tree)
                                          if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"torch", "monai"}, (path.name, imported & {"torch", "monai"})
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not names & {"EmbeddingStore", "LandmarkLocator", "CrossModalitySegmenter", "EmbeddingSearch"}


def test_effect_widgets_are_made_before_use():
    methods = _effect_methods()
    made = {t.attr for n in ast.walk(methods["setupOptionsFrame"]) if isinstance(n, ast.Assign) for t in n.targets
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    used = {n.attr for m in methods.values() for n in ast.walk(m) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "self"
            and n.attr.endswith(("Button", "Selector", "Label", "Bar"))}
    assert used and sorted(used - made) == []
