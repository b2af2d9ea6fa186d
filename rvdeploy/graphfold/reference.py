"""The original computation a folded node replaces, kept as a small expression of the input
graph's own nodes (weights as they were), so the proof can run it in float64 and float32.

A fold of folds composes: a group whose branch was folded earlier holds that branch's expression,
so every folded node of the output graph is checked against the input graph's nodes alone.

Expressions run in numpy: a proof runs them on windows a few kernels wide, where an im2col matmul
costs what the window holds, and a graph fold then needs no torch at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _array(values: np.ndarray | None, dtype: np.dtype, absolute: bool = False) -> np.ndarray | None:
    """``values`` in ``dtype`` (a weight already of that type is not copied)."""
    if values is None:
        return None
    array = np.asarray(values).astype(dtype, copy=False)
    return np.abs(array) if absolute else array


def _per_channel(values: np.ndarray, ndim: int) -> np.ndarray:
    return values.reshape((1, -1) + (1,) * (ndim - 2))


def _windows(x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], dilations: tuple[int, ...]) -> np.ndarray:
    """The kernel windows of the padded ``x`` (N, C, spatial...): a view [N, C, *out, *kernel]."""
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    view = sliding_window_view(x, spans, axis=tuple(range(2, x.ndim)))
    return view[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
                + tuple(slice(None, None, d) for d in dilations)]


# Weights are converted (to float64, to absolute values) this many bytes at a time: the same small
# buffers again and again instead of a fresh copy of each kernel, whose page faults cost more than
# the arithmetic on a window.
CHUNK_BYTES = 1 << 22


def _blocks(count: int, item_bytes: int):
    """Slices of ``range(count)`` of about :data:`CHUNK_BYTES` each (items of ``item_bytes``)."""
    step = max(1, CHUNK_BYTES // max(item_bytes, 1))
    return (slice(start, start + step) for start in range(0, count, step))


def convolve(x: np.ndarray, weight: np.ndarray, strides: tuple[int, ...], dilations: tuple[int, ...],
             group: int) -> np.ndarray:
    """ONNX's Conv (no bias) of the padded ``x``, in ``x``'s dtype (``weight`` converted to it a
    block at a time): per group one matmul of the kernel windows (im2col), so it costs what the
    window holds, on BLAS."""
    n = weight.ndim - 2
    windows = _windows(x, weight.shape[2:], strides, dilations)
    batch, channels, out = x.shape[0], x.shape[1], windows.shape[2:2 + n]
    per_group, per_group_out, taps = channels // group, weight.shape[0] // group, math.prod(weight.shape[2:])
    # [N, G, Cg, *out, *kernel] → [G, N, *out, Cg, *kernel] → [G, N·out, Cg·kernel]
    columns = windows.reshape((batch, group, per_group) + out + weight.shape[2:])
    columns = columns.transpose((1, 0) + tuple(range(3, 3 + n)) + (2,) + tuple(range(3 + n, 3 + 2 * n)))
    columns = columns.reshape(group, batch * math.prod(out), per_group * taps)
    kernels = weight.reshape(group, per_group_out, per_group * taps)
    y = np.empty((group, columns.shape[1], per_group_out), x.dtype)  # [G, N·out, Og]
    row_bytes = per_group * taps * x.dtype.itemsize
    if group == 1:
        for rows in _blocks(per_group_out, row_bytes):
            y[0, :, rows] = columns[0] @ kernels[0, rows].astype(x.dtype, copy=False).T
    else:
        for groups in _blocks(group, per_group_out * row_bytes):
            y[groups] = np.matmul(columns[groups], kernels[groups].astype(x.dtype, copy=False).transpose(0, 2, 1))
    y = y.reshape((group, batch) + out + (per_group_out,)).transpose((1, 0, 2 + n) + tuple(range(2, 2 + n)))
    return np.ascontiguousarray(y.reshape((batch, weight.shape[0]) + out))  # [N, G·Og, *out]


class Expr:
    """A function of one input tensor: :meth:`run` computes it in ``dtype``; :meth:`bound` bounds,
    per output channel, the sum of the absolute values of every term before they cancel (what
    rounding errors scale with), given the largest ``|x|`` per input channel. It needs no
    convolution: each weight enters with its absolute row sum."""

    def run(self, x: np.ndarray, dtype: np.dtype) -> np.ndarray:
        raise NotImplementedError

    def bound(self, x_max: np.ndarray) -> np.ndarray:
        """``x_max``: [..., C_in] → [..., C_out] (leading axes: one bound per probe)."""
        raise NotImplementedError

    def on(self, inner: Expr) -> Expr:
        """This expression applied to ``inner``'s output instead of the input."""
        return replace(self, inner=self.inner.on(inner))


