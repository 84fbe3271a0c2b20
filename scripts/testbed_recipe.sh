#!/usr/bin/env bash
# The memorization testbed recipe (docs/testbed.md): build the testbed folder, fit the tiny VAE on
# its clean images, pretrain a base on clean images, fine-tune it on clean + planted copies with no
# mitigation, evaluate.
#   bash scripts/testbed_recipe.sh                       # OpenMoji, into runs/testbed
#   RUNS=runs/twemoji BUILD="--source folder:runs/sources/twemoji" bash scripts/testbed_recipe.sh
#   RUNS=runs/v6 DATA=configs/testbed/data_v6.yaml MODEL=configs/testbed/model_v6.yaml bash scripts/testbed_recipe.sh
# BUILD: extra python -m data.testbed flags (over configs/testbed/data.yaml). Extra key=value
# overrides go to every training stage. One thread per process on purpose: the numbers in
# docs/testbed.md were measured that way.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/testbed}
T=configs/testbed
DATA=${DATA:-$T/data.yaml}                  # the testbed's knobs (v6: configs/testbed/data_v6.yaml)
COMMON=(--config $T/common.yaml)
[ -n "${MODEL:-}" ] && COMMON+=(--config "$MODEL")   # a model overlay (v6: configs/testbed/model_v6.yaml)
# shellcheck disable=SC2086  # BUILD is a list of flags
$PY -m data.testbed --config "$DATA" --out $RUNS/data --overwrite ${BUILD:-}
time $PY -m launch.testbed.fit_vae "${COMMON[@]}" --out $RUNS/tiny-ae --steps 1000 --bpe-merges 2000 \
  data.path=$RUNS/data "$@"
time $PY train/finetune.py "${COMMON[@]}" --config $T/pretrain.yaml \
  output_dir=$RUNS/base model.pretrained=$RUNS/tiny-ae data.path=$RUNS/data "$@"
time $PY train/finetune.py "${COMMON[@]}" --config $T/finetune.yaml \
  output_dir=$RUNS/finetune model.pretrained=$RUNS/base/final data.path=$RUNS/data "$@"
$PY -m launch.testbed.evaluate --model $RUNS/finetune/final --out $RUNS/eval-finetune
