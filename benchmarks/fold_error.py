"""Fold error of every zoo variant: the block-wise proof and the end-to-end figure it replaced.

Weights are synthetic but trained-looking: BN statistics fitted block by block to image-like
inputs, as training fits them. The probe is Gaussian, on which such nets can be chaotic. Run:
    .venv/bin/python benchmarks/fold_error.py [--probe-size 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess

from rvdeploy.arch import ZOO_NAMES, zoo_spec
from rvdeploy.reparam import fuse
from rvdeploy.synthetic import trained_like_state_dict
from rvdeploy.weights import TrainWeights

from results_io import RESULTS, write_results


def lscpu_model_name() -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--probe-size", type=int, default=64)
    args = parser.parse_args()
    rows = []
    for name in ZOO_NAMES:
        spec = zoo_spec(name)
        weights = TrainWeights(spec, trained_like_state_dict(spec, seed=0, inputs="image"))
        _, report = fuse(weights, probe_size=args.probe_size)
        rows.append({
            "arch": name,
            "layers": len(spec.blocks),
            "fused32_rel_error": report.float32_rel_error,
            "float32_noise_rel": report.float32_noise_rel,
            "max_rel_error": report.max_rel_error,
            "float64_rel_error": report.float64_rel_error,
            "worst_block": report.worst_block,
            "worst_block_rel_error": report.worst_block_rel_error,
            "worst_block_ratio": report.worst_block_ratio,
            "passed": report.passed,
            "check_seconds": report.seconds,
            "fold": report.to_dict(),
        })
        print(f"{name:12s} end to end: fused32 {report.float32_rel_error:.3g}, noise {report.float32_noise_rel:.3g}; "
              f"worst block {report.worst_block} rel {report.worst_block_rel_error:.3g}, "
              f"{report.worst_block_ratio:.2g} of budget; check {report.seconds:.1f} s", flush=True)
    columns = [("arch", "arch"), ("layers", "blocks"),
               ("fused32_rel_error", "end to end: folded fp32 vs fp64 ref"),
               ("float32_noise_rel", "end to end: multi-branch fp32 vs fp64 ref (noise)"),
               ("float64_rel_error", "end to end: folded fp64 vs fp64 ref"),
               ("worst_block", "worst block"), ("worst_block_rel_error", "its rel error (fp64)"),
               ("worst_block_ratio", "its error / budget"), ("passed", "passed"), ("check_seconds", "check (s)")]
    cpu = lscpu_model_name()
    notes = (
        f"CPU (lscpu model name): {cpu}. BN statistics fitted to image-like inputs (seed 0), 1000 classes, "
        f"Gaussian probe 2x3x{args.probe_size}x{args.probe_size}. End-to-end errors are max |difference| / "
        "max |multi-branch float64 output|: reported, never judged (a net chaotic on the probe has float32 "
        "noise of O(1)). The fold is judged block by block: each folded block against its own branches in "
        "float64, on its own input and on a Gaussian probe of that input's scale; the budget is 8 (fan-in + 10) "
        "u64 times the block's largest absolute term sum (carried through SE where there is one); "
        "a ratio above 1 fails."
    )
    path = write_results("fold_error", rows, columns, notes)
    json_path = RESULTS / "fold_error.json"
    data = json.loads(json_path.read_text())
    json_path.write_text(json.dumps({**data, "cpu_lscpu": cpu}, indent=2) + "\n")
    print(path)


if __name__ == "__main__":
    main()
