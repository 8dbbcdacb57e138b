"""Slicer's GUI layer stood in by PyQt5, so that pytest can build and drive the AnatSSL widget and effect.

What is real: the MRML scene and nodes (slicer-core), ``slicer.util``'s node and array functions,
the AnatSSL module, bridge, worker process and library, Qt's own widgets (PyQt5, offscreen).

What is stood in, with the behaviour the module relies on:

- ``qt`` (PythonQt): PyQt5 objects behind :class:`PQ`, which gives PythonQt's access rules (a Qt
  property reads and writes as an attribute: ``button.enabled = False``, ``combo.currentIndex``) and
  ``obj.connect("signal(args)", slot)``.
- Slicer and CTK widgets (:class:`qMRMLNodeComboBox`, :class:`qMRMLCheckableNodeComboBox`,
  :class:`qMRMLSegmentSelectorWidget`, :class:`qSlicerMarkupsPlaceWidget`, :class:`qMRMLTableView`,
  :class:`ctkPathLineEdit`, :class:`ctkCollapsibleButton`, :class:`qMRMLWidget`): PyQt5 subclasses
  with the methods and signals the module calls. ``qMRMLTableView`` shows a table node as
  ``qMRMLTableModel`` does: with ``UseColumnTitleAsColumnHeader`` off the column titles are the
  view's first row. ``ctkPathLineEdit`` emits ``currentPathChanged`` on every keystroke, as the
  real one does (from ``textChanged``).
- ``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper`` (fields kept per parameter
  node, ``connectGui`` binding widgets by their ``SlicerParameterName``), ``SegmentEditorEffects``
  (the effect's base class and a scripted-effect object whose undo is
  ``vtkSlicerSegmentEditorLogic.SaveStateForUndo``), dialogs (recorded, answered "OK").

:func:`install` puts them in ``sys.modules`` and on the ``slicer`` package; :func:`uninstall` removes them.
"""

from __future__ import annotations

import inspect
import io
import os
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UI = ROOT / "Resources" / "UI" / "AnatSSL.ui"

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
from PyQt5 import QtCore, QtGui, QtWidgets, uic  # noqa: E402

pyqtSignal = QtCore.pyqtSignal


# ---- PythonQt access rules on PyQt5 objects --------------------------------------------------------
def unwrap(value):
    return object.__getattribute__(value, "_obj") if isinstance(value, PQ) else value


def wrap(value):
    if isinstance(value, QtCore.QObject) and not isinstance(value, PQ):
        return PQ(value)
    return value


def _trim(slot):
    """A slot that takes only as many arguments as ``slot`` accepts (PythonQt drops the extra ones)."""
    try:
        params = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return slot
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return slot
    n = sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    return lambda *args: slot(*[wrap(a) for a in args[:n]])


class PQ:
    """A PyQt5 object seen as PythonQt shows it."""

    def __init__(self, obj) -> None:
        object.__setattr__(self, "_obj", obj)

    def _qt_property(self, name):
        meta = object.__getattribute__(self, "_obj").metaObject()
        index = meta.indexOfProperty(name)
        return meta.property(index) if index >= 0 else None

    def __getattr__(self, name):
        obj = object.__getattribute__(self, "_obj")
        if hasattr(type(obj), name) and isinstance(getattr(type(obj), name), property):
            return getattr(obj, name)  # a stand-in's own Python property
        prop = self._qt_property(name)
        if prop is not None and prop.isReadable():
            return prop.read(obj)
        attr = getattr(obj, name)
        if callable(attr) and not isinstance(attr, (QtCore.pyqtBoundSignal,)):
            def call(*args, **kwargs):
                return wrap(attr(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in kwargs.items()}))
            return call
        return wrap(attr)

    def __setattr__(self, name, value):
        obj = object.__getattribute__(self, "_obj")
        if hasattr(type(obj), name) and isinstance(getattr(type(obj), name), property):
            setattr(obj, name, value)
            return
        prop = self._qt_property(name)
        if prop is not None and prop.isWritable():
            prop.write(obj, unwrap(value))
            return
        setattr(obj, name, value)

    def connect(self, signature: str, slot) -> bool:
        obj = object.__getattribute__(self, "_obj")
        signal = getattr(obj, signature.split("(")[0])
        args = signature[signature.index("(") + 1:-1]
        if args and args not in ("vtkMRMLNode*", "vtkMRMLScene*"):
            try:
                signal = signal[{"int": int, "bool": bool, "QString": str, "QModelIndex": QtCore.QModelIndex}[args]]
            except (KeyError, TypeError, IndexError):
                pass
        signal.connect(_trim(slot))
        return True

    def __eq__(self, other):
        return unwrap(self) is unwrap(other)

    def __hash__(self):
        return id(unwrap(self))

    def __bool__(self):
        return True


