#!/usr/bin/env bash
# GPU checks in one script (issue 19 item 7): run on a GPU node from the repository root with the
# project's environment installed. Decoding precision at 64 and 256 px on the GPU (float64 vs
# float32 vs bfloat16), then Ray Train against the plain loop on the GPU at 256 px (bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
for size in 64 256; do
  python benchmarks/decode_throughput.py --device cuda --image-size "$size" --n 4096 --batch-size 256
done
python benchmarks/train_throughput.py --epochs 4 --image-size 256 --use-gpu
