"""The figures of ``benchmarks/scale.py`` on a GPU: GPT-2 small (124M parameters) trained with AdamW
on CUDA, plain and probed (tracking only), each configuration in a fresh process.

Prints the same table as ``scale.py`` (host peak RSS, the probe's extra memory as a multiple of the
parameter bytes, per-step tracking as a fraction of a training step) plus the GPU's peak allocated
memory and the probe's extra GPU memory. The configurations add ``state_device="cpu"`` (recipe
states in pinned host memory: the probe's extra GPU memory should fall to the gradient's size or
less, its host memory rise by the states). ``--measure`` runs one full measurement on the GPU.

    python benchmarks/gpu.py [--steps 20] [--measure] [--batch 8]

Without CUDA it stops with a clear message (and exit status 2) instead of measuring the CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

GPU_CONFIGS = ["plain", "probe fp32", "probe bf16", "probe state_device=cpu", "probe recipes=4"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--configs", nargs="*", default=GPU_CONFIGS)
    ap.add_argument("--max-rss-gib", type=float, default=64.0)
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    import torch

    if not args.device.startswith("cuda"):
        print(f"gpu.py measures CUDA devices; for {args.device!r} run benchmarks/scale.py", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(
            f"gpu.py: CUDA is not available (torch {torch.__version__}, "
            f"{'a CPU-only build' if torch.version.cuda is None else 'no visible GPU'}); nothing measured. "
            "Run benchmarks/scale.py for the CPU figures.",
            file=sys.stderr,
        )
        return 2
    print(f"GPU: {torch.cuda.get_device_name(args.device)}, CUDA {torch.version.cuda}")
    import scale

    forward = ["--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--context", str(args.context), "--threads", str(min(8, torch.get_num_threads())),
               "--max-rss-gib", str(args.max_rss_gib), "--timeout", str(args.timeout), "--configs", *args.configs]
    if args.measure:
        forward.append("--measure")
    scale.main(forward)
    return 0


if __name__ == "__main__":
    sys.exit(main())
