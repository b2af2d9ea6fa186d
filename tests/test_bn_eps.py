"""A non-default BatchNorm epsilon travels with the weights into every module built from them.

The shipped digits net is rewritten, without changing its function, into a net trained with
eps 0.1 (each BN's gamma scaled by sqrt((var + 0.1) / (var + 1e-5))). Read with --bn-eps 0.1 every
command must compute what an independent float64 reference (torch.nn.functional, eps 0.1) computes;
read with the default eps it computes something else, so the flag is seen to matter.
"""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rvdeploy.arch import ArchSpec
from rvdeploy.checkpoint import load_train_weights
from rvdeploy.compare import relative_error
from rvdeploy.data import batches, labelled_folder
from rvdeploy.model import build_model
from rvdeploy.runners import open_runner

from conftest import DIGITS_CKPT, ROOT, reference_logits
from test_cli import run

EPS = 0.1
HELDOUT = ROOT / "models" / "digits" / "heldout"


@pytest.fixture(scope="module")
def eps_ckpt(tmp_path_factory):
    """(path, official state dict, spec) of the digits net re-expressed with BN epsilon 0.1."""
    shipped = torch.load(DIGITS_CKPT, weights_only=True)
    state = {k: v.clone() for k, v in shipped["state_dict"].items()}
    for key in [k for k in state if k.endswith(".running_var")]:
        prefix = key.removesuffix(".running_var")
        var = state[key].double()
        state[f"{prefix}.weight"] = (state[f"{prefix}.weight"].double() * ((var + EPS) / (var + 1e-5)).sqrt()).float()
    path = tmp_path_factory.mktemp("eps") / "digits_eps0.1.pth"
    torch.save({"state_dict": state, "preprocess": shipped["preprocess"]}, path)
    spec = load_train_weights(path).spec
    return path, state, spec


@pytest.fixture(scope="module")
def probe(eps_ckpt):
    _, state, spec = eps_ckpt
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return x, reference_logits(state, spec, EPS, x)


def _ort(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]


def test_the_default_epsilon_gives_another_function(eps_ckpt, probe):
    _, state, spec = eps_ckpt
    x, expected = probe
    assert relative_error(reference_logits(state, spec, 1e-5, x), expected) > 0.05


def test_fuse(tmp_path, eps_ckpt, probe):
    path, _, spec = eps_ckpt
    x, expected = probe
    for eps, close in ((EPS, True), (1e-5, False)):
        out = tmp_path / f"fused-{eps}.pth"
        code, stdout, stderr = run("fuse", path, "-o", out, "--bn-eps", eps, "--json")
        assert code == 0, stderr
        assert json.loads(stdout)["bn_eps"] == eps
        fused = torch.load(out, weights_only=True)
        with torch.no_grad():
            got = build_model(ArchSpec.from_dict(fused["meta"]["arch_spec"]), True, fused["state_dict"])(x)
        assert (relative_error(got, expected) < 1e-5) == close


@pytest.mark.parametrize("no_fuse", [False, True], ids=["fused-on-the-way", "no-fuse"])
def test_export(tmp_path, eps_ckpt, probe, no_fuse):
    path, _, _ = eps_ckpt
    x, expected = probe
    out = tmp_path / "m.onnx"
    code, _, stderr = run("export", path, "--onnx", out, "--bn-eps", EPS, *(["--no-fuse"] if no_fuse else []))
    assert code == 0, stderr
    assert relative_error(_ort(out, x), expected) < 1e-5
    code, _, stderr = run("export", path, "--onnx", out, *(["--no-fuse"] if no_fuse else []))  # default eps
    assert code == 0, stderr
    assert relative_error(_ort(out, x), expected) > 0.05


def test_verify_checkpoint(tmp_path, eps_ckpt, probe):
    path, _, _ = eps_ckpt
    x, expected = probe
    graph = tmp_path / "m.onnx"
    assert run("export", path, "--onnx", graph, "--bn-eps", EPS)[0] == 0
    code, stdout, stderr = run("verify", graph, "--checkpoint", path, "--bn-eps", EPS, "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["parity"]["passed"]
    code, stdout, _ = run("verify", graph, "--checkpoint", path, "--json")  # the checkpoint read with the default eps
    assert code == 4 and not json.loads(stdout)["parity"]["passed"]


def test_runner_that_eval_and_bench_use(eps_ckpt, probe):
    path, _, _ = eps_ckpt
    x, expected = probe
    with open_runner(path, bn_eps=EPS) as runner:
        assert runner.form == "multi-branch"
        assert relative_error(runner.infer(x.numpy()), expected) < 1e-5


def test_eval(eps_ckpt):
    path, state, spec = eps_ckpt
    with open_runner(path) as runner:
        recipe = runner.preprocess
    images = labelled_folder(HELDOUT, recipe)
    logits = torch.cat([reference_logits(state, spec, EPS, torch.from_numpy(pixels)) for pixels, _ in batches(images, recipe, 128)])
    expected_top1 = float((logits.argmax(1).numpy() == np.asarray(images.labels)).mean() * 100)
    code, stdout, stderr = run("eval", path, "--data", HELDOUT, "--bn-eps", EPS, "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["results"][0]["top1"] == pytest.approx(expected_top1) and expected_top1 > 99
    code, stdout, _ = run("eval", path, "--data", HELDOUT, "--json")
    assert json.loads(stdout)["results"][0]["top1"] < expected_top1 - 1


def test_bench(tmp_path, eps_ckpt):
    path, _, _ = eps_ckpt
    out = tmp_path / "bench.json"
    code, _, stderr = run("bench", path, "--bn-eps", EPS, "--batch", "2", "--warmup-s", "0", "--min-s", "0.02",
                          "--iters", "2", "--json", out)
    assert code == 0, stderr
    report = json.loads(out.read_text())
    assert [r["variant"].split("@")[0] for r in report["results"]] == ["multi-branch", "fused"]
    check = report["checks"][0]
    assert check["passed"] and check["candidate"] == "fused" and check["reference"] == "multi-branch"
