"""The CI gate's noise: how far an unchanged tree's p50 wanders from the committed baseline.

Runs the gate's exact measurement N times on this machine and reports, raw and normalised, the
change against `benchmarks/baselines/ci_cpu_a0.json` and how many runs a given threshold would have
failed (false alarms). Run:
    .venv/bin/python benchmarks/gate_noise.py [--runs 20] [--threshold 20]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rvdeploy.bench import BenchSettings, bench_target
from rvdeploy.gate import check_regression

from gate_model import GATE_INPUT
from results_io import write_results

ROOT = Path(__file__).resolve().parents[1]
GATE = BenchSettings(batches=(4,), warmup_s=2.0, min_s=8.0, iters=50, threads=2, input_size=GATE_INPUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threshold", type=float, default=20.0)
    args = parser.parse_args()
    model = ROOT / "build/gate/a0.onnx"
    if not model.exists():
        raise SystemExit(f"make the gate model first: .venv/bin/python benchmarks/gate_model.py {model}")
    baseline = json.loads((ROOT / "benchmarks/baselines/ci_cpu_a0.json").read_text())
    rows = []
    for run in range(args.runs):
        report = bench_target(model, "onnxruntime", GATE)
        raw = check_regression(report, baseline, args.threshold, "never").deltas[0].change_pct
        normalized = check_regression(report, baseline, args.threshold, "always").deltas[0].change_pct
        rows.append({"run": run + 1, "p50_ms": report["results"][0]["latency_ms"]["p50"],
                     "reference_p50_ms": report["results"][0]["reference_p50_ms"], "raw_change_pct": raw,
                     "normalized_change_pct": normalized})
        print(rows[-1])
    raw = np.array([r["raw_change_pct"] for r in rows])
    norm = np.array([r["normalized_change_pct"] for r in rows])
    summary = (
        f"{args.runs} runs of an unchanged tree. Raw p50 change: mean {raw.mean():+.1f}%, std {raw.std():.1f}%, "
        f"max {raw.max():+.1f}%. Normalised: mean {norm.mean():+.1f}%, std {norm.std():.1f}%, max {norm.max():+.1f}%. "
        f"False alarms at +{args.threshold:g}%: raw {(raw > args.threshold).sum()}/{args.runs}, "
        f"normalised {(norm > args.threshold).sum()}/{args.runs}."
    )
    print(summary)
    columns = [("run", "run"), ("p50_ms", "p50 ms"), ("reference_p50_ms", "reference p50 ms"),
               ("raw_change_pct", "raw change %"), ("normalized_change_pct", "normalised change %")]
    print(write_results("gate_noise", rows, columns, summary))


if __name__ == "__main__":
    main()
