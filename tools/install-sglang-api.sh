#!/usr/bin/env bash
# A separate venv (.venv-sglang) holding SGLang's real Python code for the `-m sglang_api` tier.
#   bash tools/install-sglang-api.sh
# SGLang cannot serve on a CPU, but its server app, request classes, serializer and weight-update
# logic import and run once its GPU-only imports are stubbed (tests/sglang_api/conftest.py).
# SGLang itself goes in with --no-deps (its dependency list pulls CUDA wheels); its small
# pure-Python requirements go in at SGLang's own pins (transformers, openai). torch stays the
# CPU wheel. SGLANG_VERSION picks the SGLang release under test (default 0.5.23).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${EUREKA_SGLANG_VENV:-.venv-sglang}"
sglang="${SGLANG_VERSION:-0.5.23}"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
constraints="$venv/cpu-constraints.txt"
echo "torch==${EUREKA_CPU_TORCH:-2.13.0}" > "$constraints"
args=(--quiet --constraint "$constraints")
if [ -n "${EUREKA_TORCH_INDEX:-}" ]; then
  args+=(--extra-index-url "$EUREKA_TORCH_INDEX")
fi
echo "installing sglang==$sglang (its Python code only) into $venv ..."
"$py" -m pip install "${args[@]}" "torch==${EUREKA_CPU_TORCH:-2.13.0}"
"$py" -m pip install "${args[@]}" --no-deps "sglang==$sglang" compressed-tensors==0.18.0 \
  loguru gguf partial-json-parser
"$py" -m pip install "${args[@]}" numpy orjson psutil pybase64 requests packaging pillow \
  starlette msgspec pydantic pydantic-core pyzmq tqdm IPython aiohttp triton dill \
  transformers==5.19.0 openai==2.8.0 fastapi uvicorn einops jsonschema python-multipart \
  httpx pytest pytest-timeout pyyaml safetensors
# eureka-megatron itself without its dependencies: the client under test needs only torch and
# the standard library (its megatron/ray pins would fight SGLang's).
"$py" -m pip install "${args[@]}" --no-deps -e .
"$py" -c "import torch, sglang; print('ok: torch', torch.__version__, '| sglang', sglang.__version__)"
