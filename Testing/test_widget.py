"""The AnatSSL module widget and its Segment Editor effect, driven as a user drives them.

Builds the module panel from Resources/UI/AnatSSL.ui and the effect's options panel on a real MRML
scene (slicer-core), loads the MNI template T1 and two simulated subjects, places the 32 expert
landmarks on the template, ticks the targets, presses Propagate and lets the Qt event loop run
until the worker process has answered (the module's own ``qt.QTimer`` polls it); the markups it
wrote are checked against the subjects' ground truth. It then indexes the loaded volumes, searches
for a point, clicks the second row of the results table and checks that hit 2 opened; applies the
effect (template T1 segmentation -> a subject's T2) and checks Dice; and checks the defects fixed
in issue 29 that show on the widget (cache folder edits, install guard, recipes, one logic,
cancel within a second, a pretraining summary read after its process ended).

What this does NOT cover: Slicer's real widgets (qMRMLNodeComboBox, qMRMLTableView, ctkPathLineEdit,
qSlicerMarkupsPlaceWidget ... are PyQt5 stand-ins, ``Testing/slicer_standins.py``, with only the
behaviour the module relies on), PythonQt itself (a wrapper gives its attribute and ``connect``
rules), the real ``parameterNodeWrapper`` (a stand-in binds the same widgets) and the scene being
saved with it, mouse placement of points in slice views (points are added to the markups node as a
click does), slice-view rendering and layouts, the Segment Editor widget (the effect gets its
parameter node and the Segment Editor logic's undo), dialogs (recorded and answered OK), pip and
PyTorchUtils installs (stubbed), a GPU, and Slicer's own Python (the worker runs with this
interpreter, as it runs with ``sys.executable``/PythonSlicer in Slicer). The self-test inside Slicer
(Testing/Python/AnatSSLSelfTest.py, "Reload and Test") covers the real widgets' presence only.

``ANATSSL_WIDGET_TIMINGS=path.json`` writes the measured times (Propagate to markups, first and
later target; a search click) to that file.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest

pytest.importorskip("PyQt5.uic")
slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core is not installed (`import slicer` found another package)", allow_module_level=True)

import slicer_standins as standins  # noqa: E402

from AnatSSLLib.image import lps_to_ras  # noqa: E402

TIMEOUT_S = 300


def _world_ras(node) -> np.ndarray:
    out, p = [], [0.0, 0.0, 0.0]
    for i in range(node.GetNumberOfControlPoints()):
        node.GetNthControlPointPositionWorld(i, p)
        out.append(list(p))
    return np.array(out)


def _node_named(scene, cls, name):
    col = scene.GetNodesByClass(cls)
    found = [col.GetItemAsObject(i) for i in range(col.GetNumberOfItems()) if col.GetItemAsObject(i).GetName() == name]
    return found[0] if found else None


def _dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


class _Timings(dict):
    """The measured figures, written to ``$ANATSSL_WIDGET_TIMINGS`` as they come (also when a check fails)."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if os.environ.get("ANATSSL_WIDGET_TIMINGS"):
            with open(os.environ["ANATSSL_WIDGET_TIMINGS"], "w", encoding="utf-8") as f:
                json.dump({k: round(v, 3) for k, v in self.items()}, f, indent=2)


@pytest.fixture
def gui(scene):
    dialogs = standins.install(scene)
    standins._Settings.store.clear()
    standins._Settings.store["AnatSSL/Device"] = "cpu"
    import AnatSSL

    panel = standins.ModulePanel()
    widget = AnatSSL.AnatSSLWidget(panel)
    widget.setup()
    try:
        yield AnatSSL, widget, dialogs
    finally:
        widget.cleanup()
        widget.logic.shutdown()
        standins.uninstall()


def _wait(widget, timeout=TIMEOUT_S) -> float:
    """Seconds until the running request was delivered (the module's timer does the polling)."""
    return standins.process_events_until(lambda: not widget.busy(), timeout)


