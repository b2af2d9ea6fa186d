import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from rvdeploy.arch import zoo_spec
from rvdeploy.checkpoint import (
    load_deploy_weights,
    load_train_weights,
    load_weights,
    read_checkpoint,
    save_deploy_weights,
)
from rvdeploy.errors import CheckpointError
from rvdeploy.model import expected_shapes
from rvdeploy.reparam import fuse
from rvdeploy.weights import DeployWeights, TrainWeights

from conftest import to_mmpretrain, to_timm, trained_like_state_dict


def _without_counters(state):
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize(
    "layout, convert",
    [("official", lambda sd: sd), ("timm", to_timm), ("mmpretrain", to_mmpretrain)],
)
@pytest.mark.parametrize("spec_fixture", ["small_spec", "small_se_spec"])
def test_layouts_load_to_the_same_tensors(tmp_path, request, layout, convert, spec_fixture):
    spec = request.getfixturevalue(spec_fixture)
    official = trained_like_state_dict(spec, seed=4)
    path = tmp_path / f"{layout}.pth"
    torch.save(convert(official), path)
    weights = load_train_weights(path)
    assert weights.source.layout == layout
    assert weights.spec.same_network(spec.with_name("custom"))
    expected = _without_counters(official)
    assert weights.tensors.keys() == expected.keys()
    assert all(torch.equal(weights.tensors[k], expected[k]) for k in expected)


def test_real_timm_and_mmpretrain_key_names(tmp_path):
    """The names these frameworks write, spelled out, not derived from the test's own converters."""
    official = trained_like_state_dict(zoo_spec("A0", num_classes=4))
    timm = to_timm(official)
    for key in ("stem.conv_kxk.conv.weight", "stem.conv_1x1.bn.running_var", "stages.0.1.identity.weight",
                "stages.3.0.conv_kxk.bn.bias", "head.fc.weight"):
        assert key in timm
    mm = to_mmpretrain(official)
    for key in ("backbone.stem.branch_3x3.conv.weight", "backbone.stage_1.1.branch_norm.running_mean",
                "backbone.stage_4.0.branch_1x1.norm.weight", "head.fc.bias"):
        assert key in mm
    torch.save(mm, tmp_path / "mm.pth")
    assert load_train_weights(tmp_path / "mm.pth").spec.name == "RepVGG-A0"


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
    lambda sd: {"ema": sd},
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
], ids=["bare", "state_dict", "model", "ema", "ddp-prefix", "ddp-compile-prefix"])
def test_wrappers(tmp_path, small_spec, small_state, wrap):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(small_state), path)
    weights = load_train_weights(path)
    assert weights.spec.same_network(small_spec.with_name("custom"))


def test_key_selects_the_ema_weights(tmp_path, small_spec):
    live, ema = trained_like_state_dict(small_spec, seed=1), trained_like_state_dict(small_spec, seed=2)
    torch.save({"state_dict": live, "state_dict_ema": ema}, tmp_path / "c.pth")
    assert load_train_weights(tmp_path / "c.pth").source.wrapper == "state_dict"
    chosen = load_train_weights(tmp_path / "c.pth", key="state_dict_ema")
    assert torch.equal(chosen.tensors["linear.weight"], ema["linear.weight"])
    with pytest.raises(CheckpointError, match="has no entry 'nope'.*state_dict, state_dict_ema"):
        load_train_weights(tmp_path / "c.pth", key="nope")


@pytest.mark.parametrize("name", ["RepVGG-A0", "RepVGG-B1g4", "RepVGG-D2se"])
def test_arch_inference_names_zoo_variants(tmp_path, name):
    spec = zoo_spec(name, num_classes=3)
    # Shapes are all inference needs: cheap constant tensors stand in for a full-size net's weights.
    state = {k: torch.ones(s) if k.endswith("running_var") else torch.zeros(s) for k, s in expected_shapes(spec, False).items()}
    torch.save(to_timm(state), tmp_path / "t.pth")
    weights = load_train_weights(tmp_path / "t.pth")
    assert weights.spec == spec
    assert weights.spec.num_classes == 3


def test_arch_override_is_checked(tmp_path):
    state = trained_like_state_dict(zoo_spec("A0", num_classes=5))
    torch.save(state, tmp_path / "a0.pth")
    assert load_train_weights(tmp_path / "a0.pth", arch="a0").spec.name == "RepVGG-A0"
    with pytest.raises(CheckpointError, match=r"--arch RepVGG-B0: checkpoint does not match RepVGG-B0: .*missing: .*mis-shaped: stage0\.rbr_dense\.conv\.weight \(48, 3, 3, 3\) \(expected \(64, 3, 3, 3\)\).*the tensors describe RepVGG-A0"):
        load_train_weights(tmp_path / "a0.pth", arch="RepVGG-B0")
    with pytest.raises(Exception, match="unknown architecture 'RepVGG-Q1'"):
        load_train_weights(tmp_path / "a0.pth", arch="RepVGG-Q1")
    with pytest.raises(CheckpointError, match="--num-classes 1000 does not match the checkpoint's classifier, which has 5 classes"):
        load_train_weights(tmp_path / "a0.pth", num_classes=1000)


