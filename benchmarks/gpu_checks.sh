#!/usr/bin/env bash
# The GPU checks, in one run (about 8 minutes on one H200): the fused-loss benchmark, the scale
# benchmark (1 process plain vs FSDP on one GPU), and a tiny distillation through the CLI on CUDA
# in bf16, plain, FSDP and FSDP with the teacher offloaded to CPU (torchrun, 1 process, NCCL). Outputs go to $OUT (default /tmp/alambic-gpu).
#
#   PYTHONPATH=$PWD/src bash benchmarks/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-/tmp/alambic-gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1
PY=${PY:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
$PY -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"

echo "== kd_loss.py --device cuda"
timeout 240 $PY benchmarks/kd_loss.py --device cuda 2>&1 | tee "$OUT/kd_loss_gpu.txt"

echo "== scale.py --device cuda"
timeout 200 $PY benchmarks/scale.py --device cuda 2>&1 | tee "$OUT/scale_gpu.txt"

echo "== tiny distillation on CUDA (bf16), plain and FSDP"
TINY=/tmp/alambic-tiny
{
  timeout 120 $PY -m alambic.testing "$TINY" >/dev/null &&
  sed "s#runs/tiny#$TINY#g" configs/tiny_kd.yaml > /tmp/tiny_kd_gpu.yaml &&
  timeout 90 $PY -m alambic.cli distill /tmp/tiny_kd_gpu.yaml train.cpu=false train.mixed_precision=bf16 \
      train.max_steps=30 train.output_dir=/tmp/gpu_plain && echo "plain cuda bf16: exit 0" &&
  timeout 120 torchrun --standalone --nproc_per_node 1 -m alambic.cli distill /tmp/tiny_kd_gpu.yaml \
      train.cpu=false train.mixed_precision=bf16 train.strategy=fsdp train.max_steps=30 \
      train.output_dir=/tmp/gpu_fsdp && echo "fsdp cuda bf16 (torchrun, 1 process): exit 0" &&
  timeout 120 torchrun --standalone --nproc_per_node 1 -m alambic.cli distill /tmp/tiny_kd_gpu.yaml \
      train.cpu=false train.mixed_precision=bf16 train.strategy=fsdp train.fsdp.teacher_offload=true \
      train.max_steps=30 train.output_dir=/tmp/gpu_fsdp_offload && echo "fsdp + teacher_offload: exit 0" &&
  tail -n 2 /tmp/gpu_plain/metrics.jsonl /tmp/gpu_fsdp/metrics.jsonl /tmp/gpu_fsdp_offload/metrics.jsonl
} 2>&1 | tee "$OUT/distill_gpu.txt"
