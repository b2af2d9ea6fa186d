"""rvdeploy's graph fold against timm's own route, whole processes, and what its proof costs.

1. `rvdeploy fuse UNFOLDED.onnx -o PLAIN.onnx` against timm's route to the same plain graph (load
   the state dict, `reparameterize_model`, export with the TorchScript exporter), for timm's
   mobileone_s0 and repvgg_b1g4 at 224 px: whole processes, interleaved, median of --repeat.
   Optionally (--busy) a second run with a CPU-bound process on one core beside it.
2. timm's unfolded repvgg_d2se at 128 px (about 0.5 GB): `rvdeploy fuse` wall time and peak RSS
   (/usr/bin/time -v), against the file's size.
3. The proof on windows against the proof on whole activations, on the same corruptions of a folded
   graph: the worst group's error / budget ratio and the proof time for each.

Needs timm: run with the timm venv (`make test-timm` builds it):
    .venv-timm/bin/python benchmarks/fold_route.py [--repeat 3] [--busy]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from rvdeploy.graphfold import proof as graph_proof
from rvdeploy.graphfold.fold import fold_model
from rvdeploy.graphfold.proof import prove

from results_io import write_results

ROOT = Path(__file__).resolve().parents[1]
# rvdeploy as a user who has only the ONNX file runs it: the CPU build's venv, else this one's.
RVDEPLOY = next(p for p in (ROOT / ".venv" / "bin" / "rvdeploy", Path(sys.executable).with_name("rvdeploy")) if p.exists())
ROUTE_MODELS = ("mobileone_s0", "repvgg_b1g4")
TIMM_ROUTE = """
import sys, torch, timm
from timm.utils.model import reparameterize_model
name, state, out, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = timm.create_model(name, pretrained=False)
model.load_state_dict(torch.load(state, weights_only=True))
model = reparameterize_model(model.eval())
torch.onnx.export(model, torch.randn(1, 3, size, size), out, dynamo=False, opset_version=17,
                  input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
"""


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights with BN statistics of trained nets' scale (seeded), so the fold has work to do."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    return model.eval()


def export_unfolded(name: str, size: int, folder: Path) -> tuple[Path, Path]:
    """timm's net ``name`` with trained-like BN: its state dict, and its unfolded TorchScript export."""
    import timm

    model = _trained_like(timm.create_model(name, pretrained=False))
    state, unfolded = folder / f"{name}.pth", folder / f"{name}_unfolded.onnx"
    torch.save(model.state_dict(), state)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.randn(1, 3, size, size), buffer, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    unfolded.write_bytes(buffer.getvalue())
    return state, unfolded


def _seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def _spin() -> None:
    while True:
        pass


def route_rows(folder: Path, repeat: int, busy: bool) -> list[dict]:
    rows = []
    for name in ROUTE_MODELS:
        state, unfolded = export_unfolded(name, 224, folder)
        ours = [str(RVDEPLOY), "fuse", str(unfolded), "-o", str(folder / f"{name}_plain.onnx")]
        theirs = [sys.executable, "-c", TIMM_ROUTE, name, str(state), str(folder / f"{name}_timm.onnx"), "224"]
        for loaded in (False, True) if busy else (False,):
            spinner = multiprocessing.Process(target=_spin, daemon=True) if loaded else None
            if spinner:
                spinner.start()
            try:
                _seconds(ours), _seconds(theirs)  # warm the file cache
                times = {"rvdeploy": [], "timm": []}
                for _ in range(repeat):  # interleaved: both see the same machine
                    times["rvdeploy"].append(_seconds(ours))
                    times["timm"].append(_seconds(theirs))
            finally:
                if spinner:
                    spinner.terminate()
            medians = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"job": f"{name} 224 px", "machine": "one core busy" if loaded else "idle",
                         "size_mb": unfolded.stat().st_size / 1e6, "rvdeploy_s": medians["rvdeploy"],
                         "timm_s": medians["timm"], "ratio": medians["rvdeploy"] / medians["timm"],
                         "goal": "met" if medians["rvdeploy"] <= 0.5 * medians["timm"] else "missed"})
            print(rows[-1], flush=True)
    return rows