def test_widget_and_effect_as_a_user(gui, scene, template_2mm, population_small, tmp_path):
    AnatSSL, w, dialogs = gui
    ui, logic = w.ui, w.logic
    from AnatSSLBridge import labelmap_to_segmentation, segmentation_to_labelmap, volume_node_from_image

    timings = _Timings()
    # ---- load volumes, place the 32 landmarks on the reference ------------------------------------
    subjects = population_small.subjects[:2]
    reference = volume_node_from_image(scene, template_2mm.t1, "MNI T1")
    targets = [volume_node_from_image(scene, s.image("t1"), f"{s.name} T1") for s in subjects]
    ui.referenceVolumeSelector.setCurrentNode(reference)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "reference landmarks")
    ui.referenceLandmarksSelector.setCurrentNode(points)
    for label, ras in zip(template_2mm.landmarks.labels, template_2mm.landmarks.to_ras()):
        points.AddControlPoint([float(x) for x in ras], label)  # what a click in a slice view adds
    assert w._parameterNode.referenceLandmarks is points and w._parameterNode.referenceVolume is reference

    # ---- Propagate to the first target, then to a second one ------------------------------------------
    ui.targetVolumesSelector.setCheckState(targets[0], standins.QtCore.Qt.Checked)
    assert ui.propagateButton.enabled
    start = time.monotonic()
    ui.propagateButton.click()
    assert w.busy() and not ui.propagateButton.enabled and ui.cancelButton.enabled
    _wait(w)
    timings["propagate_first_target_s"] = time.monotonic() - start  # worker start, encoder, two embeddings
    timings["propagate_first_target_worker_s"] = logic.worker.last_worker_s
    ui.targetVolumesSelector.setCheckState(targets[1], standins.QtCore.Qt.Checked)
    start = time.monotonic()
    ui.propagateButton.click()
    _wait(w)
    timings["propagate_later_target_s"] = time.monotonic() - start  # one new embedding and correspondence
    timings["propagate_later_target_worker_s"] = logic.worker.last_worker_s
    start = time.monotonic()
    ui.propagateButton.click()  # nothing changed: every point reused
    _wait(w)
    timings["propagate_again_s"] = time.monotonic() - start
    assert not [d for d in dialogs.shown if d[0] == "error"], dialogs.shown
    for subject, target in zip(subjects, targets):
        node = _node_named(scene, "vtkMRMLMarkupsFiducialNode", f"{target.GetName()} landmarks")
        truth = subject.landmarks()
        assert [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())] == truth.labels
        err = np.linalg.norm(_world_ras(node) - lps_to_ras(truth.positions), axis=1)
        timings[f"landmark_error_mean_mm_{subject.name}"] = float(err.mean())
        assert err.mean() < 4.0, err.round(1)
    assert "2 target(s) updated; 0 point(s) located" in ui.landmarksResultLabel.text
    # the landmark table shows its column titles as the header, data from the first row
    assert ui.landmarksTableView.cell(0, 0) == truth.labels[0]
    assert ui.deviceInfoLabel.text.startswith("Runs on:")

    # ---- search: index, query a point, click the second result ------------------------------------------
    start = time.monotonic()
    ui.indexLoadedVolumesButton.click()
    _wait(w)
    timings["index_3_volumes_s"] = time.monotonic() - start
    assert "3 volume(s) indexed" in ui.indexStatusLabel.text, ui.statusLabel.text
    query = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "query point")
    ui.searchVolumeSelector.setCurrentNode(reference)
    ui.searchPointsSelector.setCurrentNode(query)
    query.AddControlPoint([float(x) for x in lps_to_ras(template_2mm.landmarks.position("AC"))], "AC")
    assert ui.searchButton.enabled, ui.searchButton.toolTip
    start = time.monotonic()
    ui.searchButton.click()
    _wait(w)
    timings["search_click_s"] = time.monotonic() - start
    timings["search_click_worker_s"] = logic.worker.last_worker_s
    view = ui.searchResultsTableView
    table = view.mrmlTableNode().GetTable()
    assert table.GetNumberOfRows() == 2  # one hit per other volume
    hit_volumes = [table.GetValueByName(r, "volume").ToString() for r in range(2)]
    assert set(hit_volumes) == {t.GetName() for t in targets}
    assert view.cell(0, 1) == hit_volumes[0]  # row 0 of the view is hit 1, not the column titles
    opened = []
    jump = logic.jumpToHit
    logic.jumpToHit = lambda table_node, row: opened.append(row) or jump(table_node, row)
    view.clicked.emit(view.sortFilterProxyModel().index(1, 0))  # the user clicks the second row
    assert opened == [1], opened
    assert ui.statusLabel.text.startswith(f"Showing result 2: {hit_volumes[1]} at R"), ui.statusLabel.text
    hit_ras = [table.GetValueByName(1, c).ToDouble() for c in "RAS"]
    truth = subjects[[t.GetName() for t in targets].index(hit_volumes[1])].landmarks().position("AC")
    timings["search_hit2_error_mm"] = float(np.linalg.norm(np.array(hit_ras) - lps_to_ras(truth)))

    # ---- the Segment Editor effect: the template T1's segmentation onto a subject's T2 --------------------
    subject = subjects[0]
    t2 = volume_node_from_image(scene, subject.image("t2"), f"{subject.name} T2")
    names = {k: v for k, v in template_2mm.label_names.items() if k}
    reference_segmentation = labelmap_to_segmentation(scene, template_2mm.labels, reference, names=names,
                                                      closed_surface=False)
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "T2 segmentation")
    output.SetReferenceImageGeometryParameterFromVolumeNode(t2)
    manual = output.GetSegmentation().AddEmptySegment("my manual segment")
    editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor_node.SetAndObserveSegmentationNode(output)
    editor_node.SetAndObserveSourceVolumeNode(t2)
    scripted = standins.ScriptedEffect(scene, editor_node)
    scripted.logic.SetSegmentationNode(output)
    import importlib

    importlib.import_module("SegmentEditorAnatSSLLib.SegmentEditorEffect")
    effect_module = sys.modules["SegmentEditorAnatSSLLib.SegmentEditorEffect"]  # the package exports the class

    effect = effect_module.SegmentEditorEffect(scripted)
    effect.setupOptionsFrame()
    assert effect_module._logic() is logic  # one logic (and one worker) for the module and the effect
    effect.referenceVolumeSelector.setCurrentNode(reference)
    effect.referenceSegmentationSelector.setCurrentNode(reference_segmentation)
    effect.updateGUIFromMRML()
    assert effect.applyButton.enabled
    assert w._parameterNode.contrast == "auto"  # no override: each target's contrast is decided on its own
    starts = logic.worker.starts
    start = time.monotonic()
    effect.applyButton.click()
    standins.process_events_until(lambda: not effect.busy(), TIMEOUT_S)
    timings["effect_apply_s"] = time.monotonic() - start
    assert effect.statusLabel.text.startswith("Filled 25 segment(s)"), effect.statusLabel.text
    assert scripted.undo_states == 1 and logic.worker.starts == starts
    assert output.GetSegmentation().GetSegment(manual) is not None  # the user's own segment is kept
    labels, by_value = segmentation_to_labelmap(scene, output, t2)
    value = {n: v for v, n in by_value.items()}
    truth = np.asarray(subject.labels().array)
    tissue = [1, 2, 3] + list(range(8, 20))
    dice = {k: _dice(labels.array == value[names[k]], truth == k) for k in tissue}
    timings["effect_mean_tissue_dice"] = float(np.mean(list(dice.values())))
    assert np.mean(list(dice.values())) > 0.5, dice
    loaded = logic.worker.call("ping", {})["loaded"]
    assert loaded["encoders"] == 1, loaded  # the effect and the module share one loaded encoder

    # ---- Cancel stops a search within a second (the T2 is not embedded for search yet) ---------------------
    ui.searchVolumeSelector.setCurrentNode(t2)
    query.AddControlPoint([float(x) for x in lps_to_ras(subject.landmarks().position("AC"))], "AC t2")
    ui.searchButton.click()
    began = time.monotonic()
    standins.process_events_until(lambda: time.monotonic() - began > 0.3, 2)
    assert w.busy()
    start = time.monotonic()
    ui.cancelButton.click()
    waited = _wait(w, timeout=5)
    timings["cancel_search_s"] = time.monotonic() - start
    assert waited < 1.0 and ui.statusLabel.text == "Search cancelled; nothing was changed.", ui.statusLabel.text



