"""The arithmetic of a fold, in float64: each branch of a group is an affine map of the shared
input (a grouped Conv, or a Gemm on 2-d inputs), and the group is their weighted sum."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONV, GEMM = "conv", "gemm"


@dataclass
class AffineMap:
    """``y = W x + b``: a 2-d Conv (weight [Cout, Cin/groups, kh, kw]) or a Gemm (weight [N, K])."""

    kind: str
    weight: np.ndarray
    bias: np.ndarray
    groups: int = 1
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups


def bn_scale_shift(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """BatchNormalization as ``y = scale * x + shift``; ValueError when ``var + eps`` is not positive."""
    var_eps = np.asarray(var, np.float64) + eps
    if (var_eps <= 0).any():
        raise ValueError(f"var + epsilon is not positive for {int((var_eps <= 0).sum())} channels")
    scale = np.asarray(gamma, np.float64) / np.sqrt(var_eps)
    return scale, np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * scale


def diagonal_map(kind: str, scale: np.ndarray, shift: np.ndarray) -> AffineMap:
    """``scale * x + shift`` per channel (a BatchNormalization, or with scale 1 and shift 0 the identity)."""
    channels = scale.shape[0]
    if kind == CONV:  # depthwise 1x1
        return AffineMap(CONV, scale.reshape(channels, 1, 1, 1), shift, groups=channels)
    return AffineMap(GEMM, np.diag(scale), shift)


def identity_map(kind: str, channels: int) -> AffineMap:
    return diagonal_map(kind, np.ones(channels), np.zeros(channels))


def regroup(weight: np.ndarray, groups: int, target: int, in_channels: int) -> np.ndarray:
    """A grouped kernel rewritten for a coarser grouping (``target`` divides ``groups``): each
    output channel's block of inputs placed at its offset inside the larger block (block-diagonal)."""
    if groups == target:
        return weight
    out_channels, per_group = weight.shape[0], in_channels // groups
    rows = np.arange(out_channels)
    offset = (rows // (out_channels // groups)) * per_group - (rows // (out_channels // target)) * (in_channels // target)
    out = np.zeros((out_channels, in_channels // target) + weight.shape[2:], dtype=np.float64)
    out[rows[:, None], offset[:, None] + np.arange(per_group)[None, :]] = weight
    return out


def _add_depthwise_1x1(weight: np.ndarray, branch: AffineMap, c: np.ndarray) -> None:
    """Add a per-channel scale (an identity or BN branch) at the kernels' centres, in place: the
    dense regrouped kernel of such a branch would be mostly zeros."""
    out_channels, per_group, kh, kw = weight.shape
    rows = np.arange(out_channels)
    columns = rows - (rows // (out_channels // (branch.in_channels // per_group))) * per_group
    weight[rows, columns, kh // 2, kw // 2] += c * branch.weight[:, 0, 0, 0]


def merge(branches: list[AffineMap], coefficients: list[np.ndarray], constant: np.ndarray) -> AffineMap:
    """``sum_i c_i * branch_i(x) + constant`` as one map (``c_i`` and ``constant`` per output channel).

    Conv kernels are added centred into the largest kh x kw and regrouped to the greatest common
    divisor of the branches' groups; all branches share the stride, the dilation and the channel counts.
    A writeable float64 kernel of the merged shape is taken as the sum's start and scaled in place
    (a kernel of half a gigabyte is not copied): a caller keeps what it reads later read-only."""
    first = branches[0]
    bias = constant.astype(np.float64).copy()
    if first.kind == GEMM:
        weight = np.zeros_like(first.weight, dtype=np.float64)
        for branch, c in zip(branches, coefficients):
            weight += c[:, None] * branch.weight
            bias += c * branch.bias
        return AffineMap(GEMM, weight, bias)
    kh = max(b.weight.shape[2] for b in branches)
    kw = max(b.weight.shape[3] for b in branches)
    groups = math.gcd(*(b.groups for b in branches))
    # A branch already of the merged shape starts the sum (one pass over the largest array, not three).
    full = next((i for i, b in enumerate(branches) if b.weight.shape[2:] == (kh, kw) and b.groups == groups), None)
    if full is None:
        weight = np.zeros((first.out_channels, first.in_channels // groups, kh, kw), dtype=np.float64)
    else:
        weight = branches[full].weight
        if weight.dtype == np.float64 and weight.flags.writeable:  # the branch's own copy: no second array
            weight *= coefficients[full][:, None, None, None]
        else:
            weight = coefficients[full][:, None, None, None] * np.asarray(weight, np.float64)
        bias += coefficients[full] * branches[full].bias
    for index, (branch, c) in enumerate(zip(branches, coefficients)):
        h, w = branch.weight.shape[2:]
        if index == full:
            continue
        if branch.groups == branch.in_channels == branch.out_channels and (h, w) == (1, 1):
            _add_depthwise_1x1(weight, branch, c)
        else:
            kernel = regroup(np.asarray(branch.weight, np.float64), branch.groups, groups, branch.in_channels)
            top, left = (kh - h) // 2, (kw - w) // 2
            weight[:, :, top:top + h, left:left + w] += c[:, None, None, None] * kernel
        bias += c * branch.bias
    return AffineMap(CONV, weight, bias, groups, first.strides, first.dilations)


def undilated(conv: AffineMap) -> AffineMap:
    """A dilated conv as the equal conv with dilation 1: its taps spread over a kernel of size
    r(k-1)+1 with zeros between them."""
    if conv.dilations == (1, 1):
        return conv
    (rh, rw), (kh, kw) = conv.dilations, conv.weight.shape[2:]
    weight = np.zeros(conv.weight.shape[:2] + (rh * (kh - 1) + 1, rw * (kw - 1) + 1))
    weight[:, :, ::rh, ::rw] = conv.weight
    return AffineMap(CONV, weight, conv.bias, conv.groups, conv.strides)


def _blocks(conv: AffineMap, groups: int) -> np.ndarray:
    """The kernel regrouped to ``groups`` as [groups, out per group, in per group, kh, kw]."""
    weight = regroup(np.asarray(conv.weight, np.float64), conv.groups, groups, conv.in_channels)
    return weight.reshape((groups, conv.out_channels // groups) + weight.shape[1:])


def compose(outer: AffineMap, inner: AffineMap, inner_is_pointwise: bool) -> AffineMap:
    """``outer(inner(x))`` as one conv, when one of them is a 1x1 conv of stride 1 without padding
    (``inner_is_pointwise`` says which): the result has the other's geometry. Grouped convs compose
    block by block at the greatest common divisor of their groups. The caller checks that the
    composition is exact (an inner bias that a padded outer conv would not see at the borders)."""
    groups = math.gcd(outer.groups, inner.groups)
    a, b = _blocks(outer, groups), _blocks(inner, groups)
    inner_bias = np.asarray(inner.bias, np.float64).reshape(groups, -1)
    # Per group and kernel tap, a matrix product (BLAS): [kh, kw, O, M] @ [M, I] or [O, M] @ [M, I, kh, kw].
    if inner_is_pointwise:
        weight = np.matmul(a.transpose(0, 3, 4, 1, 2), b[:, None, None, :, :, 0, 0]).transpose(0, 3, 4, 1, 2)
        bias = outer.bias + (a.sum(axis=(3, 4)) @ inner_bias[..., None])[..., 0].reshape(-1)
        geometry = outer
    else:
        weight = np.matmul(a[:, None, None, :, :, 0, 0], b.transpose(0, 3, 4, 1, 2)).transpose(0, 3, 4, 1, 2)
        bias = outer.bias + (a[..., 0, 0] @ inner_bias[..., None])[..., 0].reshape(-1)
        geometry = inner
    return AffineMap(CONV, weight.reshape((-1,) + weight.shape[2:]), bias, groups, geometry.strides,
                     geometry.dilations)


def multiply_adds(conv: AffineMap) -> int:
    """Multiply-adds per output pixel."""
    return int(np.prod(conv.weight.shape))


def composed_multiply_adds(outer: AffineMap, inner: AffineMap, inner_is_pointwise: bool) -> int:
    """What :func:`compose` would make costs per output pixel, without making it."""
    kernel = (outer if inner_is_pointwise else inner).weight.shape[2:]
    return outer.out_channels * inner.in_channels // math.gcd(outer.groups, inner.groups) * int(np.prod(kernel))
