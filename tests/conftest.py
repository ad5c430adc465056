"""Shared test setup: markers, and skipping GPU/SGLang tests where they cannot run."""
import importlib.util
import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter, which must be chosen before triton is
# first imported -- and transformers' image processors import it. Set here, before any test module
# is collected, so the kernel tests do not depend on collection order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Skip what cannot run here (CI's file order is pytest-xdist's own: tools/test.sh)."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_sglang = pytest.mark.skip(reason="needs sglang installed")
    have_sglang = importlib.util.find_spec("sglang") is not None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "sglang" in item.keywords and not have_sglang:
            item.add_marker(no_sglang)


# --- nothing a test started outlives the suite ------------------------------------------------
# Every process the suite starts inherits this marker; at the end, spawned ranks and CLI
# processes that still carry it are reported (and killed) and the run fails: on a cluster such a
# leftover rank holds its GPU.
SESSION_MARKER = "EUREKA_TEST_SESSION"
os.environ[SESSION_MARKER] = str(os.getpid())
LEFTOVER_KINDS = ("multiprocessing.spawn", "eureka_megatron.cli", "eureka_megatron.bench")


def leftover_processes() -> list[tuple[int, str]]:
    """(pid, command line) of this session's rank and CLI processes still alive."""
    marker = f"{SESSION_MARKER}={os.environ[SESSION_MARKER]}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry.name}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if marker in env and not zombie and any(k in cmd for k in LEFTOVER_KINDS):
            found.append((int(entry.name), cmd))
    return found


def pytest_sessionfinish(session, exitstatus):
    if not os.path.isdir("/proc"):
        return
    import signal
    import time

    deadline = time.monotonic() + 10.0  # ranks notice a dead launcher within a second or two
    while (left := leftover_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        for pid, _ in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        lines = "\n".join(f"  pid {pid}: {cmd[:200]}" for pid, cmd in left)
        session.config.get_terminal_writer().line(
            f"\n{len(left)} process(es) started by the tests outlived them (killed now):\n{lines}",
            red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
