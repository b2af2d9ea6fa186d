"""Shared test helpers: trained-looking weights and the checkpoint layouts of other frameworks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from rvdeploy.arch import ArchSpec, custom_spec
from rvdeploy.synthetic import trained_like_state_dict  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
DIGITS_CKPT = ROOT / "models" / "digits" / "repvgg_digits_train.pth"


def _renamed(official: dict[str, torch.Tensor], branch: dict[str, str], block_prefix) -> dict[str, torch.Tensor]:
    """Official names rewritten block by block: ``block_prefix(stage, index)`` names the block,
    ``branch`` its sub-modules; the classifier becomes ``head.fc``."""
    out = {}
    for key, t in official.items():
        if key.startswith("linear."):
            out["head.fc." + key.split(".", 1)[1]] = t
            continue
        stage, index, module, leaf = re.match(r"stage(\d+)(?:\.(\d+))?\.(.+)\.(\w+)$", key).groups()
        out[f"{block_prefix(int(stage), index)}.{branch[module]}.{leaf}"] = t
    return out


def to_timm(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official training state dict the way timm's byobnet RepVggBlock names it."""
    branch = {
        "rbr_dense.conv": "conv_kxk.conv",
        "rbr_dense.bn": "conv_kxk.bn",
        "rbr_1x1.conv": "conv_1x1.conv",
        "rbr_1x1.bn": "conv_1x1.bn",
        "rbr_identity": "identity",
        "se.down": "attn.fc1",
        "se.up": "attn.fc2",
    }
    return _renamed(official, branch, lambda stage, index: "stem" if stage == 0 else f"stages.{stage - 1}.{index}")


def to_mmpretrain(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official training state dict the way mmpretrain's RepVGG classifier names it."""
    branch = {
        "rbr_dense.conv": "branch_3x3.conv",
        "rbr_dense.bn": "branch_3x3.norm",
        "rbr_1x1.conv": "branch_1x1.conv",
        "rbr_1x1.bn": "branch_1x1.norm",
        "rbr_identity": "branch_norm",
        "se.down": "se_layer.conv1.conv",
        "se.up": "se_layer.conv2.conv",
    }
    return _renamed(official, branch, lambda stage, index: "backbone.stem" if stage == 0 else f"backbone.stage_{stage}.{index}")


@pytest.fixture(scope="session")
def small_spec() -> ArchSpec:
    """Small but complete: identity branches, groups on layers 2 and 4, 4 stages."""
    return custom_spec(depths=(2, 3, 2, 1), widths=(16, 32, 64, 96), groups=2, num_classes=7)


@pytest.fixture(scope="session")
def small_se_spec() -> ArchSpec:
    return custom_spec(depths=(1, 2, 1, 1), widths=(16, 32, 32, 64), se=True, num_classes=5)


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory) -> Path:
    """The shipped model's plain ONNX export."""
    from rvdeploy.pipeline import export_model

    return export_model(DIGITS_CKPT, tmp_path_factory.mktemp("digits") / "digits.onnx").output


@pytest.fixture()
def small_state(small_spec) -> dict[str, torch.Tensor]:
    return trained_like_state_dict(small_spec, seed=1)


def reference_stages(state: dict[str, torch.Tensor], spec: ArchSpec, bn_eps: float, x: torch.Tensor,
                     dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Every stage output (stem first) of the multi-branch net of an official-layout training state
    dict, in ``dtype``, written with torch.nn.functional alone: a reference independent of every
    module rvdeploy builds."""
    import torch.nn.functional as F

    t = {k: v.to(dtype) for k, v in state.items() if v.is_floating_point()}

    def bn(y, prefix):
        return F.batch_norm(y, t[f"{prefix}.running_mean"], t[f"{prefix}.running_var"], t[f"{prefix}.weight"],
                            t[f"{prefix}.bias"], training=False, eps=bn_eps)

    x, stages = x.to(dtype), []
    for block in spec.blocks:
        p = block.name
        y = bn(F.conv2d(x, t[f"{p}.rbr_dense.conv.weight"], stride=block.stride, padding=1, groups=block.groups), f"{p}.rbr_dense.bn")
        y = y + bn(F.conv2d(x, t[f"{p}.rbr_1x1.conv.weight"], stride=block.stride, groups=block.groups), f"{p}.rbr_1x1.bn")
        if f"{p}.rbr_identity.weight" in t:
            y = y + bn(x, f"{p}.rbr_identity")
        if block.se_channels:
            gate = F.relu(F.conv2d(y.mean((2, 3), keepdim=True), t[f"{p}.se.down.weight"], t[f"{p}.se.down.bias"]))
            y = y * torch.sigmoid(F.conv2d(gate, t[f"{p}.se.up.weight"], t[f"{p}.se.up.bias"]))
        x = F.relu(y)
        if block.name == "stage0" or block.name.endswith(".0"):
            stages.append(None)  # a new stage starts here; its output is its last block's
        stages[-1] = x
    return stages


def reference_logits(state: dict[str, torch.Tensor], spec: ArchSpec, bn_eps: float, x: torch.Tensor) -> torch.Tensor:
    """The float64 logits of :func:`reference_stages`' net."""
    import torch.nn.functional as F

    return F.linear(reference_stages(state, spec, bn_eps, x)[-1].mean((2, 3)), state["linear.weight"].double(),
                    state["linear.bias"].double())
