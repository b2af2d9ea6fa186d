"""Wall time of `rvdeploy export` of a full-size zoo model at 224, Python start-up included.

Times export from a fused checkpoint (the export alone) and from a training checkpoint (fused on
the way). Run:
    .venv/bin/python benchmarks/export_speed.py [--arch RepVGG-B3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from rvdeploy.arch import zoo_spec
from rvdeploy.synthetic import trained_like_state_dict

from results_io import time_command, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="RepVGG-B3")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    spec = zoo_spec(args.arch)
    rvdeploy = str(Path(sys.executable).with_name("rvdeploy"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train, fused, out = Path(tmp) / "train.pth", Path(tmp) / "fused.pth", Path(tmp) / "model.onnx"
        torch.save(trained_like_state_dict(spec), train)
        subprocess.run([rvdeploy, "fuse", str(train), "-o", str(fused)], check=True, capture_output=True)
        for source, path in (("fused checkpoint", fused), ("training checkpoint", train)):
            times = time_command([rvdeploy, "export", str(path), "--onnx", str(out), "--input-size", "224"], args.repeat)
            rows.append({"arch": spec.name, "input": source, "onnx_mb": out.stat().st_size / 1e6,
                         "wall_s_median": statistics.median(times), "wall_s_max": max(times), "runs": len(times)})
            print(rows[-1])
    columns = [("arch", "arch"), ("input", "from"), ("onnx_mb", "ONNX (MB)"), ("wall_s_median", "wall s (median)"),
               ("wall_s_max", "max"), ("runs", "runs")]
    print(write_results(f"export_speed_{spec.name}", rows, columns,
                        "Goal: RepVGG-B3 at 224 in <= 30 s wall on the 2-core development machine."))


if __name__ == "__main__":
    main()
