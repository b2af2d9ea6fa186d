import json
import os
import re
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from rvdeploy.arch import custom_spec
from rvdeploy.cli import main
from rvdeploy.model import build_model

from conftest import to_mmpretrain, trained_like_state_dict


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(code, stdout, stderr, pattern):
    assert code != 0
    assert "Traceback" not in stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture()
def train_ckpt(tmp_path, small_spec, small_state):
    path = tmp_path / "train.pth"
    torch.save({"state_dict": small_state}, path)
    return path


def test_fuse_writes_official_deploy_checkpoint_that_computes_the_same(tmp_path, train_ckpt, small_spec, small_state):
    out = tmp_path / "fused.pth"
    code, stdout, stderr = run("fuse", train_ckpt, "-o", out, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["fold"]["passed"] and report["layout"] == "official" and report["wrapper"] == "state_dict"
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"state_dict", "meta"}
    meta = saved["meta"]
    for key in ("arch", "num_classes", "source_layout", "source_sha256", "fold_error", "rvdeploy_version", "arch_spec"):
        assert key in meta
    assert meta["num_classes"] == 7 and len(meta["source_sha256"]) == 64
    assert all(k.endswith(("rbr_reparam.weight", "rbr_reparam.bias")) or k.startswith("linear.") for k in saved["state_dict"])
    # The deploy model (official names, strict load) computes what the multi-branch model computes.
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        expected = build_model(small_spec, False, small_state)(x)
        got = build_model(small_spec, True, saved["state_dict"])(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_fuse_safetensors_keeps_meta_in_header(tmp_path, small_se_spec):
    state = trained_like_state_dict(small_se_spec)
    torch.save(to_mmpretrain(state), tmp_path / "mm.pth")
    out = tmp_path / "fused.safetensors"
    code, _, stderr = run("fuse", tmp_path / "mm.pth", "-o", out)
    assert code == 0, stderr
    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()["rvdeploy"])
        assert "stage1.0.se.down.weight" in f.keys()
    assert meta["source_layout"] == "mmpretrain"


def test_fuse_human_report(tmp_path, train_ckpt):
    code, stdout, _ = run("fuse", train_ckpt, "-o", tmp_path / "f.pth")
    assert code == 0
    assert "self-check" in stdout and "passed" in stdout and "blocks proven" in stdout and "end to end" in stdout


def test_failed_fuse_leaves_existing_output_untouched(tmp_path, small_state):
    small_state["stage1.0.rbr_dense.bn.running_mean"][0] = float("nan")
    torch.save(small_state, tmp_path / "nan.pth")
    out = tmp_path / "fused.pth"
    out.write_bytes(b"previous result")
    assert_one_line_error(*run("fuse", tmp_path / "nan.pth", "-o", out), r"non-finite values .*running_mean")
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.pth", "nan.pth"]


def test_failed_write_leaves_no_partial_file(tmp_path, train_ckpt, monkeypatch):
    out = tmp_path / "fused.pth"
    out.write_bytes(b"previous result")

    def full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    assert_one_line_error(*run("fuse", train_ckpt, "-o", out), r"cannot write .*fused\.pth: No space left on device")
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.pth", "train.pth"]


@pytest.mark.parametrize("make_input, args, pattern", [
    (lambda d: None, [], r"missing\.pth: no such file"),
    (lambda d: (d / "missing.pth").write_bytes(b""), [], r"is empty"),
    (lambda d: (d / "missing.pth").write_bytes(os.urandom(999)), [], r"not a readable PyTorch"),
    (lambda d: torch.save({"fc.weight": torch.zeros(2, 2)}, d / "missing.pth"), [], r"not a RepVGG checkpoint"),
    (lambda d: torch.save(trained_like_state_dict(custom_spec((1, 1), (8, 8), num_classes=3)), d / "missing.pth"),
     ["--arch", "RepVGG-A0"], r"--arch RepVGG-A0: checkpoint does not match RepVGG-A0"),
    (lambda d: torch.save(trained_like_state_dict(custom_spec((1, 1), (8, 8), num_classes=3)), d / "missing.pth"),
     ["--arch", "VGG16"], r"unknown architecture 'VGG16'"),
    (lambda d: torch.save(trained_like_state_dict(custom_spec((1, 1), (8, 8), num_classes=3)), d / "missing.pth"),
     ["--num-classes", "10"], r"--num-classes 10 does not match"),
], ids=["missing", "empty", "random-bytes", "not-repvgg", "wrong-arch", "unknown-arch", "wrong-classes"])
def test_fuse_bad_input(tmp_path, make_input, args, pattern):
    make_input(tmp_path)
    assert_one_line_error(*run("fuse", tmp_path / "missing.pth", "-o", tmp_path / "out.pth", *args), pattern)
    assert not (tmp_path / "out.pth").exists()


def test_fuse_truncated_file(tmp_path, train_ckpt):
    data = train_ckpt.read_bytes()
    train_ckpt.write_bytes(data[: len(data) - 200])
    assert_one_line_error(*run("fuse", train_ckpt, "-o", tmp_path / "o.pth"), r"truncated or corrupt")


def test_fuse_missing_output_directory(tmp_path, train_ckpt):
    assert_one_line_error(*run("fuse", train_ckpt, "-o", tmp_path / "nowhere" / "o.pth"),
                          r"output directory .*nowhere does not exist")


def test_info_on_training_and_fused_checkpoints(tmp_path, train_ckpt, small_spec):
    code, stdout, _ = run("info", train_ckpt, "--json")
    assert code == 0
    data = json.loads(stdout)
    assert data["form"] == "train" and data["layout"] == "official"
    assert data["params"] == {"train": small_spec.param_count(False), "deploy": small_spec.param_count(True)}
    assert data["macs"]["deploy"] == small_spec.macs(224, True)
    assert data["blocks"][2]["branches"] == "3x3 + 1x1 + identity" and data["blocks"][2]["groups"] == "2"
    run("fuse", train_ckpt, "-o", tmp_path / "f.pth")
    code, stdout, _ = run("info", tmp_path / "f.pth", "--input-size", "64")
    assert code == 0 and "deploy form" in stdout and "GMACs @ 64x64" in stdout


def test_console_script_reports_one_line_without_traceback(tmp_path):
    evil = tmp_path / "evil.pth"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"model": RunsCode()}, evil)
    exe = os.path.join(os.path.dirname(sys.executable), "rvdeploy")
    proc = subprocess.run([exe, "fuse", str(evil), "-o", str(tmp_path / "o.pth")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "would run code" in proc.stderr
    assert not (tmp_path / "pwned").exists()