def test_strict_validation_names_every_problem(tmp_path, small_state):
    del small_state["stage2.1.rbr_identity.running_mean"]
    small_state["stage2.0.rbr_1x1.conv.weight"] = torch.zeros(32, 8, 1, 1)
    small_state["aux_head.weight"] = torch.zeros(3)
    torch.save(small_state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        load_train_weights(tmp_path / "bad.pth")
    message = str(info.value)
    assert "1 missing: stage2.1.rbr_identity.running_mean" in message
    assert "1 unexpected: aux_head.weight" in message
    assert "1 mis-shaped: stage2.0.rbr_1x1.conv.weight (32, 8, 1, 1) (expected (32, 16, 1, 1))" in message
    assert "\n" not in message


def test_unexpected_keys_are_reported_in_the_files_own_names(tmp_path, small_state):
    timm = to_timm(small_state)
    timm["stages.0.0.conv_kxk.extra"] = torch.zeros(1)
    torch.save(timm, tmp_path / "t.pth")
    with pytest.raises(CheckpointError, match=r"unexpected: stages\.0\.0\.conv_kxk\.extra"):
        load_train_weights(tmp_path / "t.pth")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_refused(tmp_path, small_state, bad):
    small_state["stage1.1.rbr_dense.bn.running_var"][2] = bad
    torch.save(small_state, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match=r"non-finite values \(NaN or Inf\) in 1 tensors: stage1\.1\.rbr_dense\.bn\.running_var \(1 values\)"):
        load_train_weights(tmp_path / "nan.pth")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"stage0.rbr_dense.conv.weight": torch.zeros(1)}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refusing .*evil\.pth: it is a pickle that would run code when loaded \(it calls posix.system\)"):
        load_train_weights(path)
    assert not marker.exists()


def test_plain_pickle_is_refused(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="plain.pkl"):
        load_train_weights(path)


def test_bad_files(tmp_path, small_state):
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth is empty"):
        read_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="is a directory"):
        read_checkpoint(tmp_path)
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="random.pth is not a readable PyTorch or safetensors checkpoint"):
        read_checkpoint(tmp_path / "random.pth")
    torch.save(small_state, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth is truncated or corrupt"):
        read_checkpoint(tmp_path / "cut.pth")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(CheckpointError, match="cut.safetensors is not a readable safetensors file"):
        read_checkpoint(tmp_path / "cut.safetensors")


def test_non_repvgg_state_dict_is_refused(tmp_path):
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.zeros(64), "fc.weight": torch.zeros(10, 512)}
    torch.save(resnet, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="not a RepVGG checkpoint: none of its 3 tensors has RepVGG names"):
        load_train_weights(tmp_path / "resnet.pth")
    torch.save({"epoch": 1, "config": {"lr": 0.1}}, tmp_path / "nostate.pth")
    with pytest.raises(CheckpointError, match="holds no state dict.*its entries are: epoch, config"):
        load_train_weights(tmp_path / "nostate.pth")


def test_safetensors_training_input(tmp_path, small_spec, small_state):
    save_file(_without_counters(small_state), tmp_path / "train.safetensors")
    assert load_train_weights(tmp_path / "train.safetensors").spec.same_network(small_spec.with_name("custom"))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_fused_round_trip(tmp_path, small_spec, small_state, suffix):
    torch.save({"state_dict": small_state, "preprocess": {"input_size": 48, "resize": 56, "mean": [0.5] * 3, "std": [0.25] * 3}}, tmp_path / "t.pth")
    deploy, _ = fuse(load_train_weights(tmp_path / "t.pth"))
    out = save_deploy_weights(deploy, tmp_path / f"fused{suffix}")
    loaded = load_deploy_weights(out)
    assert loaded.spec == deploy.spec
    assert loaded.preprocess.input_size == (48, 48)
    assert loaded.meta["source_layout"] == "official"
    assert all(torch.equal(loaded.tensors[k], deploy.tensors[k]) for k in deploy.tensors)
    assert isinstance(load_weights(out), DeployWeights)
    assert isinstance(load_weights(tmp_path / "t.pth"), TrainWeights)
    with pytest.raises(CheckpointError, match="already fused"):
        load_train_weights(out)
    with pytest.raises(CheckpointError, match="training-form"):
        load_deploy_weights(tmp_path / "t.pth")
