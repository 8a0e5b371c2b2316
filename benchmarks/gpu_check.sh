#!/usr/bin/env bash
# One-GPU check of the toolkit's training paths (SE fine-tuning of a FLUX-sized and a CogVideoX-sized AE, DiT-B/2 and
# DiT-XL/2 flow-matching steps, both training scripts under FSDP): one markdown table, at most 5 minutes on an H200,
# no downloads. Without CUDA (or with --tiny) every row runs at tiny sizes in float32 on the CPU in seconds.
# Flags go to benchmarks/gpu_check.py (see --help), e.g.
#
#   bash benchmarks/gpu_check.sh                       # on the GPU machine
#   bash benchmarks/gpu_check.sh --tiny                # anywhere
#   bash benchmarks/gpu_check.sh --rows ae dit --json gpu_check.json
#
# GPU_CHECK_HARD_TIMEOUT_S (default 300) kills the check if its own budget (--budget_s, 285 s) fails to stop it; the
# rows finished by then are already printed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export WANDB_MODE=disabled MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python}"
if command -v timeout >/dev/null 2>&1; then
  exec timeout --kill-after=10 "${GPU_CHECK_HARD_TIMEOUT_S:-300}" "$PYTHON" benchmarks/gpu_check.py "$@"
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
