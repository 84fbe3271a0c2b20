#!/usr/bin/env bash
# The memorization testbed recipe (docs/testbed.md): fit the tiny VAE on clean images, pretrain a
# base on clean images, fine-tune it on clean + planted copies with no mitigation, evaluate.
#   bash scripts/testbed_recipe.sh                       # OpenMoji, into runs/testbed
#   RUNS=runs/twemoji bash scripts/testbed_recipe.sh data.testbed.source=folder:runs/sources/twemoji
# Extra key=value overrides go to every stage. One thread per process on purpose: the numbers in
# docs/testbed.md were measured that way.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/testbed}
T=configs/testbed
time $PY -m launch.testbed.fit_vae --config $T/common.yaml --out $RUNS/tiny-ae --steps 1000 --bpe-merges 2000 "$@"
time $PY train/finetune.py --config $T/common.yaml --config $T/pretrain.yaml \
  output_dir=$RUNS/base model.pretrained=$RUNS/tiny-ae "$@"
time $PY train/finetune.py --config $T/common.yaml --config $T/finetune.yaml \
  output_dir=$RUNS/finetune model.pretrained=$RUNS/base/final "$@"
$PY -m launch.testbed.evaluate --model $RUNS/finetune/final --out $RUNS/eval-finetune
