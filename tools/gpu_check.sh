#!/usr/bin/env bash
# GPU check of the mixport MoE kernels (correctness + timing table), < 8 minutes.
#   tools/gpu_check.sh            # on a GPU machine with torch + triton (no install needed)
#   tools/gpu_check.sh --interpret --small   # CPU smoke test
# Env: PYTHON (interpreter, default python3), GPU_CHECK_TIMEOUT (seconds, default 470).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
PY="${PYTHON:-python3}"
"${PY}" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
  "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))' >&2
exec timeout "${GPU_CHECK_TIMEOUT:-470}" "${PY}" "${ROOT}/tools/gpu_check.py" "$@"