def large_row(folder: Path) -> dict:
    _, unfolded = export_unfolded("repvgg_d2se", 128, folder)
    result = subprocess.run(["/usr/bin/time", "-v", str(RVDEPLOY), "fuse", str(unfolded), "-o", str(folder / "d2se_plain.onnx")],
                            check=True, capture_output=True, text=True)
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", result.stderr).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    size = unfolded.stat().st_size
    row = {"job": "repvgg_d2se 128 px", "machine": "idle", "size_mb": size / 1e6, "rvdeploy_s": seconds,
           "peak_rss_mb": peak_kb * 1024 / 1e6, "rss_vs_file": peak_kb * 1024 / size,
           "goal": "met" if seconds <= 15 and peak_kb * 1024 <= 2.5 * size else "missed"}
    print(row, flush=True)
    return row


def _corruptions(folded: onnx.ModelProto) -> dict[str, onnx.ModelProto]:
    """Wrong folds, each in the first folded 3x3 Conv with several input channels per group: a
    1 %-of-max weight, a centre tap on the wrong input channel (a wrong identity index), a bias shift
    of 1e-3 of its largest (a dropped BN shift)."""
    shapes = {i.name: tuple(i.dims) for i in folded.graph.initializer}
    target = next(n.name for n in folded.graph.node if n.op_type == "Conv" and len(n.input) > 2
                  and shapes[n.input[1]][1] >= 2 and shapes[n.input[1]][2:] == (3, 3))

    def corrupted(edit) -> onnx.ModelProto:
        model = onnx.ModelProto()
        model.CopyFrom(folded)
        conv = next(n for n in model.graph.node if n.name == target)
        for index in (1, 2):
            init = next(i for i in model.graph.initializer if i.name == conv.input[index])
            values = onnx.numpy_helper.to_array(init).copy()
            if edit(index, values):
                init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
        return model

    def weight(index, w):
        if index == 1:
            w[0, 1, 0, 0] += 0.01 * np.abs(w).max()
        return index == 1

    def identity(index, w):
        if index == 1:
            w[0, 1, 1, 1], w[0, 0, 1, 1] = w[0, 0, 1, 1], w[0, 1, 1, 1]
        return index == 1

    def bias(index, b):
        if index == 2:
            b[0] += 1e-3 * np.abs(b).max()
        return index == 2

    return {"none": folded, "1 % of max weight": corrupted(weight), "swapped centre taps": corrupted(identity),
            "bias shift 1e-3": corrupted(bias)}


def proof_rows(folder: Path) -> list[dict]:
    _, unfolded = export_unfolded("mobileone_s0", 224, folder)
    original = onnx.load(unfolded)
    folded, _, folds = fold_model(original)
    rows, windowed = [], graph_proof.window
    for corruption, model in _corruptions(folded).items():
        for mode in ("window", "whole activations"):
            graph_proof.window = windowed if mode == "window" else (lambda x, conv: x)
            start = time.perf_counter()
            result = prove(original, model, folds)
            rows.append({"job": f"proof, mobileone_s0 224 px: {corruption}", "machine": mode,
                         "rvdeploy_s": time.perf_counter() - start, "worst_ratio": result.worst_ratio,
                         "verdict": "passed" if result.passed else "failed"})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--busy", action="store_true", help="also time the routes with one core busy")
    parser.add_argument("--proof-only", action="store_true", help="only the proof rows (part 3)")
    args = parser.parse_args()
    windowed = graph_proof.window
    with tempfile.TemporaryDirectory() as tmp:
        rows = [] if args.proof_only else route_rows(Path(tmp), args.repeat, args.busy) + [large_row(Path(tmp))]
        rows += proof_rows(Path(tmp))
    graph_proof.window = windowed
    columns = [("job", "job"), ("machine", "machine / proof"), ("size_mb", "ONNX MB"), ("rvdeploy_s", "rvdeploy s"),
               ("timm_s", "timm route s"), ("ratio", "rvdeploy / timm"), ("peak_rss_mb", "peak RSS MB"),
               ("rss_vs_file", "RSS / file"), ("worst_ratio", "worst error / budget"), ("verdict", "proof"), ("goal", "goal")]
    print(write_results("fold_route", rows, columns,
                        "Whole processes as a user runs them (Python start-up included); rvdeploy in .venv (torch CPU build), "
                        "timm's route in .venv-timm (torch 2.14.1). Goals: rvdeploy ≤ 0.5× timm's route; D2se ≤ 15 s "
                        "and peak RSS ≤ 2.5× the file. Proof rows: the same folded graph, corrupted, proven on windows "
                        "(the default) and on whole activations."))


if __name__ == "__main__":
    main()