class _QtClass:
    """``qt.QLabel`` and friends: calling makes a wrapped object; enums and static functions pass through."""

    def __init__(self, cls) -> None:
        self._cls = cls

    def __call__(self, *args, **kwargs):
        return PQ(self._cls(*[unwrap(a) for a in args], **kwargs))

    def __getattr__(self, name):
        return getattr(self._cls, name)


def _qt_class(cls):
    return _QtClass(cls)


class _Settings:
    """``qt.QSettings()``: one in-memory store for the test session."""

    store: dict = {}

    def value(self, key, default=None):
        return self.store.get(key, default)

    def setValue(self, key, value):
        self.store[key] = value


def make_qt_module():
    qt = types.ModuleType("qt")
    for module in (QtWidgets, QtGui, QtCore):
        for name in dir(module):
            if name.startswith("Q") and isinstance(getattr(module, name), type):
                setattr(qt, name, _qt_class(getattr(module, name)))
    qt.Qt = QtCore.Qt
    qt.QSettings = _Settings
    qt.QIcon = QtGui.QIcon
    qt.QModelIndex = QtCore.QModelIndex
    return qt


# ---- Slicer and CTK widgets ---------------------------------------------------------------------------
def _nodes(scene, types_, exact: bool):
    out = []
    if scene is None:
        return out
    for cls in types_:
        col = scene.GetNodesByClass(cls)
        for i in range(col.GetNumberOfItems()):
            node = col.GetItemAsObject(i)
            if (not exact or node.GetClassName() == cls) and node not in out and not node.GetHideFromEditors():
                out.append(node)
    return out


class _SceneWatcher:
    """Re-lists the scene's nodes when one is added or removed (as the MRML widgets do)."""

    def _watch(self, scene):
        self._unwatch()
        _WATCHERS.append(self)
        self._scene = scene
        if scene is not None:
            for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent):
                self._tags.append((scene, scene.AddObserver(event, lambda *a: self._refresh())))
        self._refresh()

    def _unwatch(self):
        for scene_, tag in getattr(self, "_tags", []):
            scene_.RemoveObserver(tag)
        self._tags = []

    def mrmlScene(self):
        return getattr(self, "_scene", None)


_WATCHERS: list = []


class qMRMLWidget(QtWidgets.QWidget):
    mrmlSceneChanged = pyqtSignal(object)

    def setMRMLScene(self, scene):  # the .ui connects mrmlSceneChanged to every MRML child's setMRMLScene
        for child in self.findChildren(QtWidgets.QWidget):
            if hasattr(child, "setMRMLScene") and child is not self:
                child.setMRMLScene(scene)
        self.mrmlSceneChanged.emit(scene)


class ctkCollapsibleButton(QtWidgets.QGroupBox):
    def setText(self, text):
        self.setTitle(text)


class qMRMLNodeComboBox(QtWidgets.QComboBox, _SceneWatcher):
    currentNodeChanged = pyqtSignal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._types, self._none, self._children, self._list = [], False, True, []
        self._current = None
        self.currentIndexChanged[int].connect(self._indexChanged)

    def setNodeTypes(self, types_):
        self._types = list(types_)
        self._refresh()

    nodeTypes = property(lambda self: self._types, setNodeTypes)
    noneEnabled = property(lambda self: self._none, lambda self, v: (setattr(self, "_none", bool(v)), self._refresh()))
    showChildNodeTypes = property(lambda self: self._children,
                                  lambda self, v: (setattr(self, "_children", bool(v)), self._refresh()))

    def setNoneEnabled(self, v):
        self.noneEnabled = v

    def setShowChildNodeTypes(self, v):
        self.showChildNodeTypes = v

    def setMRMLScene(self, scene):
        self._watch(scene)

    def _refresh(self):
        current = self._current
        self._list = ([None] if self._none else []) + _nodes(self.mrmlScene(), self._types, not self._children)
        blocked = self.blockSignals(True)
        self.clear()
        for node in self._list:
            self.addItem("None" if node is None else node.GetName())
        self.blockSignals(blocked)
        if current in self._list:
            self.setCurrentIndex(self._list.index(current))
        else:
            self._current = None
            if self._list:
                self.setCurrentIndex(0)
                self._indexChanged(0)

    def _indexChanged(self, index):
        node = self._list[index] if 0 <= index < len(self._list) else None
        if node is not self._current:
            self._current = node
            self.currentNodeChanged.emit(node)

    def currentNode(self):
        return self._current

    def currentNodeID(self):
        return self._current.GetID() if self._current is not None else ""

    def setCurrentNode(self, node):
        node = unwrap(node)
        if node in self._list:
            self.setCurrentIndex(self._list.index(node))
        elif node is None and self._none:
            self.setCurrentIndex(0)

    def setCurrentNodeID(self, node_id):
        self.setCurrentNode(self.mrmlScene().GetNodeByID(node_id) if node_id else None)


