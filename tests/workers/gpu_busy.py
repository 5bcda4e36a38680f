"""A CUDA process that keeps the GPU busy: batches of fp32 matmuls queued back to back, a line per batch."""

import sys

import torch

torch.backends.cuda.matmul.allow_tf32 = False  # slow on purpose: each batch runs for seconds
a = torch.randn(8192, 8192, device="cuda")
batch = 0
print("ready", flush=True)
while True:
    x = a
    for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 100):
        x = torch.mm(x, a) / 8192
    torch.cuda.synchronize()
    batch += 1
    print(f"batch {batch} {float(x[0, 0]):.4f}", flush=True)
