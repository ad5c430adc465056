#!/usr/bin/env bash
# Install eureka-megatron (editable) into ./.venv, creating it if needed.
#   bash tools/install.sh            # core dependencies
#   bash tools/install.sh test       # + test tools       (any extras: "gpu", "gpu,test", ...)
# Without an NVIDIA GPU, torch is pinned to the CPU wheel (EUREKA_CPU_TORCH, default 2.13.0):
# an unpinned torch pulls gigabytes of CUDA wheels. Where that CPU wheel is not on a local
# index, set EUREKA_TORCH_INDEX=https://download.pytorch.org/whl/cpu. With a GPU nothing is
# pinned, so the container's CUDA torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${EUREKA_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
args=()
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
  constraints="$venv/cpu-constraints.txt"
  echo "torch==${EUREKA_CPU_TORCH:-2.13.0}" > "$constraints"
  args+=(--constraint "$constraints")
  if [ -n "${EUREKA_TORCH_INDEX:-}" ]; then
    args+=(--extra-index-url "$EUREKA_TORCH_INDEX")
  fi
fi
spec="."
if [ -n "$extras" ]; then
  spec=".[$extras]"
fi
echo "installing eureka-megatron${extras:+[$extras]} into $venv ..."
"$py" -m pip install --quiet "${args[@]}" -e "$spec" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"$py" -W ignore -c "import torch, megatron.core, eureka_megatron; print('ok: torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| cuda', torch.cuda.is_available())"
