"""A change's cost on a GPU: the same two benchmarks on two source trees, one after the other, on one GPU.

    git archive REV src bench | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    python bench/before_after.py --before /tmp/before --ckpt /tmp/wanckpt [--parts forward pipeline]

``forward``: one DiT forward at 720P with the stack a one-GPU run executes (``dit_forward.py``'s
``plan`` mode in both trees; ``--before-mode`` names it for a tree older than that mode). ``pipeline``: a short 720P run on one GPU (``multi_gpu.py --plans 1gpu``: load, one
warm-up step, then ``--steps`` timed), its seconds per step and each stage's peak memory. Prints
after / before for each figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# What runs the default stack in each tree's dit_forward.py: `plan` in trees since 2026-11-30 (older
# trees: --before-mode ours+fused+gelu-epilogue+compile).
FORWARD_MODE = "plan"


def run(tree: Path, script: str, args: list[str], out: Path) -> dict:
    command = [sys.executable, str(tree / "bench" / script), *args, "--json", str(out)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the source tree to compare with (its src/ and bench/)")
    parser.add_argument("--ckpt", type=Path, required=True, help="the full-size random checkpoint (written if absent)")
    parser.add_argument("--parts", nargs="+", default=["forward", "pipeline"], choices=["forward", "pipeline"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--before-mode", default=FORWARD_MODE, help=f"dit_forward.py's mode of the default stack in the before tree (default {FORWARD_MODE})")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": HERE.parent}
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            for name, tree in trees.items():
                out = Path(tmp, f"{part}-{name}.json")
                if part == "forward":
                    result = run(tree, "dit_forward.py", ["--modes", args.before_mode if name == "before" else FORWARD_MODE, "--sizes", "720P"], out)
                    row = result["results"][0]
                    report[f"forward {name}"] = {"seconds": row["seconds"], "activation_peak_gb": row["activation_peak_gb"]}
                else:
                    result = run(tree, "multi_gpu.py", ["--plans", "1gpu", "--sizes", "720P", "--steps", str(args.steps), "--ckpt", str(args.ckpt)], out)
                    row = result["runs"]["720P 1gpu"]
                    report[f"pipeline {name}"] = {"step_seconds": row["step_seconds"], "peak_gb": max(row["stage_peaks_gb"].values()),
                                                  "stage_peaks_gb": row["stage_peaks_gb"], "plan": row["plan"]}  # fmt: skip
            before, after = report[f"{part} before"], report[f"{part} after"]
            for key in ("seconds", "activation_peak_gb", "step_seconds", "peak_gb"):
                if key in before:
                    print(f"{part} {key}: before {before[key]:.4f}, after {after[key]:.4f}, after/before {after[key] / before[key]:.4f}", flush=True)
            if args.json:
                args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
