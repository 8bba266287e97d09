"""Ctrl-C or SIGTERM during `duquant quantize` leaves neither a partial output nor a stray temporary
file, and the exit status says the process ended by that signal (a real child process, real signals)."""
import glob
import os
import signal
import subprocess
import time

import pytest

CLI = os.environ["DUQUANT_CLI"]
FIXTURES = os.environ["DUQUANT_FIXTURE_DIR"]
MODEL = os.path.join(FIXTURES, "pi0_tiny_script.pt")
INPUTS = os.path.join(FIXTURES, "pi0_tiny.inputs.pt")
NOTE_EXCLUDE = r"(?:^|\.)(norm|ln|layernorm|emb|embed|vision_tower|vision|multi_modal_projector|lm_head)(?:\.|$)"


def start_quantize(directory, *extra, log=subprocess.PIPE):
    # stdbuf: line-buffered stdout, so the test sees each log line when it is printed.
    return subprocess.Popen(["stdbuf", "-oL", CLI, "quantize", MODEL, "-o", str(directory / "q.pt"), "--calib", INPUTS,
                             *extra], stdout=log, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OPENPI_DUQUANT_EXCLUDE=NOTE_EXCLUDE))


def leftovers(directory):
    return sorted(os.path.basename(path) for path in glob.glob(str(directory / "*")))


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_while_quantizing_leaves_no_file(tmp_path, signal_number):
    process = start_quantize(tmp_path)
    for line in process.stdout:
        if line.startswith("[DUQUANT] Matched Linear layers:"):
            break
    # The pipeline (calibration, 252 DuQuant transforms) has started; nothing is written yet.
    process.send_signal(signal_number)
    process.communicate(timeout=120)
    assert process.returncode == -signal_number
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_while_writing_removes_the_temporary_and_the_report(tmp_path, signal_number):
    # The signal must land while a temporary file exists: poll for it and signal at once. A run
    # that finishes writing before the poll sees the file is retried.
    for attempt in range(8):
        directory = tmp_path / f"attempt{attempt}"
        directory.mkdir()
        # The log goes to a file beside the attempt's directory: a pipe nobody reads while polling
        # would fill up and block the process before it ever writes.
        log_path = tmp_path / f"attempt{attempt}.log"
        with open(log_path, "w") as log:
            process = start_quantize(directory, "--method", "rtn", log=log)
            seen = None
            deadline = time.monotonic() + 600
            while process.poll() is None and seen is None:
                assert time.monotonic() < deadline, "quantize neither finished nor wrote within 600 s"
                temporaries = glob.glob(str(directory / "*.tmp*"))
                if temporaries:
                    process.send_signal(signal_number)
                    seen = temporaries
                else:
                    time.sleep(0.002)  # leave the CPU to the process being watched
            process.wait(timeout=120)
        output = log_path.read_text()
        if seen is None:
            assert process.returncode == 0, output[-2000:]
            continue
        if process.returncode == 0:
            continue  # the signal came after the last rename
        assert process.returncode == -signal_number, output[-2000:]
        assert leftovers(directory) == [], f"signalled while {seen} existed"
        return
    pytest.fail("no attempt signalled the process while it was writing")
