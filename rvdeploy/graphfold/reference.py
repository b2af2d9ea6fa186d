"""The original computation a folded node replaces, kept as a small expression of the input
graph's own nodes (weights as they were), so the proof can run it in float64 and float32.

A fold of folds composes: a group whose branch was folded earlier holds that branch's expression,
so every folded node of the output graph is checked against the input graph's nodes alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F


def _tensor(values: np.ndarray | None, dtype: torch.dtype, absolute: bool = False) -> torch.Tensor | None:
    if values is None:
        return None
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(dtype)
    return t.abs() if absolute else t


def _per_channel(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.reshape((1, -1) + (1,) * (ndim - 2))


class Expr:
    """A function of one input tensor: :meth:`run` computes it in ``dtype``; :meth:`bound` bounds,
    per output channel, the sum of the absolute values of every term before they cancel (what
    rounding errors scale with), given the largest ``|x|`` per input channel. It needs no
    convolution: each weight enters with its absolute row sum."""

    def run(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def bound(self, x_max: torch.Tensor) -> torch.Tensor:
        """``x_max``: [..., C_in] → [..., C_out] (leading axes: one bound per probe)."""
        raise NotImplementedError

    def on(self, inner: Expr) -> Expr:
        """This expression applied to ``inner``'s output instead of the input."""
        return replace(self, inner=self.inner.on(inner))


class Input(Expr):
    def run(self, x, dtype):
        return x.to(dtype)

    def bound(self, x_max):
        return x_max

    def on(self, inner):
        return inner


@dataclass(frozen=True, eq=False)
class ConvRef(Expr):
    inner: Expr
    weight: np.ndarray
    bias: np.ndarray | None
    strides: tuple[int, ...]
    pads: tuple[int, ...]  # ONNX order: all begins, then all ends
    dilations: tuple[int, ...]
    group: int
    auto_pad: str = "NOTSET"

    def _padding(self, spatial: tuple[int, ...]) -> list[int]:
        """The pads for this input size (SAME_* depend on it), in F.pad's order (last axis first)."""
        n = len(spatial)
        begins, ends = list(self.pads[:n]), list(self.pads[n:])
        if self.auto_pad == "VALID":
            begins, ends = [0] * n, [0] * n
        elif self.auto_pad.startswith("SAME"):
            for i, size in enumerate(spatial):
                kernel = (self.weight.shape[2 + i] - 1) * self.dilations[i] + 1
                total = max((math.ceil(size / self.strides[i]) - 1) * self.strides[i] + kernel - size, 0)
                small = total // 2
                begins[i], ends[i] = (small, total - small) if self.auto_pad == "SAME_UPPER" else (total - small, small)
        return [p for i in reversed(range(n)) for p in (begins[i], ends[i])]

    def _apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[weight.ndim - 3]
        x = F.pad(x, self._padding(tuple(x.shape[2:])))
        return conv(x, weight, bias, self.strides, 0, self.dilations, self.group)

    def run(self, x, dtype):
        return self._apply(self.inner.run(x, dtype), _tensor(self.weight, dtype), _tensor(self.bias, dtype))

    def bound(self, x_max):
        weight = _tensor(self.weight, torch.float64, True).flatten(2).sum(2)  # [Cout, Cin / group]
        out_channels, per_group = weight.shape
        rows = torch.arange(out_channels)[:, None] // (out_channels // self.group) * per_group + torch.arange(per_group)
        total = (weight * self.inner.bound(x_max)[..., rows]).sum(-1)
        return total if self.bias is None else total + _tensor(self.bias, torch.float64, True)


@dataclass(frozen=True, eq=False)
class AvgPoolRef(Expr):
    """An AveragePool that counts the padding (count_include_pad=1): zero-padded, then averaged."""

    inner: Expr
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]  # ONNX order

    def run(self, x, dtype):
        y = self.inner.run(x, dtype)
        n = len(self.kernel)
        y = F.pad(y, [p for i in reversed(range(n)) for p in (self.pads[i], self.pads[n + i])])
        return (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1](y, self.kernel, self.strides)

    def bound(self, x_max):
        return self.inner.bound(x_max)  # an average of absolute values never exceeds their largest


@dataclass(frozen=True, eq=False)
class GemmRef(Expr):
    """``x @ weight.T + bias`` with weight [N, K] (alpha, beta and transB already applied)."""

    inner: Expr
    weight: np.ndarray
    bias: np.ndarray | None

    def _apply(self, x, weight, bias):
        y = x @ weight.T
        return y if bias is None else y + bias

    def run(self, x, dtype):
        return self._apply(self.inner.run(x, dtype), _tensor(self.weight, dtype), _tensor(self.bias, dtype))

    def bound(self, x_max):
        return self._apply(self.inner.bound(x_max), _tensor(self.weight, torch.float64, True),
                           _tensor(self.bias, torch.float64, True))


@dataclass(frozen=True, eq=False)
class BatchNormRef(Expr):
    inner: Expr
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float

    def run(self, x, dtype):
        y = self.inner.run(x, dtype)
        gamma, beta, mean, var = (_per_channel(_tensor(v, dtype), y.ndim) for v in (self.gamma, self.beta, self.mean, self.var))
        return (y - mean) / torch.sqrt(var + self.eps) * gamma + beta

    def bound(self, x_max):
        gamma, beta, mean, var = (_tensor(v, torch.float64) for v in (self.gamma, self.beta, self.mean, self.var))
        scale = (gamma / torch.sqrt(var + self.eps)).abs()
        return scale * self.inner.bound(x_max) + beta.abs() + (mean * scale).abs()


@dataclass(frozen=True, eq=False)
class SumRef(Expr):
    """``sum_i coefficient_i * term_i(x) + constant``, coefficients and constant per output channel."""

    terms: tuple[tuple[np.ndarray, Expr], ...]
    constant: np.ndarray

    def run(self, x, dtype):
        total = _per_channel(_tensor(self.constant, dtype), x.ndim)
        for coefficient, term in self.terms:
            y = term.run(x, dtype)
            total = total + _per_channel(_tensor(coefficient, dtype), y.ndim) * y
        return total

    def bound(self, x_max):
        total = _tensor(self.constant, torch.float64, True)
        for coefficient, term in self.terms:
            total = total + _tensor(coefficient, torch.float64, True) * term.bound(x_max)
        return total

    def on(self, inner):
        return SumRef(tuple((c, term.on(inner)) for c, term in self.terms), self.constant)
