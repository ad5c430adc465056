"""`python -m sglang.launch_server` command lines, checked by the installed SGLang's own parser."""
from __future__ import annotations

import argparse
import importlib.util
from typing import Sequence

DETERMINISTIC_FLAG = "--enable-deterministic-inference"  # per-request sampling_seed honoured
MEMORY_SAVER_FLAG = "--enable-memory-saver"              # release / resume of GPU memory
WEIGHTS_BACKUP_FLAG = "--enable-weights-cpu-backup"      # released weights survive on the host
ROUTED_EXPERTS_FLAG = "--enable-return-routed-experts"   # MoE: requests may ask for their routing


def sglang_available() -> bool:
    return importlib.util.find_spec("sglang") is not None


def server_flags(model_path: str, *, tp: int = 1, mem_fraction_static: float | None = None,
                 host: str = "127.0.0.1", port: int = 30000, weight_version: int | None = 0,
                 deterministic: bool = False, extra_args: Sequence[str] | None = None) -> list[str]:
    """The server's flags (names as ServerArgs.add_cli_args spells them).

    deterministic: SGLang ignores a request's `sampling_seed` unless the server runs with
        --enable-deterministic-inference (sglang/srt/sampling/sampling_batch_info.py); that mode
        uses batch-invariant kernels, which cost throughput, so it is asked for, not implied."""
    flags = ["--model-path", str(model_path), "--tp-size", str(tp), "--host", host,
             "--port", str(port)]
    if mem_fraction_static is not None:
        flags += ["--mem-fraction-static", str(mem_fraction_static)]
    if weight_version is not None:
        flags += ["--weight-version", str(weight_version)]
    extra = [str(a) for a in (extra_args or ())]
    if deterministic and DETERMINISTIC_FLAG not in extra:
        flags.append(DETERMINISTIC_FLAG)
    return flags + extra


class _Refused(Exception):
    pass


class _QuietParser(argparse.ArgumentParser):
    """argparse that raises instead of printing 40 KB of usage and exiting with code 2."""

    def error(self, message):
        raise _Refused(message)


def validate_server_flags(flags: Sequence[str]) -> None:
    """Parse `flags` with the installed sglang's ServerArgs parser (a no-op without sglang).

    Names, types and choices are checked against that version, and the error names the flags
    it did not know. Constructing ServerArgs itself would run its __post_init__, which probes
    GPUs and the model config in this process, so only the parser runs."""
    if not sglang_available():
        return
    from sglang.srt.server_args import ServerArgs

    parser = _QuietParser(prog="sglang.launch_server", add_help=False)
    ServerArgs.add_cli_args(parser)
    try:
        _, unknown = parser.parse_known_args(list(flags))
    except _Refused as e:
        raise ValueError(f"invalid SGLang server arguments: {e}") from None
    if unknown:
        raise ValueError(f"SGLang does not know the server argument(s) {unknown} "
                         "(check the spelling against `python -m sglang.launch_server --help`)")
