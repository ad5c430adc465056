"""The one error base the CLI reports without a traceback.

Every error a user can fix by changing their input (config, model or checkpoint directory, data,
eval options, an output path in the way) derives from `UserError`; the CLI prints its message and
exits 2. Anything else -- a bug -- propagates with its traceback. The subclasses below keep a
builtin base too, so `except FileNotFoundError` / `except ValueError` callers are unaffected.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix; the CLI prints it without a traceback."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the offending key."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A path the user named (model, data, inputs file) does not exist."""


class OutputExistsError(UserError, FileExistsError):
    """An output the user named already holds data they did not ask to replace."""