def test_widget_settings_install_guard_recipes_and_pretraining_end(gui, tmp_path):
    """Issue 29's defects 3, 4, 6, 9 and 11 on the widget (no tool runs)."""
    AnatSSL, w, dialogs = gui
    ui, logic = w.ui, w.logic
    import AnatSSLBridge.dependencies as dependencies

    # 6: the cache folder acts once, when the user has finished typing, and only on an existing folder
    refreshes = []
    refresh = w.refreshEncoders
    w.refreshEncoders = lambda *a, **k: refreshes.append(a) or refresh(*a, **k)
    folder = tmp_path / "my encoders"
    folder.mkdir()
    path_edit = standins.unwrap(ui.cacheFolderPathLineEdit)
    path_edit.type_text(str(folder))
    assert len(refreshes) == 1 and AnatSSL.cacheFolderSetting() == str(folder)
    path_edit.type_text(str(tmp_path / "missing"))
    assert len(refreshes) == 1 and AnatSSL.cacheFolderSetting() == str(folder)
    assert "does not exist" in ui.statusLabel.text
    path_edit.setCurrentPath(str(tmp_path))  # the browse button: no keyboard focus, acted on at once
    assert len(refreshes) == 2 and AnatSSL.cacheFolderSetting() == str(tmp_path)

    # 9: one install at a time; every button that starts work is disabled meanwhile
    plan = dependencies.InstallPlan(torch=False, pip=["monai>=1.3"])
    installs, seen = [], []
    original = dependencies.install_plan
    dependencies.install_plan = lambda *a, **k: plan if not installs else dependencies.InstallPlan(False, [])

    def install(p):
        installs.append(p)
        seen.append((ui.installDependenciesButton.enabled, ui.propagateButton.enabled, ui.pretrainButton.enabled))
        ui.installDependenciesButton.click()  # a second click while pip pumps events: ignored
        w.onInstallDependencies()  # or a script: refused
        assert logic.ensureDependencies() is False

    logic.installDependencies = install
    try:
        ui.installDependenciesButton.click()
        assert len(installs) == 1 and seen == [(False, False, False)], seen
        assert ui.installDependenciesButton.enabled
        # 4: the Segment Editor effect offers the install too (no "No module named torch")
        installs.clear()
        dialogs.shown.clear()
        assert logic.ensureDependencies() is True and len(installs) == 1
        assert dialogs.shown[0][0] == "confirm" and "monai" in dialogs.shown[0][1]
    finally:
        dependencies.install_plan = original
    effect_source = (standins.ROOT / "AnatSSL" / "SegmentEditorAnatSSLLib" / "SegmentEditorEffect.py").read_text()
    assert "logic.ensureDependencies(" in effect_source.split("def onApply")[1].split("def ")[0]

    # 11: recipes, the bundled default's first, with the expected time
    names = [ui.recipeSelector.itemData(i) for i in range(ui.recipeSelector.count)]
    assert names[:2] == ["default", "paper"] and ui.recipeSelector.currentIndex == 0
    assert "about 32 min" in ui.recipeInfoLabel.text
    ui.recipeSelector.setCurrentIndex(1)
    assert w._parameterNode.recipe == "paper" and "about 40 min" in ui.recipeInfoLabel.text
    command = logic.pretrainJob(["data"], "cpu", "default", 2, None).command()
    assert command[command.index("--method") + 1] == "ld" and "--canonical-orientation" in command
    assert command[command.index("--ld-steps") + 1] == "700" and command[command.index("--pd-steps") + 1] == "500"
    command = logic.pretrainJob(["data"], "cpu", "paper", 2, None).command()
    assert command[command.index("--ld-steps") + 1] == "1200" and "--canonical-orientation" not in command

    # 3: a pretraining whose process has ended while its summary line still waits in the queue
    class EndedJob:
        running, cancel_requested, last_error = False, False, None

        def __init__(self):
            self.returncode, self.encoder_id, self._events = None, None, [
                {"event": "summary", "encoder_id": "ld-new"}, {"event": "exit", "returncode": 0}]

        @property
        def finished(self):
            return self.returncode is not None

        def poll(self):
            events, self._events = self._events, []
            for e in events:
                if e["event"] == "summary":
                    self.encoder_id = e["encoder_id"]
                if e["event"] == "exit":
                    self.returncode = 0
            return events

    selected = []
    w.refreshEncoders = lambda select=None: selected.append(select)
    w._job = EndedJob()
    assert w.busy()  # still busy although the process is gone: its lines have not all been read
    w.onTimer()
    assert selected == ["ld-new"] and w._job is None and not w.busy()
    assert ui.statusLabel.text == "Pretraining finished: encoder ld-new is selected."
