"""The error both rank launchers (local processes, Ray actors) raise; torch-free so either can."""
from __future__ import annotations


class RankError(RuntimeError):
    """A rank raised or died; the message holds its traceback or exit code."""
