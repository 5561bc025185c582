#!/usr/bin/env bash
# Trains the embedded default model from scratch on the synthetic video world and installs it as
# model/assets/default (CPU, 2 threads; 46-58 minutes on a 2-core machine). Deterministic for a seed on one
# machine: run after run it trains the same weights. Another machine (or other builds of the libraries) trains a
# different model from the first stage on, and so far a weaker one: see model/assets/default/README.md.
#   stage 0: the vision encoder alone, on single frames labelled with the colour each kind of shape wears
#            (30% of them frames where one shape covers part of another)
#   stage 1: single newest frames, questions about the present (vision encoder frozen from here on)
#   stage 2: whole clips (every 6th-9th frame) with one question of every type each clip answers, memory on;
#            30% of them from busy videos (every event at once), which are 4% of random ones
#   stage 3: stage 2 continued on 8,000 fresh clips (another seed) at a lower peak learning rate; in the run
#            that trained the shipped weights it lifted "what colour was it before it changed" where the
#            earlier colour is in full view in 0-1 frames
# Usage: bash scripts/train_default.sh [RUN_DIR]   (default: runs/default)
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/default}
py=.venv/bin/python
export OMP_WAIT_POLICY=PASSIVE
# The input the clips below train on, saved with the model so that the engine feeds it the same: one frame per
# second of the 8 fps videos (strides 6-9 around 8), each frame its own Shot.
ingest='{"enabled": false, "sample_fps": 1.0}'

$py -m mixmalmm.model.train --out "$run/stage1" --present-frame --train-llm \
    --sampling uniform --frames 1,1 --kinds colour_now,shape_now,count_now \
    --train-size 36000 --epochs 1 --batch-size 32 --val-size 200 --lr 2e-3 --warmup-steps 50 \
    --qformer-layers 3 --cross-attention-frequency 1 --threads 2 --log-every 50 \
    --vision-steps 2400 --vision-videos 1500 --vision-overlap 0.3

$py -m mixmalmm.model.train --out "$run/stage2" --init "$run/stage1/model" --present-frame --train-llm \
    --videos --strides 6,9 --at-end 0.7 --adhoc-fraction 0.25 --busy 0.3 \
    --train-size 30000 --epochs 1 --batch-size 8 --val-size 60 --lr 7e-4 --warmup-steps 50 \
    --threads 2 --log-every 50 --eval-every 500

$py -m mixmalmm.model.train --out "$run/stage3" --init "$run/stage2/model" --present-frame --train-llm \
    --videos --strides 6,9 --at-end 0.7 --adhoc-fraction 0.25 --busy 0.3 \
    --train-size 8000 --epochs 1 --batch-size 8 --val-size 60 --lr 3e-4 --warmup-steps 20 --seed 10 \
    --threads 2 --log-every 100 --eval-every 500 --ingest "$ingest"

mkdir -p model/assets/default
find model/assets/default -mindepth 1 ! -name README.md -exec rm -rf {} +  # the README is written by hand
cp -r "$run/stage3/model/." model/assets/default/
echo "installed $run/stage3/model as model/assets/default"