class qMRMLCheckableNodeComboBox(qMRMLNodeComboBox):
    checkedNodesChanged = pyqtSignal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self._checked = set()

    def nodeCount(self):
        return len([n for n in self._list if n is not None])

    def nodeFromIndex(self, index):
        return [n for n in self._list if n is not None][index]

    def setCheckState(self, node, state):
        node_id = unwrap(node).GetID()
        before = set(self._checked)
        (self._checked.add if state == QtCore.Qt.Checked else self._checked.discard)(node_id)
        if self._checked != before:
            self.checkedNodesChanged.emit()

    def checkState(self, node):
        return QtCore.Qt.Checked if node.GetID() in self._checked else QtCore.Qt.Unchecked

    def checkedNodes(self):
        return [n for n in self._list if n is not None and n.GetID() in self._checked]


class qMRMLSegmentSelectorWidget(QtWidgets.QComboBox, _SceneWatcher):
    currentNodeChanged = pyqtSignal(object)
    currentSegmentChanged = pyqtSignal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._node, self._segment = None, ""

    def setMRMLScene(self, scene):
        self._watch(scene)

    def _refresh(self):
        pass

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node):
        node = unwrap(node)
        if node is not self._node:
            self._node = node
            self.currentNodeChanged.emit(node)

    def currentSegmentID(self):
        return self._segment

    def setCurrentSegmentID(self, segment_id):
        if segment_id != self._segment:
            self._segment = str(segment_id or "")
            self.currentSegmentChanged.emit(self._segment)


class qSlicerMarkupsPlaceWidget(QtWidgets.QToolButton, _SceneWatcher):
    ForcePlaceSingleMarkup, ForcePlaceMultipleMarkups = 1, 2

    def __init__(self, parent=None):
        super().__init__(parent)
        self._node = None
        self.placeMultipleMarkups = 0

    def setMRMLScene(self, scene):
        self._watch(scene)

    def _refresh(self):
        pass

    def setCurrentNode(self, node):
        self._node = unwrap(node)

    def currentNode(self):
        return self._node


class qMRMLTableView(QtWidgets.QTableView, _SceneWatcher):
    """A table node shown as ``qMRMLTableModel`` shows it (see the module docstring)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._node = None
        self._model = QtGui.QStandardItemModel(self)
        self._proxy = QtCore.QSortFilterProxyModel(self)
        self._proxy.setSourceModel(self._model)
        self.setModel(self._proxy)

    def setMRMLScene(self, scene):
        self._watch(scene)

    def _refresh(self):
        pass

    def setMRMLTableNode(self, node):
        self._node = unwrap(node)
        self._model.clear()
        table = self._node.GetTable()
        names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
        rows = [[table.GetValue(r, c).ToString() for c in range(len(names))] for r in range(table.GetNumberOfRows())]
        getter = getattr(self._node, "GetUseColumnTitleAsColumnHeader", None) or self._node.GetUseColumnNameAsColumnHeader
        if getter():
            self._model.setHorizontalHeaderLabels(names)
        else:  # the column titles are the first, editable row
            rows = [names] + rows
        for row in rows:
            self._model.appendRow([QtGui.QStandardItem(value) for value in row])

    def mrmlTableNode(self):
        return self._node

    def sortFilterProxyModel(self):
        return self._proxy

    def cell(self, row, column):
        return self._proxy.index(row, column).data()


class _LineEdit(QtWidgets.QLineEdit):
    """The path edit's line edit; ``typing`` stands for keyboard focus (offscreen windows get none)."""

    typing = False

    def hasFocus(self):
        return self.typing


