"""What a cold restore reads besides the weights: zero pages in CRIU's pages images, and the working set's
ranges (how many, how large), for the reference worker at a bench shape.

    python3 bench/probes/image_zeros.py [--shape 1b] [--work /var/tmp/warmstart-probe]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu  # noqa: E402  bench/gpu.py

from warmstart import registry  # noqa: E402
from warmstart.artifact.manifest import IMAGES_DIR  # noqa: E402
from warmstart.image import readahead  # noqa: E402
from warmstart.pipeline import checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b", choices=sorted(gpu.SHAPES))
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/warmstart-probe"))
    args = ap.parse_args()
    model_dir = gpu.ensure_model(args.shape)
    name = f"probe-{args.shape}"
    gpu.stop(name)
    gpu.cold_start(args.shape, model_dir, name, True)
    art = args.work / name
    shutil.rmtree(art, ignore_errors=True)
    try:
        m = checkpoint.checkpoint(registry.get(name).pid, art, record=registry.get(name), leave_running=False).manifest
        zero = bytes(4096)
        for p in readahead.pages_images(art / IMAGES_DIR):
            data = p.read_bytes()
            pages = len(data) // 4096
            zeros = sum(data[i:i + 4096] == zero for i in range(0, len(data), 4096))
            print(f"{p.name}: {len(data) / 1e9:.3f} GB, {zeros} of {pages} pages all zero "
                  f"({zeros * 4096 / 1e9:.3f} GB)", flush=True)
        sizes = sorted(n for f in m.working_set for _, n in f.ranges)
        total = sum(sizes)
        print(f"working set: {len(m.working_set)} files, {len(sizes)} ranges, {total / 1e9:.3f} GB; ranges under "
              f"64 KiB: {sum(s < 65536 for s in sizes)} ({sum(s for s in sizes if s < 65536) / 1e9:.3f} GB), median "
              f"{sizes[len(sizes) // 2] if sizes else 0} B, largest {sizes[-1] if sizes else 0} B", flush=True)
    finally:
        gpu.stop(name)
        shutil.rmtree(art, ignore_errors=True)


if __name__ == "__main__":
    main()
