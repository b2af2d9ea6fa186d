"""Fold error of every zoo variant: folded float32 net vs. multi-branch net on a probe batch.

Weights are synthetic but trained-looking (BN statistics measured on data). Run:
    .venv/bin/python benchmarks/fold_error.py [--probe-size 64]
"""

from __future__ import annotations

import argparse

from rvdeploy.arch import ZOO_NAMES, zoo_spec
from rvdeploy.reparam import fuse
from rvdeploy.synthetic import trained_like_state_dict
from rvdeploy.weights import TrainWeights

from results_io import write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--probe-size", type=int, default=64)
    args = parser.parse_args()
    rows = []
    for name in ZOO_NAMES:
        spec = zoo_spec(name)
        weights = TrainWeights(spec, trained_like_state_dict(spec, seed=0))
        _, report = fuse(weights, probe_size=args.probe_size)
        rows.append({"arch": name, "layers": len(spec.blocks), **report.to_dict()})
        print(f"{name:12s} max abs {report.max_abs_error:.3g}  rel {report.max_rel_error:.3g}  "
              f"float64 rel {report.float64_rel_error:.3g}  float32 noise {report.float32_noise_rel:.3g}")
    columns = [("arch", "arch"), ("layers", "conv layers"), ("max_abs_error", "max abs error"),
               ("max_rel_error", "max rel error"), ("float64_rel_error", "float64 rel error"),
               ("float32_noise_rel", "float32 noise (multi-branch)"), ("tolerance_rel", "tolerance")]
    notes = ("Relative errors are max |difference| / max |multi-branch output| over a "
             f"2x3x{args.probe_size}x{args.probe_size} probe, 1000 classes. float32 noise is the multi-branch "
             "net's own float32-vs-float64 difference; the fold passes when it stays within 10x of it.")
    print(write_results("fold_error", rows, columns, notes))


if __name__ == "__main__":
    main()