class ctkPathLineEdit(QtWidgets.QWidget):
    currentPathChanged = pyqtSignal(str)
    validInputChanged = pyqtSignal(bool)
    Dirs = 1

    def __init__(self, parent=None):
        super().__init__(parent)
        self._combo = QtWidgets.QComboBox(self)
        self._combo.setEditable(True)
        self._combo.setLineEdit(_LineEdit(self._combo))
        self._combo.lineEdit().textChanged.connect(self.currentPathChanged.emit)  # every keystroke, as CTK

    def setFilters(self, value):
        pass

    def comboBox(self):
        return self._combo

    currentPath = property(lambda self: self._combo.lineEdit().text(),
                           lambda self, path: self._combo.lineEdit().setText(str(path or "")))

    def setCurrentPath(self, path):
        self.currentPath = path

    def type_text(self, text: str) -> None:
        """A user typing ``text`` into the field key by key, then pressing Enter."""
        edit = self._combo.lineEdit()
        edit.typing = True
        edit.setText("")
        for n in range(1, len(text) + 1):
            edit.setText(text[:n])
        edit.typing = False
        edit.editingFinished.emit()


STANDINS = {cls.__name__: cls for cls in (qMRMLWidget, ctkCollapsibleButton, qMRMLNodeComboBox,
                                          qMRMLCheckableNodeComboBox, qMRMLSegmentSelectorWidget,
                                          qSlicerMarkupsPlaceWidget, qMRMLTableView, ctkPathLineEdit)}
_KEEP = {"nodeTypes", "noneEnabled", "showChildNodeTypes"}


def standin_ui(path: Path = UI) -> str:
    """The .ui text for PyQt5: Slicer widgets come from this module, Slicer-only properties and the
    scene connections (done by :meth:`qMRMLWidget.setMRMLScene`) are dropped."""
    root = ET.parse(path).getroot()
    for widget in root.iter("widget"):
        if widget.get("class") in STANDINS:
            known = set(dir(STANDINS[widget.get("class")]))
            for prop in list(widget.findall("property")):
                name = prop.get("name")
                setter = "set" + name[0].upper() + name[1:]
                if prop.get("stdset") == "0" or name in _KEEP or setter in known or name in ("toolTip", "text",
                                                                                         "minimumSize", "geometry"):
                    continue
                widget.remove(prop)
            if widget.get("class") == "ctkPathLineEdit":
                for prop in list(widget.findall("property")):
                    if prop.get("name") == "filters":
                        widget.remove(prop)
    for custom in root.iter("customwidget"):
        custom.find("header").text = "slicer_standins.h"
        extends = custom.find("extends")
        base = {"qMRMLTableView": "QTableView", "ctkCollapsibleButton": "QGroupBox", "ctkPathLineEdit": "QWidget"}
        extends.text = base.get(custom.find("class").text, "QWidget")
    for element in root.findall("connections"):
        root.remove(element)
    return ET.tostring(root, encoding="unicode")


def load_ui(path) -> PQ:
    return PQ(uic.loadUi(io.StringIO(standin_ui(Path(path)))))


def child_widget_variables(widget) -> types.SimpleNamespace:
    ns = types.SimpleNamespace()
    for child in unwrap(widget).findChildren(QtCore.QObject):
        if child.objectName():
            setattr(ns, child.objectName(), PQ(child))
    return ns


# ---- parameterNodeWrapper -------------------------------------------------------------------------------
class WithinRange:
    def __init__(self, low, high):
        self.low, self.high = low, high


