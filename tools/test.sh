#!/usr/bin/env bash
# The whole test suite, as CI runs it:
#   1. the project and its test tools into .venv, then every test (SGLang-API tests skip there);
#   2. SGLang's real Python code into .venv-sglang (tools/install-sglang-api.sh), then the
#      `sglang_api` tier: our SGLang client against SGLang's own server app, on the CPU.
# Extra arguments go to both pytest runs (e.g. -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh test
# two workers, a test file each (its fixtures stay shared): spawning ranks and importing torch
# leave cores idle that the other worker fills (xdist starts the files with most tests first:
# a multi-rank file then runs beside single-process ones; running the slow files first instead
# put two multi-rank files side by side on the 2 cores and was slower); the slowest tests are
# listed at the end
.venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=30 "$@"
bash tools/install-sglang-api.sh
.venv-sglang/bin/python -m pytest -q -m sglang_api tests/sglang_api "$@"
