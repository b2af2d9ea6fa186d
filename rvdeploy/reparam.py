"""Structural re-parameterization: every multi-branch block folds into one 3x3 conv with bias.

The fold is done in float64 and cast to float32 once. Every fuse checks itself: the multi-branch
net and the folded net run on the same probe batch and must agree within what float32 rounding
explains, measured on the multi-branch net itself (its float32 output against its float64 output).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from rvdeploy.arch import BlockSpec
from rvdeploy.errors import FoldError
from rvdeploy.model import build_model
from rvdeploy.numerics import float32_tolerance, relative_error
from rvdeploy.weights import DeployWeights, TrainWeights

# float64 arithmetic leaves ~1e-15 relative; anything above this is an algebra mistake.
FLOAT64_TOLERANCE = 1e-9
# A trained net's float32 output is within ~1e-6 of its float64 output; far beyond that it is broken.
UNSTABLE_NOISE = 1e-3


def fold_bn(kernel: torch.Tensor, bn: dict[str, torch.Tensor], eps: float, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``W' = W * gamma / sqrt(var + eps)`` per output channel, ``b' = beta - mean * gamma / sqrt(var + eps)``."""
    var_eps = bn["running_var"].double() + eps
    if (var_eps <= 0).any():
        raise FoldError(f"{name}.running_var + eps is not positive for {int((var_eps <= 0).sum())} channels")
    scale = bn["weight"].double() / var_eps.sqrt()
    return kernel.double() * scale.reshape(-1, 1, 1, 1), bn["bias"].double() - bn["running_mean"].double() * scale


def identity_kernel(channels: int, groups: int) -> torch.Tensor:
    """The 3x3 grouped kernel that copies its input: 1 at ``[i, i mod (C/groups), 1, 1]``."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, 3, 3, dtype=torch.float64)
    rows = torch.arange(channels)
    kernel[rows, rows % per_group, 1, 1] = 1.0
    return kernel


def _bn_tensors(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: tensors[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}


def fold_block(tensors: dict[str, torch.Tensor], block: BlockSpec, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 3x3 kernel and bias equivalent to ``block``'s three branches."""
    p = block.name
    kernel, bias = fold_bn(tensors[f"{p}.rbr_dense.conv.weight"], _bn_tensors(tensors, f"{p}.rbr_dense.bn"), eps, f"{p}.rbr_dense.bn")
    k1, b1 = fold_bn(tensors[f"{p}.rbr_1x1.conv.weight"], _bn_tensors(tensors, f"{p}.rbr_1x1.bn"), eps, f"{p}.rbr_1x1.bn")
    kernel = kernel.clone()
    kernel[:, :, 1:2, 1:2] += k1  # the 1x1 kernel is the centre of a 3x3 one
    bias = bias + b1
    if block.has_identity:
        kid, bid = fold_bn(identity_kernel(block.in_channels, block.groups), _bn_tensors(tensors, f"{p}.rbr_identity"), eps, f"{p}.rbr_identity")
        kernel += kid
        bias = bias + bid
    return kernel, bias


def fold(weights: TrainWeights) -> dict[str, torch.Tensor]:
    """Every block folded, in float64, under the official deploy names (SE and classifier copied)."""
    folded: dict[str, torch.Tensor] = {}
    for block in weights.spec.blocks:
        kernel, bias = fold_block(weights.tensors, block, weights.bn_eps)
        folded[f"{block.name}.rbr_reparam.weight"] = kernel
        folded[f"{block.name}.rbr_reparam.bias"] = bias
        if block.se_channels:
            for part in ("down", "up"):
                for kind in ("weight", "bias"):
                    key = f"{block.name}.se.{part}.{kind}"
                    folded[key] = weights.tensors[key].double()
    for kind in ("weight", "bias"):
        folded[f"linear.{kind}"] = weights.tensors[f"linear.{kind}"].double()
    return folded


@dataclass(frozen=True)
class FoldReport:
    """How closely the folded net reproduces the multi-branch net on a probe batch."""

    probe_shape: tuple[int, ...]
    max_abs_error: float  # folded float32 vs. multi-branch float32: what a user sees
    max_rel_error: float  # the same, relative to the largest output magnitude
    float64_rel_error: float  # fold in float64 vs. multi-branch in float64: the algebra alone
    float32_noise_rel: float  # multi-branch float32 vs. float64: what float32 explains
    tolerance_rel: float
    passed: bool
    seconds: float

    def to_dict(self) -> dict:
        data = asdict(self)
        data["probe_shape"] = list(self.probe_shape)
        return data


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def check_fold(
    weights: TrainWeights,
    folded64: dict[str, torch.Tensor],
    folded32: dict[str, torch.Tensor],
    probe_size: int = 64,
    batch: int = 2,
    seed: int = 0,
) -> FoldReport:
    """Run both nets (eval mode) on a seeded probe batch and compare their outputs."""
    start = time.perf_counter()
    spec = weights.spec
    x = torch.randn(batch, spec.in_channels, probe_size, probe_size, generator=torch.Generator().manual_seed(seed))
    f64 = torch.float64
    reference = _forward(build_model(spec, False, weights.tensors, weights.bn_eps, f64), x.double())
    multi32 = _forward(build_model(spec, False, weights.tensors, weights.bn_eps), x).double()
    fused32 = _forward(build_model(spec, True, folded32), x).double()
    fused64 = _forward(build_model(spec, True, folded64, dtype=f64), x.double())

    noise_rel = relative_error(multi32, reference)
    fused_rel_to_reference = relative_error(fused32, reference)
    max_abs = (fused32 - multi32).abs().max().item()
    float64_rel = relative_error(fused64, reference)
    tolerance = float32_tolerance(noise_rel)
    finite = all(math.isfinite(v) for v in (max_abs, float64_rel, noise_rel, fused_rel_to_reference))
    passed = finite and float64_rel <= FLOAT64_TOLERANCE and fused_rel_to_reference <= tolerance
    return FoldReport(
        probe_shape=tuple(x.shape),
        max_abs_error=max_abs,
        max_rel_error=relative_error(fused32, multi32),
        float64_rel_error=float64_rel,
        float32_noise_rel=noise_rel,
        tolerance_rel=tolerance,
        passed=passed,
        seconds=time.perf_counter() - start,
    )


def fuse(weights: TrainWeights, probe_size: int = 64, probe_batch: int = 2) -> tuple[DeployWeights, FoldReport]:
    """Fold ``weights`` and prove it; raise :class:`FoldError` when the proof fails."""
    folded64 = fold(weights)
    folded32 = {k: v.float() for k, v in folded64.items()}
    report = check_fold(weights, folded64, folded32, probe_size, probe_batch)
    if not report.passed:
        unstable = (
            f"; the multi-branch net alone already differs by {report.float32_noise_rel:.3g} between float32 "
            "and float64, so its activations overflow or cancel: check its BN statistics"
            if report.float32_noise_rel > UNSTABLE_NOISE else ""
        )
        raise FoldError(
            f"fold self-check failed for {weights.spec.name}: folded vs. multi-branch relative error "
            f"{report.max_rel_error:.3g} (float64 {report.float64_rel_error:.3g}), "
            f"float32 explains {report.tolerance_rel:.3g}{unstable}"
        )
    source = weights.source
    meta = {
        "source_layout": source.layout if source else None,
        "source_sha256": source.sha256 if source else None,
        "source_file": source and source.path.rsplit("/", 1)[-1],
        "bn_eps": weights.bn_eps,
        "fold_error": report.to_dict(),
    }
    return DeployWeights(spec=weights.spec, tensors=folded32, meta=meta, preprocess=weights.preprocess), report
