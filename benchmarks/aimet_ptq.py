"""Qualcomm AIMET's ONNX PTQ on the same FP32 graphs rvdeploy quantizes: the second public anchor for int8_robust.

Runs in a venv of its own (AIMET pins its own onnx and onnxruntime):

    python3 -m venv .venv-aimet
    .venv-aimet/bin/pip install torch==2.13.0 && .venv-aimet/bin/pip install aimet-onnx
    .venv-aimet/bin/python benchmarks/aimet_ptq.py build/int8_robust

It reads every ``*.onnx`` FP32 graph in the folder, ``calib.npy`` (the preprocessed calibration
images) and ``heldout.npy`` (the held-out split), both written there by benchmarks/int8_robust.py.
For each graph and recipe (plain; CLE; CLE + AdaRound, 10,000 iterations a layer by default, AIMET's;
CLE + SeqMSE) it writes ``aimet/<graph>_<recipe>.npy``: the logits of AIMET's simulated INT8 graph on
the held-out images, and ``aimet/aimet.json`` (version, seconds per recipe). int8_robust.py scores
them in the project's venv. It imports nothing from rvdeploy.

Quantization as TensorRT's explicit quantization reads it: symmetric per-channel int8 weights,
signed symmetric per-tensor int8 activations (no unsigned grid after ReLU), float bias, min-max
ranges (AIMET's ``min_max`` scheme; rvdeploy's default method is minmax too).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

TENSORRT_LIKE = {
    "defaults": {
        "ops": {"is_output_quantized": "True", "is_symmetric": "True"},
        "params": {"is_quantized": "True", "is_symmetric": "True"},
        "strict_symmetric": "False",
        "unsigned_symmetric": "False",
        "per_channel_quantization": "True",
    },
    "params": {"bias": {"is_quantized": "False"}},
    "op_type": {},
    "supergroups": [{"op_list": ["Conv", "Relu"]}, {"op_list": ["Gemm", "Relu"]}],
    "model_input": {"is_input_quantized": "True"},
    "model_output": {},
}
RECIPES = ("plain", "cle", "cle_adaround", "cle_seqmse")
BATCH = 32


def run_recipe(graph: Path, recipe: str, calib: np.ndarray, heldout: np.ndarray, config: Path,
               iterations: int = 10000) -> np.ndarray:
    import onnx
    from aimet_onnx import QuantizationSimModel, apply_adaround, apply_seq_mse
    from aimet_onnx.cross_layer_equalization import equalize_model

    model = onnx.load(str(graph))
    name = model.graph.input[0].name
    if recipe.startswith("cle"):
        equalize_model(model)
    inputs = [{name: calib[i:i + BATCH]} for i in range(0, len(calib), BATCH)]
    sim = QuantizationSimModel(model, quant_scheme="min_max", config_file=str(config), param_type="int8", activation_type="int8")
    if recipe.endswith("adaround"):
        apply_adaround(sim, inputs, num_iterations=iterations)
    if recipe.endswith("seqmse"):
        apply_seq_mse(sim, inputs)
    sim.compute_encodings(inputs)
    return np.concatenate([sim.session.run(None, {name: heldout[i:i + BATCH]})[0] for i in range(0, len(heldout), BATCH)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="Folder with the FP32 graphs, calib.npy and heldout.npy")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="Comma-separated: " + ", ".join(RECIPES))
    parser.add_argument("--graphs", default="*.onnx", help="Glob of the graphs to quantize")
    parser.add_argument("--iterations", type=int, default=10000, help="AdaRound's iterations a layer (AIMET's default)")
    args = parser.parse_args()

    calib, heldout = np.load(args.folder / "calib.npy"), np.load(args.folder / "heldout.npy")
    out_dir = args.folder / "aimet"
    out_dir.mkdir(exist_ok=True)
    timings_path = out_dir / "aimet.json"
    timings = json.loads(timings_path.read_text())["seconds"] if timings_path.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "tensorrt_like.json"
        config.write_text(json.dumps(TENSORRT_LIKE))
        for graph in sorted(args.folder.glob(args.graphs)):
            for recipe in args.recipes.split(","):
                start = time.perf_counter()
                logits = run_recipe(graph, recipe, calib, heldout, config, args.iterations)
                out = out_dir / f"{graph.stem}_{recipe}.npy"
                np.save(out, logits)
                timings[out.stem] = round(time.perf_counter() - start, 1)
                print(f"{out} ({timings[out.stem]} s)", flush=True)
                import aimet_onnx
                timings_path.write_text(json.dumps({"aimet_onnx_version": aimet_onnx.__version__,
                                                    "calibration_images": int(calib.shape[0]),
                                                    "seconds": timings}, indent=2) + "\n")


if __name__ == "__main__":
    main()