def parameterNodeWrapper(cls):
    """Fields from ``cls``'s annotations and defaults, kept per MRML node; ``connectGui`` binds widgets
    whose ``SlicerParameterName`` names a field (node combo boxes, spin boxes, line edits)."""
    import typing

    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {}
    for name, hint in hints.items():
        if name.startswith("_"):
            continue
        if hasattr(cls, name):
            defaults[name] = getattr(cls, name)
        elif typing.get_origin(hint) is list:
            defaults[name] = []
        else:
            defaults[name] = None
    store: dict = {}

    class Wrapper:
        _defaults = defaults

        def __init__(self, node):
            object.__setattr__(self, "_node", node)
            store.setdefault(node.GetID(), {k: (list(v) if isinstance(v, list) else v) for k, v in defaults.items()})

        def __getattr__(self, name):
            values = store[object.__getattribute__(self, "_node").GetID()]
            if name in values:
                value = values[name]
                return list(value) if isinstance(value, list) else value
            raise AttributeError(name)

        def __setattr__(self, name, value):
            if name not in defaults:
                raise AttributeError(f"parameter node has no field {name!r}")
            values = store[self._node.GetID()]
            value = list(value) if isinstance(value, list) else value
            if values.get(name) is value or (not hasattr(value, "GetID") and values.get(name) == value):
                return
            values[name] = value
            self._node.Modified()

        def AddObserver(self, *args):
            return self._node.AddObserver(*args)

        def RemoveObserver(self, *args):
            return self._node.RemoveObserver(*args)

        def connectGui(self, ui):
            bindings = []
            for child in vars(ui).values():
                obj = unwrap(child)
                name = obj.property("SlicerParameterName")
                if not name:
                    continue
                name = str(name)
                bindings.append(self._bind(obj, name))
            return bindings

        def _bind(self, obj, name):
            value = getattr(self, name)
            if isinstance(obj, qMRMLNodeComboBox):
                obj.setCurrentNode(value)
                signal, slot = obj.currentNodeChanged, lambda node: setattr(self, name, node)
            elif isinstance(obj, (QtWidgets.QSpinBox, QtWidgets.QDoubleSpinBox)):
                obj.setValue(value)
                signal = obj.valueChanged[int] if isinstance(obj, QtWidgets.QSpinBox) else obj.valueChanged[float]
                slot = lambda v: setattr(self, name, v)  # noqa: E731
            elif isinstance(obj, QtWidgets.QLineEdit):
                obj.setText(value or "")
                signal, slot = obj.textChanged, lambda v: setattr(self, name, str(v))
            else:
                raise TypeError(f"stand-in parameterNodeWrapper: cannot bind {type(obj).__name__} to {name}")
            signal.connect(slot)
            return signal, slot

        def disconnectGui(self, tag):
            for signal, slot in tag or []:
                signal.disconnect(slot)

    Wrapper.__name__ = cls.__name__
    Wrapper.__doc__ = cls.__doc__
    return Wrapper


# ---- ScriptedLoadableModule ---------------------------------------------------------------------------
class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent
        self.moduleName = "AnatSSL"

    def setup(self):
        self.layout = PQ(QtWidgets.QVBoxLayout(unwrap(self.parent)))


class ScriptedLoadableModuleLogic:
    def __init__(self):
        self.moduleName = "AnatSSL"

    def getParameterNode(self):
        import slicer

        scene = slicer.mrmlScene
        col = scene.GetNodesByClass("vtkMRMLScriptedModuleNode")
        for i in range(col.GetNumberOfItems()):
            node = col.GetItemAsObject(i)
            if node.GetAttribute("ModuleName") == self.moduleName:
                return node
        node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "AnatSSL parameters")
        node.SetAttribute("ModuleName", self.moduleName)
        return node


class ScriptedLoadableModuleTest:
    pass


class ModulePanel(QtWidgets.QWidget):
    """The module panel's parent widget (``isEntered`` as Slicer's module panel has it)."""

    isEntered = True


# ---- the Segment Editor side ---------------------------------------------------------------------------
class AbstractScriptedSegmentEditorEffect:
    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect


class ScriptedEffect:
    """What ``qSlicerSegmentEditorScriptedEffect`` gives a Python effect: its parameter node (the Segment
    Editor node), the options frame, and one undo state per call (the Segment Editor logic's)."""

    def __init__(self, scene, editor_node):
        import slicer

        self.name, self.perSegment, self.requireSegments = "", False, False
        self._editor_node = editor_node
        self.options = QtWidgets.QWidget()
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(scene)
        self.logic.SetSegmentEditorNode(editor_node)
        self.undo_states = 0

    def parameterSetNode(self):
        return self._editor_node

    def addOptionsWidget(self, widget):
        obj = unwrap(widget)
        if isinstance(obj, QtWidgets.QLayout):
            self.options.setLayout(obj)
        else:
            QtWidgets.QVBoxLayout(self.options).addWidget(obj)

    def saveStateForUndo(self):
        self.undo_states += 1
        self.logic.SaveStateForUndo()


