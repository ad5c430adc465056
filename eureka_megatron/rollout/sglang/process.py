"""The lifecycle of a server process this trainer launched: start, wait until healthy, kill."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from typing import Callable

from eureka_megatron.rollout.engine import EngineDeadError


class ServerProcess:
    """One server command in its own process group (so it is killed whole, with the scheduler and
    detokenizer processes SGLang forks), its output in a log file."""

    def __init__(self, command: list[str], *, env: dict[str, str] | None = None,
                 log_path: str | None = None):
        self.command, self.env, self.log_path = command, env, log_path
        self._popen: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self, url: str, healthy: Callable[[], bool], timeout: float) -> None:
        """Start the command and return once `healthy()` is true; EngineDeadError (with the log's
        tail) when it exits first or is not healthy within `timeout` seconds."""
        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix="sglang-", suffix=".log")
            os.close(fd)
        env = dict(os.environ, **(self.env or {}))
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                           env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            code = self._popen.poll()
            if code is not None:
                self.kill()
                raise EngineDeadError(f"SGLang server {url} exited with code {code} before it "
                                      f"was healthy{self._argparse_reason()}; {self.log_tail()}")
            if healthy():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise EngineDeadError(f"SGLang server {url} was not healthy within "
                                      f"{timeout:.0f}s; {self.log_tail()}")
            time.sleep(0.25)

    def _argparse_reason(self) -> str:
        """argparse's own error line (an unknown or malformed flag), ahead of its usage dump."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 2000))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except (OSError, TypeError):
            return ""
        reasons = [ln for ln in lines if re.match(r"^\S+: error: ", ln)]
        return f" ({reasons[-1]})" if reasons else ""

    def log_tail(self, nbytes: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - nbytes))
                tail = f.read().decode("utf-8", "replace")
        except (OSError, TypeError) as e:
            return f"log {self.log_path} unreadable ({e})"
        return f"command {' '.join(self.command)!r}, log {self.log_path} ends:\n{tail}"

    def kill(self) -> None:
        p, self._popen = self._popen, None
        if p is None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=20)
        except (ProcessLookupError, PermissionError):
            pass
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=20)
        try:  # children (scheduler, detokenizer) that outlived the leader
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
