"""Parameters and forward time each head adds to a backbone, measured side by side in one run.

    python benchmarks/head_cost.py --backbone resnet50 --size 224 --batch 1 --repeats 20

Prints, per head, the parameters it adds (absolute and as % of the plain model)
and the median forward time relative to the plain model (same input, same
process, heads interleaved so drift hits all alike).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from selfcam import create_model
from selfcam.evaluate import count_params

METHODS = ("plain", "lfi", "lfi-light", "se", "abn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    methods = args.methods.split(",")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    models = {m: create_model(m, args.backbone, 1000).to(device).eval() for m in methods}
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    times: dict[str, list[float]] = {m: [] for m in methods}
    with torch.inference_mode():
        for m in methods:  # warm-up
            models[m](x)
        for _ in range(args.repeats):
            for m in methods:
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                models[m](x)
                if device == "cuda":
                    torch.cuda.synchronize()
                times[m].append(time.perf_counter() - t0)
    base_params = count_params(models["plain"])
    base_ms = 1000 * statistics.median(times["plain"])
    print(f"{args.backbone} @ {args.size}px, batch {args.batch}, {device}, median of {args.repeats}")
    print(f"{'head':10s} {'params':>12s} {'added':>12s} {'added %':>8s} {'ms':>9s} {'x plain':>8s}")
    for m in methods:
        p = count_params(models[m])
        ms = 1000 * statistics.median(times[m])
        print(f"{m:10s} {p:12,d} {p - base_params:12,d} {100 * (p - base_params) / base_params:7.2f}% {ms:9.1f} {ms / base_ms:8.3f}")


if __name__ == "__main__":
    main()
