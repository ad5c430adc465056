"""The rank launcher: results in rank order, failures surface at once with the rank's traceback."""
import os
import socket
import time

import pytest

from eureka_megatron.runtime.launcher import RankError, launch
from eureka_megatron.runtime.ports import _ephemeral_low, free_port


def _rank_info(x):
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), x * 2


def _fail_on_rank1():
    if os.environ["RANK"] == "1":
        raise ValueError("bad shard on rank one")
    time.sleep(60)  # would hang forever in a collective; the launcher must not wait for it


def _fail_everywhere():
    """Rank 1 reports first, only the echo; rank 0's cause follows a moment later."""
    if os.environ["RANK"] == "1":
        raise RuntimeError("the sync failed elsewhere")
    time.sleep(0.5)
    raise RuntimeError("the engine refused the update")


def _die_hard():
    os._exit(7)


def _sleep():
    time.sleep(60)


def test_results_in_rank_order():
    assert launch(_rank_info, 3, 21) == [(0, 3, 42), (1, 3, 42), (2, 3, 42)]


def test_rank_exception_surfaces_fast():
    t0 = time.monotonic()
    with pytest.raises(RankError, match="rank 1 failed") as e:
        launch(_fail_on_rank1, 2)
    assert "bad shard on rank one" in str(e.value)
    assert time.monotonic() - t0 < 30


def test_every_ranks_failure_is_reported_with_the_first():
    with pytest.raises(RankError) as e:
        launch(_fail_everywhere, 2)
    msg = str(e.value)
    assert "rank 0 failed" in msg and "the engine refused the update" in msg
    assert "rank 1 failed" in msg and "failed elsewhere" in msg


def test_rank_that_dies_is_reported():
    with pytest.raises(RankError, match="exit code 7"):
        launch(_die_hard, 2)


def test_timeout_kills_ranks():
    with pytest.raises(TimeoutError, match="still running"):
        launch(_sleep, 2, timeout=3)


def _report_pid_and_sleep(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)


def _kill_launcher_of(tmp_path, rank_fn: str, n_pids: int) -> list[int]:
    """Start a launcher of `rank_fn` (which writes `n_pids` pids to a file) in a process of its
    own, SIGKILL it once the pids are written (no finally runs), and return them."""
    import signal
    import subprocess
    import sys

    pid_file = tmp_path / "pids"
    script = ("from eureka_megatron.runtime.launcher import launch\n"
              f"from tests.unit.test_launcher import {rank_fn}\n"
              f"launch({rank_fn}, 1, {str(pid_file)!r})\n")
    parent = subprocess.Popen([sys.executable, "-c", script],
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and len(pid_file.read_text().split()) == n_pids):
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.1)
    pids = [int(p) for p in pid_file.read_text().split()]
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    return pids


def test_ranks_exit_when_the_launcher_is_killed(tmp_path):
    """SIGKILL of the launching process (no finally runs) must not leave ranks training on."""
    import signal

    (rank_pid,) = _kill_launcher_of(tmp_path, "_report_pid_and_sleep", 1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(rank_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(rank_pid, signal.SIGKILL)
    pytest.fail("the rank outlived its launcher")


def _start_a_writer_then_fail(path):
    """Like a checkpoint writer process of a rank whose save failed."""
    import subprocess

    child = subprocess.Popen(["sleep", "120"])
    with open(path, "w") as f:
        f.write(str(child.pid))
    raise OSError("No space left on device")


def test_what_a_failed_rank_started_ends_with_it(tmp_path):
    pid_file = tmp_path / "child.pid"
    with pytest.raises(RankError, match="No space left on device"):
        launch(_start_a_writer_then_fail, 1, str(pid_file))
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # dead, not yet reaped
                    return
        except FileNotFoundError:
            return
        time.sleep(0.2)
    os.kill(child, 9)
    pytest.fail("the failed rank's child process outlived it")


def _report_pids_with_a_child_and_sleep(path):
    import subprocess

    child = subprocess.Popen(["sleep", "120"])
    with open(path, "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    time.sleep(120)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_killed_launcher_takes_the_ranks_children_too(tmp_path):
    """SIGKILL of the launcher: the rank exits with what it started (a checkpoint writer)."""
    import signal

    pids = _kill_launcher_of(tmp_path, "_report_pids_with_a_child_and_sleep", 2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if not _gone(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, "the rank or its child outlived the launcher"


def test_free_port_is_below_the_ephemeral_range_and_bindable():
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1 and all(20000 <= p < _ephemeral_low() for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))  # free when handed out
