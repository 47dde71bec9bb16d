#!/usr/bin/env bash
# The GPU checks in one short run (for a lent H100/H200, whose Python has torch, timm, torch-geometric and
# pyarrow only): the FlexAttention path against the padded one on the card, then the training benchmark at
# the reference size with compiled blocks, against the padded baseline, with the chip's bf16 matmul rate.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python - <<'PY'
import torch
from geojepa.model.jepa import Encoder, ModelConfig
from geojepa.model.layers import Packing
torch.manual_seed(0)
enc = Encoder(ModelConfig(dims=(8, 0, 0), width=384, depth=2, heads=8, mlp=1536)).cuda().eval()
lengths = torch.randint(5, 1250, (64,)).tolist()
doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).cuda()
x = torch.randn(len(doc), 384, device="cuda")
with torch.no_grad():
    a = enc(x, Packing(doc, len(lengths), flex=True))
    b = enc(x, Packing(doc, len(lengths), flex=False))
print(f"flex vs padded on {torch.cuda.get_device_name()}: max abs diff {(a - b).abs().max().item():.2e} "
      f"over {len(doc):,} tokens")
PY
python bench/train.py --full --compile on
python bench/train.py --full --compile off --steps 10
