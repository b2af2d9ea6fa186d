"""Outputs that follow a TopK (a detector's selection of its best boxes) are compared by what the
selection reads: the scores and the boxes before it, in their fixed order. Measured on a small
detector exported as real ones are (TopK over per-position scores, the boxes gathered by its indices)."""

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from rvdeploy.compare import sqnr_db
from rvdeploy.data import batches, image_folder
from rvdeploy.precision.guard import held_out_split
from rvdeploy.precision.quantize import Int8Options, quantize_int8_file
from rvdeploy.precision.selection import selection_free_tensors
from rvdeploy.precision.sensitivity import OutputProbe
from rvdeploy.preprocess import given_recipe

from test_cli import run
from test_int8_guard import CALIB

SIZE, KEPT = 32, 8


class Detector(nn.Module):
    """Conv features, a score and a box per position; the KEPT best positions, their boxes and scores."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.scores = nn.Conv2d(32, 4, 1)  # four classes
        self.boxes = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        y = self.features(x)
        scores = torch.sigmoid(self.scores(y)).flatten(2).max(1).values  # (N, positions)
        boxes = self.boxes(y).flatten(2).transpose(1, 2)  # (N, positions, 4)
        best, index = scores.topk(KEPT, dim=1)
        picked = torch.gather(boxes, 1, index.unsqueeze(-1).expand(-1, -1, 4))
        return torch.cat([picked, best.unsqueeze(-1)], dim=-1)  # (N, KEPT, 5)


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    torch.manual_seed(0)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Detector().eval(), torch.randn(1, 3, SIZE, SIZE), buffer, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["detections"], dynamic_axes={"input": {0: "batch"}})
    path = tmp_path_factory.mktemp("detector") / "detector.onnx"
    path.write_bytes(buffer.getvalue())
    return path


def _values(path, names, pixels):
    import onnxruntime

    model = onnx.load(path)
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in {o.name for o in model.graph.output})
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    runs = [session.run(names, {"input": x}) for x in pixels]
    return np.concatenate([np.concatenate([v.reshape(len(v), -1) for v in run], axis=1) for run in runs])


def test_the_selection_is_compared_by_what_it_reads(detector):
    model = onnx.load(detector)
    found = selection_free_tensors(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    ops = {producers[name].op_type for name in found if name in producers}
    assert "detections" not in found and {"ReduceMax", "Transpose"} <= ops, ops  # the scores and the boxes
    recipe = given_recipe((0.5,) * 3, (0.25,) * 3, (SIZE, SIZE))
    probe = OutputProbe(model, image_folder(CALIB, recipe, 16, allow_upscale=True), recipe, "the detector")
    kept = {producers[name].op_type for name in probe.compared}
    assert kept == {"ReduceMax", "Transpose"}  # float, one row per image (not the TopK's k, nor shapes)


def test_a_graph_without_a_selection_compares_its_outputs(digits_onnx):
    assert selection_free_tensors(onnx.load(digits_onnx)) is None


def test_int8_floor_judges_a_detector_by_its_scores_and_boxes(detector, tmp_path):
    recipe = given_recipe((0.5,) * 3, (0.25,) * 3, (SIZE, SIZE))
    out = tmp_path / "int8.onnx"
    report = quantize_int8_file(detector, out, Int8Options(CALIB, num_images=64, recipe=recipe, allow_upscale=True,
                                                           show_progress=False))
    model = onnx.load(detector)
    names = OutputProbe(model, image_folder(CALIB, recipe, 8, allow_upscale=True), recipe, "the detector").compared
    held = held_out_split(image_folder(CALIB, recipe, 64, allow_upscale=True))[1]
    pixels = [x for x, _ in batches(held, recipe, 32)]
    measured = sqnr_db(_values(out, names, pixels), _values(detector, names, pixels))
    assert report.output_sqnr_db == pytest.approx(measured, abs=1e-6) and measured >= 20
    selected = sqnr_db(_values(out, ["detections"], pixels), _values(detector, ["detections"], pixels))
    # what the selection itself scores: noise plus reordering (measured: 46.9 dB on scores and boxes, 15.3 dB
    # on the detections the TopK picked)
    assert selected < measured - 10


def test_the_summary_says_what_was_compared(detector, tmp_path):
    code, stdout, stderr = run("quantize", detector, "--int8", "--calib", CALIB, "--num-images", "16", "--mean", "0.5,0.5,0.5",
                               "--std", "0.25,0.25,0.25", "--input-size", str(SIZE), "--allow-upscale", "--rounding",
                               "nearest", "-o", tmp_path / "q.onnx")
    assert code == 0, stderr
    assert "outputs after a TopK compared by the 2 tensors it selects from" in " ".join(stdout.split())
