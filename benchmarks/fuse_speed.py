"""Wall time of `rvdeploy fuse` on a full-size zoo model (load, fold, self-check, save).

Makes a trained-looking training checkpoint of the variant (1000 classes), then times the CLI as a
user runs it, Python start-up included; with --busy also with a CPU-bound process on one core beside
it (the proof must not stall on a descheduled thread). Run:
    .venv/bin/python benchmarks/fuse_speed.py [--arch RepVGG-B3] [--repeat 3] [--busy]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from rvdeploy.arch import zoo_spec
from rvdeploy.synthetic import trained_like_state_dict

from results_io import time_command, write_results


def _spin() -> None:
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="RepVGG-B3")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--busy", action="store_true", help="also time it with one core busy")
    args = parser.parse_args()
    spec = zoo_spec(args.arch)
    rvdeploy = Path(sys.executable).with_name("rvdeploy")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, out = Path(tmp) / "train.pth", Path(tmp) / "fused.pth"
        torch.save({"state_dict": trained_like_state_dict(spec)}, ckpt)
        size_mb = ckpt.stat().st_size / 1e6
        for busy in (False, True) if args.busy else (False,):
            spinner = multiprocessing.Process(target=_spin, daemon=True) if busy else None
            if spinner:
                spinner.start()
            try:
                times = time_command([str(rvdeploy), "fuse", str(ckpt), "-o", str(out)], args.repeat)
            finally:
                if spinner:
                    spinner.terminate()
            print(f"{spec.name} ({'one core busy' if busy else 'idle'}): " + ", ".join(f"{t:.2f} s" for t in times))
            rows.append({
                "arch": spec.name,
                "machine": "one core busy" if busy else "idle",
                "params_train_m": spec.param_count(False) / 1e6,
                "checkpoint_mb": size_mb,
                "wall_s_median": statistics.median(times),
                "wall_s_min": min(times),
                "wall_s_max": max(times),
                "runs": len(times),
            })
    columns = [("arch", "arch"), ("machine", "machine"), ("params_train_m", "train params (M)"),
               ("checkpoint_mb", "checkpoint (MB)"), ("wall_s_median", "wall s (median)"), ("wall_s_min", "min"),
               ("wall_s_max", "max"), ("runs", "runs")]
    print(write_results(f"fuse_speed_{spec.name}", rows, columns,
                        "Goal (issue 18): RepVGG-B3 in <= 5 s wall on the 2-core development machine, load and save "
                        "included; no explosion with one core busy."))


if __name__ == "__main__":
    main()
