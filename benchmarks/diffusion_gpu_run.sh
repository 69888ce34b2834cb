#!/usr/bin/env bash
# One diffusion method end to end on Fashion-MNIST (all 60,000 images), sized for a single GPU
# and a 10-minute slot: `benchmarks/diffusion_gpu_run.sh METHOD RUN_DIR [EPS]`.
# Settings (not the published 150 epochs at batch 4096, K=32: about 40 GPU-hours here):
# batch 512, EPOCHS (3) epochs, K (2) noise draws, clip 1e-3, Adam 3e-4, EMA 0.999, the default
# 1.84M-parameter U-Net.
set -euo pipefail
method=$1; run=$2; eps=${3:-10}; epochs=${EPOCHS:-3}; k=${K:-2}
D="python3 -m dpsynth"
$D select-public --run "$run" --method "$method" --sensitive fashionmnist --public mnist5k --sigma 5 --quiet
$D pretrain --run "$run" --method "$method" --epochs 10 --batch-size 64 --lr 3e-4 --quiet
$D finetune --run "$run" --method "$method" --sensitive fashionmnist --eps "$eps" --epochs "$epochs" --batch-size 512 \
   -K "$k" --physical-batch-size 128 --grad-sample-mode hooks --clip 1e-3 --lr 3e-4 --ema 0.999 --quiet --json
$D generate --run "$run" --n 10000 --steps 18 --batch-size 2000 --quiet --json
$D evaluate --run "$run" --quiet --json
$D ledger --run "$run"
