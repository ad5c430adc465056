"""The errors both rank launchers (local processes, Ray actors) raise; torch-free so either can."""
from __future__ import annotations

from eureka_megatron.errors import UserError


class RankError(RuntimeError):
    """A rank raised or died; the message holds its traceback or exit code."""


class RankUserError(UserError):
    """A rank stopped on input the user can fix (a full disk, a bad checkpoint, bad data): the
    CLI prints the one line, as for the same error before the ranks started."""