# ---- install ----------------------------------------------------------------------------------------------
class Dialogs:
    """Every dialog the module opens, recorded (and answered "OK")."""

    def __init__(self):
        self.shown: list[tuple[str, str]] = []

    def display(self, kind):
        def show(text, *args, **kwargs):
            self.shown.append((kind, str(text)))
            return True
        return show


class _WaitCursor:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _TryWithErrorDisplay:
    def __init__(self, dialogs):
        self.dialogs = dialogs

    def __call__(self, message="", waitCursor=False):
        outer = self

        class Context:
            def __enter__(self):
                return self

            def __exit__(self, kind, exc, tb):
                if exc is not None:
                    outer.dialogs.shown.append(("error", f"{message} {exc}"))
                    return True
                return False
        return Context()


_SAVED: dict = {}


def install(scene):
    """Put the stand-ins in place for ``scene`` (a slicer-core scene); returns the :class:`Dialogs` record."""
    import slicer
    import slicer.util as util

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(["anatssl-widget-test"])
    dialogs = Dialogs()
    modules = {
        "qt": make_qt_module(),
        "ctk": types.ModuleType("ctk"),
        "slicer.ScriptedLoadableModule": types.ModuleType("slicer.ScriptedLoadableModule"),
        "slicer.parameterNodeWrapper": types.ModuleType("slicer.parameterNodeWrapper"),
        "SegmentEditorEffects": types.ModuleType("SegmentEditorEffects"),
        "slicer_standins": sys.modules[__name__],
    }
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(modules["slicer.ScriptedLoadableModule"], name, globals()[name])
    modules["slicer.parameterNodeWrapper"].parameterNodeWrapper = parameterNodeWrapper
    modules["slicer.parameterNodeWrapper"].WithinRange = WithinRange
    modules["SegmentEditorEffects"].AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
    for name, module in modules.items():
        _SAVED.setdefault(("module", name), sys.modules.get(name))
        sys.modules[name] = module
    attributes = {"mrmlScene": scene, "app": types.SimpleNamespace(processEvents=app.processEvents,
                                                                   connect=lambda *a: True),
                  **{name: (lambda cls: lambda *a: PQ(cls(*a)))(cls) for name, cls in STANDINS.items()}}
    attributes["qSlicerMarkupsPlaceWidget"].ForcePlaceSingleMarkup = qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
    attributes["qSlicerMarkupsPlaceWidget"].ForcePlaceMultipleMarkups = qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
    for name, value in attributes.items():
        _SAVED.setdefault(("slicer", name), getattr(slicer, name, None))
        setattr(slicer, name, value)
    utilities = {
        "loadUI": load_ui, "childWidgetVariables": child_widget_variables, "WaitCursor": _WaitCursor,
        "tryWithErrorDisplay": _TryWithErrorDisplay(dialogs), "errorDisplay": dialogs.display("error"),
        "warningDisplay": dialogs.display("warning"), "infoDisplay": dialogs.display("info"),
        "confirmOkCancelDisplay": dialogs.display("confirm"), "mainWindow": lambda: None,
        "selectModule": lambda name: dialogs.shown.append(("selectModule", name)),
        "resetSliceViews": lambda: None, "pip_install": lambda req: dialogs.shown.append(("pip", req)),
    }
    for name, value in utilities.items():
        _SAVED.setdefault(("util", name), getattr(util, name, None))
        setattr(util, name, value)
    return dialogs


def uninstall():
    import slicer
    import slicer.util as util

    while _WATCHERS:
        _WATCHERS.pop()._unwatch()

    for (where, name), value in _SAVED.items():
        if where == "module":
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
        else:
            target = slicer if where == "slicer" else util
            if value is None and hasattr(target, name):
                delattr(target, name)
            elif value is not None:
                setattr(target, name, value)
    _SAVED.clear()
    for name in ("AnatSSL", "SegmentEditorAnatSSLLib.SegmentEditorEffect"):
        sys.modules.pop(name, None)


def process_events_until(condition, timeout_s: float, interval_s: float = 0.02) -> float:
    """Run the Qt event loop (timers fire, as in Slicer) until ``condition()``; returns the seconds taken."""
    import time

    app = QtWidgets.QApplication.instance()
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"not done after {timeout_s:.0f} s")
        app.processEvents(QtCore.QEventLoop.AllEvents, int(interval_s * 1000))
        time.sleep(interval_s)
    return time.monotonic() - start
