"""ONNX Runtime CPU latency of the fused graph vs. the multi-branch (--no-fuse) graph.

For each variant: a trained-looking training checkpoint, exported both ways with `rvdeploy export`,
timed with ONNX Runtime on the CPU at a fixed batch. Run:
    .venv/bin/python benchmarks/ort_fold_speedup.py [--arch RepVGG-A0 RepVGG-B0] [--batch 8] [--size 224]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from rvdeploy.arch import zoo_spec
from rvdeploy.onnx_io import ort_session
from rvdeploy.synthetic import trained_like_state_dict
from rvdeploy.timing import measure

from results_io import write_results


def time_graph(path: Path, batch: int, size: int, seconds: float):
    session = ort_session(path)
    feed = {"input": np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)}
    return measure(lambda: session.run(None, feed), batch, warmup_s=1.0, min_s=seconds, min_iters=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", nargs="+", default=["RepVGG-A0", "RepVGG-B0"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    rvdeploy = Path(sys.executable).with_name("rvdeploy")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.arch:
            spec = zoo_spec(name)
            ckpt = Path(tmp) / f"{name}.pth"
            torch.save(trained_like_state_dict(spec), ckpt)
            result = {}
            for form, extra in (("fused", []), ("multi-branch", ["--no-fuse"])):
                onnx_path = Path(tmp) / f"{name}-{form}.onnx"
                subprocess.run([str(rvdeploy), "export", str(ckpt), "--onnx", str(onnx_path),
                                "--input-size", str(args.size), *extra], check=True, capture_output=True)
                result[form] = time_graph(onnx_path, args.batch, args.size, args.seconds)
                print(f"{name} {form}: p50 {result[form].p50:.1f} ms, {result[form].throughput_ips:.1f} img/s")
            rows.append({
                "arch": name,
                "batch": args.batch,
                "fused_p50_ms": result["fused"].p50,
                "multi_branch_p50_ms": result["multi-branch"].p50,
                "fused_ips": result["fused"].throughput_ips,
                "multi_branch_ips": result["multi-branch"].throughput_ips,
                "speedup": result["multi-branch"].p50 / result["fused"].p50,
                "fused_latency": result["fused"].to_dict(),
                "multi_branch_latency": result["multi-branch"].to_dict(),
            })
    columns = [("arch", "arch"), ("batch", "batch"), ("fused_p50_ms", "fused p50 ms"),
               ("multi_branch_p50_ms", "multi-branch p50 ms"), ("fused_ips", "fused img/s"),
               ("multi_branch_ips", "multi-branch img/s"), ("speedup", "speed-up")]
    print(write_results("ort_fold_speedup", rows, columns,
                        f"ONNX Runtime {ort.__version__}, CPUExecutionProvider, default threads, "
                        f"input {args.size}x{args.size}, float32. Baseline for the bench issue."))


if __name__ == "__main__":
    main()
