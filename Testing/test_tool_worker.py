"""The tool worker process (AnatSSLBridge.worker) and its main-thread client (AnatSSLBridge.workerclient).

Runs the real worker with this interpreter, as the module runs it with Slicer's: it imports no
slicer, vtk or Qt; Cancel is delivered within a second whether the worker stops at its next check or
sits in one long call (then it is killed and started again by the next request); a crash (an
out-of-memory kill) is reported and the next request gets a new worker; volumes cross as files with
their geometry; the segmentation step computes without any MRML node (issue 29, defects 1, 7, 8).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from AnatSSLBridge.jobs import TaskCancelled
from AnatSSLBridge.workerclient import ToolWorker, VolumeFiles, WorkerCrashed
from AnatSSLLib.errors import InputError
from AnatSSLLib.image import Image


@pytest.fixture(scope="module")
def worker():
    w = ToolWorker()
    yield w
    w.stop()


def _submit(worker, op, args):
    box = []
    worker.submit(op, args, op.title(), lambda result, error: box.append((result, error)))
    return box


def test_the_worker_imports_no_slicer_vtk_or_qt(worker):
    answer = worker.call("ping", {}, timeout=120)
    assert answer["modules"] == {"slicer": False, "vtk": False, "qt": False, "PythonQt": False}
    assert answer["pid"] != __import__("os").getpid()


@pytest.mark.parametrize("cooperative", [True, False])
def test_cancel_is_delivered_within_a_second(worker, cooperative):
    worker.call("ping", {}, timeout=120)
    pid, starts = worker.pid, worker.starts
    box = _submit(worker, "sleep", {"seconds": 30, "cooperative": cooperative})
    time.sleep(0.3)
    assert worker.busy and not box
    began = time.monotonic()
    assert worker.cancel("cancelled")
    assert worker.wait(5)
    assert time.monotonic() - began < 1.0
    (result, error), = box
    assert result is None and isinstance(error, TaskCancelled)
    answer = worker.call("ping", {}, timeout=120)  # the next request is served either way
    if cooperative:
        assert answer["pid"] == pid and worker.starts == starts  # stopped at its check: still warm
    else:
        assert answer["pid"] != pid and worker.starts == starts + 1  # killed, started again


def test_a_crash_is_reported_and_the_worker_restarted(worker):
    worker.call("ping", {}, timeout=120)
    starts = worker.starts
    box = _submit(worker, "crash", {"code": 137})
    assert worker.wait(30)
    (result, error), = box
    assert isinstance(error, WorkerCrashed) and "exit code 137" in str(error) and "out of memory" in str(error)
    assert not worker.busy
    assert worker.call("ping", {}, timeout=120)["modules"]["slicer"] is False
    assert worker.starts == starts + 1


def test_one_request_at_a_time_and_user_errors_keep_their_type(worker, tmp_path):
    box = _submit(worker, "sleep", {"seconds": 0.5, "cooperative": True})
    with pytest.raises(InputError, match="still busy"):
        worker.submit("ping", {}, "Ping")
    assert worker.wait(30) and box[0][1] is None
    with pytest.raises(InputError, match="no index to save"):
        worker.call("index_save", {"folder": str(tmp_path)}, timeout=60)


def test_volume_files_keep_geometry_and_are_written_once(tmp_path):
    from AnatSSLBridge.worker import image_from_message

    direction = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], dtype=float)
    image = Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), (0.5, 1.0, 2.5), (10.0, -5.0, 3.0), direction, "T1")
    files = VolumeFiles(str(tmp_path))
    made = []
    message = files.message("node1", ("mtime", 1), lambda: made.append(1) or image, name="T1")
    again = files.message("node1", ("mtime", 1), lambda: made.append(1) or image, name="T1 renamed")
    assert made == [1] and again["path"] == message["path"] and again["name"] == "T1 renamed"
    back = image_from_message(message)
    assert back.array.dtype == np.int16 and np.array_equal(back.array, image.array)
    assert back.spacing == image.spacing and back.origin == image.origin and np.allclose(back.direction, direction)
    files.message("node1", ("mtime", 2), lambda: made.append(2) or image)
    assert made == [1, 2]


def test_segmentation_step_reads_no_node():
    """Defect 7: the computation named its result from the target *node* (GetName on the worker);
    the name now travels in the plan, so the step runs with no node at all (as in the worker)."""
    from AnatSSLBridge.segmentation import TransferPlan, compute_transfer

    grid = Image(np.zeros((4, 5, 6), np.float32), (1, 1, 1), (0, 0, 0), np.eye(3), "t2 file")
    labels = grid.with_array(np.ones((4, 5, 6), np.int16))

    class Copy:
        def segment(self, reference, reference_labels, target):
            return target.with_array(np.ones(target.array.shape, np.int16))

    plan = TransferPlan(scene=None, reference_volume_node=None, reference_segmentation_node=None,
                        target_volume_node=None, output_segmentation_node=None, reference=grid, labels=labels,
                        target=grid, segments=[], value_of={"brain": 1}, target_name="sub-01 T2")
    result = compute_transfer(Copy(), plan)
    assert result.counts == {"brain": 120} and result.labels.name == "sub-01 T2 segmentation"


def test_contrast_choice_reaches_the_tools_only_when_overridden():
    from AnatSSLBridge.worker import contrast_options

    assert contrast_options("auto") == {}
    assert contrast_options("match") == {"contrast": "match"}
    assert contrast_options("same") == {"contrast": "same"}
    with pytest.raises(InputError, match="auto, same, match"):
        contrast_options("t2")