class Input(Expr):
    def run(self, x, dtype):
        return _array(x, dtype)

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

    def _padding(self, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
        """The (begin, end) pads per axis for this input size (SAME_* depend on it)."""
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
        return list(zip(begins, ends))

    def run(self, x, dtype):
        x = self.inner.run(x, dtype)
        x = np.pad(x, [(0, 0), (0, 0)] + self._padding(x.shape[2:]))
        y = convolve(x, np.asarray(self.weight), self.strides, self.dilations, self.group)
        return y if self.bias is None else y + _per_channel(_array(self.bias, dtype), y.ndim)

    def bound(self, x_max):
        # The taps' absolute sums in float32 at least (a bound's magnitude: its ~1e-7 rounding is nothing
        # beside SAFETY), then float64: a float64 reduction of float32 values is several times slower.
        kernel = np.asarray(self.weight)
        kernel = kernel.reshape(kernel.shape[:2] + (-1,))
        weight = np.empty(kernel.shape[:2])
        for rows in _blocks(kernel.shape[0], kernel[0].nbytes):
            weight[rows] = np.abs(kernel[rows]).sum(2, dtype=np.promote_types(kernel.dtype, np.float32))
        out_channels, per_group = weight.shape  # [Cout, Cin / group]
        rows = np.arange(out_channels)[:, None] // (out_channels // self.group) * per_group + np.arange(per_group)
        total = (weight * self.inner.bound(x_max)[..., rows]).sum(-1)
        return total if self.bias is None else total + _array(self.bias, np.float64, True)


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
        y = np.pad(y, [(0, 0), (0, 0)] + [(self.pads[i], self.pads[n + i]) for i in range(n)])
        windows = _windows(y, self.kernel, self.strides, (1,) * n)
        return windows.mean(tuple(range(-n, 0)), dtype=dtype)

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
        return self._apply(self.inner.run(x, dtype), _array(self.weight, dtype), _array(self.bias, dtype))

    def bound(self, x_max):
        return self._apply(self.inner.bound(x_max), _array(self.weight, np.float64, True),
                           _array(self.bias, np.float64, True))


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
        gamma, beta, mean, var = (_per_channel(_array(v, dtype), y.ndim) for v in (self.gamma, self.beta, self.mean, self.var))
        return (y - mean) / np.sqrt(var + self.eps) * gamma + beta

    def bound(self, x_max):
        gamma, beta, mean, var = (_array(v, np.float64) for v in (self.gamma, self.beta, self.mean, self.var))
        scale = np.abs(gamma / np.sqrt(var + self.eps))
        return scale * self.inner.bound(x_max) + np.abs(beta) + np.abs(mean * scale)


@dataclass(frozen=True, eq=False)
class SumRef(Expr):
    """``sum_i coefficient_i * term_i(x) + constant``, coefficients and constant per output channel."""

    terms: tuple[tuple[np.ndarray, Expr], ...]
    constant: np.ndarray

    def run(self, x, dtype):
        total = _per_channel(_array(self.constant, dtype), x.ndim)
        for coefficient, term in self.terms:
            y = term.run(x, dtype)
            total = total + _per_channel(_array(coefficient, dtype), y.ndim) * y
        return total

    def bound(self, x_max):
        total = _array(self.constant, np.float64, True)
        for coefficient, term in self.terms:
            total = total + _array(coefficient, np.float64, True) * term.bound(x_max)
        return total

    def on(self, inner):
        return SumRef(tuple((c, term.on(inner)) for c, term in self.terms), self.constant)
