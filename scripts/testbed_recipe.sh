#!/usr/bin/env bash
# The memorization testbed recipe (docs/testbed.md): fit the tiny VAE on clean images, pretrain a
# base on clean images, fine-tune it on clean + planted copies with no mitigation, evaluate.
# One thread per process on purpose: the numbers in docs/testbed.md were measured that way.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
PY=${PY:-.venv/bin/python}
T=configs/testbed
time $PY -m data.testbed.fit_vae --config $T/common.yaml --out runs/testbed/tiny-ae --steps 1000
time $PY train/finetune.py --config $T/common.yaml --config $T/pretrain.yaml
time $PY train/finetune.py --config $T/common.yaml --config $T/finetune.yaml "$@"
$PY -m data.testbed.evaluate --model runs/testbed/finetune/final --out runs/testbed/eval-finetune
