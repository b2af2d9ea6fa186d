"""The arithmetic of adaptive rounding (:mod:`rvdeploy.precision.rounding`): one layer's weights
fitted and rounded from the Gram matrices of its captured inputs, in numpy float64.

A layer is a matrix W (groups, out/groups, K) and a bias b applied to rows x (K values: a Conv's
kernel window at one output position, a Gemm's input row). With X the FP32 graph's rows and Y = X·Wᵀ + b
its outputs, and Xq the same rows as the INT8 graph computes them, adaptive rounding minimizes

    ‖Y − Xq·Qᵀ − b'‖² + λ·‖Q − W‖²      over Q on the layer's int8 grid (and b', where it may change)

in two steps whose sum is exact: the unconstrained minimum W* by least squares (which also corrects
the error Xq carries from upstream), then Q by GPTQ's column-by-column rounding with the error
feedback of the inverse Hessian (Frantar et al., ICLR 2023; the OBQ update with a fixed order). λ
is chosen on images the fit did not see (fitted on half of them, scored on the other half), so the
fit does not learn the calibration set by heart; every score is computed in closed form from the
Gram matrices.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

QMAX = 127  # the symmetric int8 grid onnxruntime's quantizer writes and TensorRT reads
DAMPINGS = (0.03, 0.1, 0.3, 1.0)  # λ to choose from, relative to the mean diagonal of XqᵀXq
MIN_ROWS_PER_COLUMN = 0.25  # rows to fit on per weight of a row, at least: fewer leave the layer rounded to nearest
BLOCK = 128  # columns rounded between two matrix updates of the rest (GPTQ's lazy batch update)


def output_positions(images: int, out_h: int, out_w: int, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """``rows`` random output positions of a Conv over ``images`` images (all of them if there are
    fewer), as (image, y, x) index arrays in order."""
    total = images * out_h * out_w
    picked = np.sort(rng.choice(total, rows, replace=False)) if rows < total else np.arange(total)
    return np.unravel_index(picked, (images, out_h, out_w))


def channels_last(x_shape: tuple[int, ...], kernel: tuple[int, int], groups: int, rows: int) -> bool:
    """Whether to unfold a Conv's input (N, C, H, W) channels-last, rows in (kh, kw, C/groups) order:
    where a group has at least as many channels as a window has taps (its channels are then the longer
    contiguous run to gather; a depthwise layer's are one value), and the ``rows`` read the input at
    least once over (else copying it channels-last costs more than gathering saves)."""
    n, c, h, w = x_shape
    return c // groups >= kernel[0] * kernel[1] and rows * kernel[0] * kernel[1] >= n * h * w


def kernel_windows(x: np.ndarray, attrs: dict, kernel: tuple[int, int], last: bool) -> np.ndarray:
    """Every kernel window of the Conv input ``x`` (N, C, H, W), as a view of it padded, before the
    strides: (N, out_h, out_w, groups, kh, kw, C/groups) when ``last`` (:func:`channels_last`; the input
    copied so: gathering windows is then 5x faster), else (N, C, out_h, out_w, kh, kw)."""
    dh, dw = attrs.get("dilations", [1, 1])
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    span = ((kernel[0] - 1) * dh + 1, (kernel[1] - 1) * dw + 1)
    if not last:
        return sliding_window_view(padded, span, axis=(2, 3))[..., ::dh, ::dw]
    padded = np.ascontiguousarray(padded.transpose(0, 2, 3, 1))
    windows = sliding_window_view(padded, span, axis=(1, 2))[..., ::dh, ::dw]  # (N, out_h, out_w, C, kh, kw)
    return windows.reshape(*windows.shape[:3], attrs.get("group", 1), -1, *kernel).transpose(0, 1, 2, 3, 5, 6, 4)


def unfold(windows: np.ndarray, attrs: dict, positions: tuple[np.ndarray, ...]) -> np.ndarray:
    """The :func:`kernel_windows` of a Conv input at ``positions`` (image, y, x of the output): (rows,
    groups, K), in the order of :func:`window_order`."""
    sh, sw = attrs.get("strides", [1, 1])
    image, oy, ox = positions
    groups = attrs.get("group", 1)
    if windows.ndim == 7:  # channels-last
        return windows[image, oy * sh, ox * sw].reshape(len(image), groups, -1)
    # every window a view, gathered in one indexing (2-5x faster than one gather per tap, stacked)
    return windows[image, :, oy * sh, ox * sw].reshape(len(image), groups, -1)


def window_order(kernel: tuple[int, int], channels: int, last: bool) -> np.ndarray:
    """Where each of a group's weights (C/groups, kh, kw, in that order) lies in an unfolded row
    (channels-last where ``last``), then the bias column last: the index that puts Gram matrices in the
    weights' order."""
    order = np.arange(kernel[0] * kernel[1] * channels)
    if last:  # rows are (kh, kw, C/groups)
        order = order.reshape(*kernel, channels).transpose(2, 0, 1).reshape(-1)
    return np.append(order, order.size)


@dataclass
class Grams:
    """Per group: H = X̃qᵀX̃q (K + 1, K + 1), C = X̃qᵀY (K + 1, out/groups), with X̃q the INT8 rows and a
    column of ones for the bias; and ‖Y‖², the FP32 outputs' energy."""

    hq: np.ndarray
    cross: np.ndarray
    energy: float

    @classmethod
    def of(cls, xq: np.ndarray, y: np.ndarray) -> Grams:
        """From rows ``xq`` (rows, groups, K) and FP32 outputs ``y`` (rows, groups, out/groups): products in
        float32 (BLAS), sums in float64; the ones column's products are sums, not a column to multiply."""
        x, yt = xq.transpose(1, 0, 2), y.transpose(1, 0, 2)  # (groups, rows, ·)
        xt = x.transpose(0, 2, 1)
        groups, rows, k = x.shape
        ones = np.ones(rows, xq.dtype)
        hq = np.empty((groups, k + 1, k + 1))
        hq[:, :k, :k] = xt @ x
        hq[:, k, :k] = hq[:, :k, k] = ones @ x
        hq[:, k, k] = rows
        cross = np.empty((groups, k + 1, yt.shape[2]))
        cross[:, :k] = xt @ yt
        cross[:, k] = ones @ yt
        flat = y.reshape(-1)
        return cls(hq, cross, float(np.dot(flat.astype(np.float64), flat)))

    def __add__(self, other: Grams) -> Grams:
        return Grams(self.hq + other.hq, self.cross + other.cross, self.energy + other.energy)

    def reordered(self, order: np.ndarray) -> Grams:
        """The same products with the columns taken in ``order`` (:func:`window_order`)."""
        return Grams(self.hq[:, order[:, None], order], self.cross[:, order], self.energy)

    def add(self, other: Grams) -> Grams:
        """``other`` added into this one's arrays (no new matrices: a 2,305-column layer's are 42 MB); this one."""
        self.hq += other.hq
        self.cross += other.cross
        self.energy += other.energy
        return self

    def noise(self, chosen: np.ndarray) -> float:
        """‖Y − X̃q·chosenᵀ‖² for ``chosen`` (groups, out/groups, K + 1: weights, then bias), in closed form."""
        fitted = float(np.sum(chosen * self.cross.transpose(0, 2, 1)))
        quadratic = float(np.sum((chosen @ self.hq) * chosen))  # matrix products: BLAS, where einsum would loop
        return max(self.energy - 2 * fitted + quadratic, 0.0)


def sqnr_db(energy: float, noise: float) -> float:
    return float(10 * np.log10(energy / noise)) if noise > 0 else math.inf


def cholesky_factor(hessian: np.ndarray) -> np.ndarray:
    """Ũ, upper triangular, with Ũ·Ũᵀ = ``hessian`` (groups, n, n): with J the reversal, J·H·J = M·Mᵀ
    (Cholesky) gives Ũ = J·M·J."""
    return np.linalg.cholesky(hessian[:, ::-1, ::-1])[:, ::-1, ::-1]


def inverse_factor(hessian: np.ndarray) -> np.ndarray:
    """U, upper triangular, with Uᵀ·U = ``hessian``⁻¹ (groups, n, n): :func:`upper_inverse` of its
    :func:`cholesky_factor` (H = Ũ·Ũᵀ, so H⁻¹ = (Ũ⁻¹)ᵀ·Ũ⁻¹)."""
    return upper_inverse(cholesky_factor(hessian))


def upper_inverse(factor: np.ndarray) -> np.ndarray:
    """Ũ⁻¹ of upper triangular matrices (groups, n, n): one triangular inverse, or for many groups (a
    depthwise layer's hundreds of small matrices) one batched call: one LAPACK call per group costs
    more than the arithmetic."""
    from scipy.linalg.lapack import dtrtri

    if len(factor) > 1:
        return np.triu(np.linalg.inv(factor))
    return dtrtri(np.ascontiguousarray(factor[0]), lower=0)[0][None]


def cholesky_solve(factor: np.ndarray, right: np.ndarray) -> np.ndarray:
    """X with Ũ·Ũᵀ·X = ``right`` (groups, n, m), Ũ the :func:`cholesky_factor`: two triangular solves
    for one group, where the inverse would cost another factorization's work; many small groups as
    one batched inverse."""
    from scipy.linalg import solve_triangular

    if len(factor) > 1:
        upper = upper_inverse(factor)
        return upper.transpose(0, 2, 1) @ (upper @ right)
    inner = solve_triangular(factor[0], right[0], lower=False, check_finite=False)  # Ũ·Z = right, Z = Ũᵀ·X
    return solve_triangular(factor[0], inner, lower=False, trans="T", check_finite=False)[None]


def gptq(target: np.ndarray, upper: np.ndarray, scale: np.ndarray, rounded: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``rounded`` columns of ``target`` (groups, out/groups, columns) rounded one by one to
    the grid ``scale`` (groups, out/groups), each column's error spread over the later ones through
    ``upper`` (:func:`inverse_factor` of the Hessian: GPTQ's Cholesky factor of its inverse); the
    columns after them are never rounded and take what is left. The integers, and the free columns as updated."""
    weights = target.copy()
    integers = np.zeros(weights.shape[:2] + (rounded,))
    for start in range(0, rounded, BLOCK):
        end = min(start + BLOCK, rounded)
        errors = np.zeros(weights.shape[:2] + (end - start,))
        for i in range(start, end):
            q = np.clip(np.round(weights[:, :, i] / scale), -QMAX, QMAX)
            integers[:, :, i] = q
            error = (weights[:, :, i] - q * scale) / upper[:, None, i, i]
            weights[:, :, i + 1:end] -= error[:, :, None] * upper[:, None, i, i + 1:end]
            errors[:, :, i - start] = error
        weights[:, :, end:] -= errors @ upper[:, start:end, end:]
    return integers, weights[:, :, rounded:]


class Solved:
    """The least-squares weights W* of one layer for one λ (``weights``: groups, out/groups, K + 1, the
    bias last, fixed or fitted) and what GPTQ rounds them with: the Hessian's Cholesky factor, whose
    triangular inverse is made only if they are rounded."""

    def __init__(self, weights: np.ndarray, factor: np.ndarray, scale: np.ndarray) -> None:
        self.weights, self.factor, self.scale = weights, factor, scale

    @functools.cached_property
    def upper(self) -> np.ndarray:
        return upper_inverse(self.factor)

    def rounded(self) -> np.ndarray:
        """W* on the grid by GPTQ, the bias (when fitted) taking what rounding leaves: alike (groups, out/groups, K + 1)."""
        k = self.weights.shape[2] - 1
        with_bias = self.factor.shape[1] == k + 1
        integers, free = gptq(self.weights[:, :, :self.factor.shape[1]], self.upper, self.scale, k)
        return np.concatenate([integers * self.scale[..., None], free if with_bias else self.weights[:, :, k:]], axis=2)


def solve(grams: Grams, reference: np.ndarray, scale: np.ndarray, damping: float, with_bias: bool) -> Solved:
    """The unconstrained step of adaptive rounding on ``grams`` with regularization ``damping`` (× the
    mean of diag H). ``reference``: the FP32 weights and bias (groups, out/groups, K + 1); the bias is
    fitted too when ``with_bias``, else kept."""
    k = reference.shape[2] - 1
    columns = k + 1 if with_bias else k
    hq, cross = grams.hq[:, :columns, :columns], grams.cross[:, :columns]
    if not with_bias:  # the fixed bias moved to the outputs: Y - b
        cross = cross - grams.hq[:, :k, k:] * reference[:, None, :, k]
    # λ·I per group, kept as its diagonal: a product with it is a scaling (as a matrix product it cost
    # more than the Cholesky factorization on a 2,305-column layer)
    penalty = damping * np.mean(np.diagonal(hq, axis1=1, axis2=2), axis=1)
    diagonal = np.arange(columns)
    regularized = hq.copy()
    regularized[:, diagonal, diagonal] += penalty[:, None]
    factor = cholesky_factor(regularized)
    # argmin ‖Y − X̃q·W*ᵀ‖² + λ‖W* − W‖²: (H + λ)·W*ᵀ = C + λ·Wᵀ
    right = cross + penalty[:, None, None] * reference[:, :, :columns].transpose(0, 2, 1)
    best = cholesky_solve(factor, right).transpose(0, 2, 1)
    return Solved(best if with_bias else np.concatenate([best, reference[:, :, k:]], axis=2), factor, scale)


def fit(grams: Grams, reference: np.ndarray, scale: np.ndarray, damping: float, with_bias: bool) -> np.ndarray:
    """What adaptive rounding chooses on ``grams`` with regularization ``damping``: (groups,
    out/groups, K + 1), the integers times ``scale``, then the bias (:func:`solve`, then GPTQ)."""
    return solve(grams, reference, scale, damping, with_bias).rounded()


@dataclass(frozen=True)
class LayerFit:
    nearest_sqnr_db: float  # the layer's outputs against FP32 on the odd images' rows, weights rounded to nearest
    adaptive_sqnr_db: float  # adaptive rounding's there, fitted on the even images' rows
    damping: float  # the λ chosen
    chosen: np.ndarray | None  # the weights and bias fitted on all rows (None: nearest scored higher)
    bias_only: bool = False  # ``chosen`` is nearest rounding's integers with the bias refitted
    bias_chosen: bool = False  # the bias was free and chosen on held-out rows (refitted, or kept as it was)


def fit_layer(reference: np.ndarray, nearest: np.ndarray, scale: np.ndarray, folds: tuple[Grams, Grams],
              with_bias: bool) -> LayerFit:
    """Nearest and adaptive rounding of one layer (``reference``, ``nearest``: (groups, out/groups,
    K + 1) weights and bias). Fitted on the first fold, the λ of :data:`DAMPINGS` that predicts the
    second fold best is chosen (tried from the largest down until the score stops improving), and the
    layer refitted on both, unless that held-out score does not beat nearest rounding's on the same
    rows. Rows to fit on fewer than a quarter of the weights in a row (a wide layer on small feature
    maps: nothing to learn from), or unrounded least-squares weights (at the largest λ) no better than
    nearest rounding on the second fold leave the layer's integers rounded to nearest; its bias (when
    ``with_bias``) is then refitted alone where that scores higher on the second fold. Values that are
    not finite leave the layer as it is. Where nothing changes, the adaptive SQNR is reported as nearest's."""
    with np.errstate(all="ignore"):  # a value that is not finite is caught below, not printed
        return _fit_layer(reference, nearest, scale, folds, with_bias)


def refit_bias(grams: Grams, weights: np.ndarray) -> np.ndarray:
    """``weights`` (groups, out/groups, K + 1) with the bias that minimizes ‖Y − X̃q·chosenᵀ‖² for their
    own integers: the mean output error over the rows, from the ones column of the Gram matrices."""
    k = weights.shape[2] - 1
    rows = grams.hq[:, k, k]  # the ones column's square: the number of rows
    bias = (grams.cross[:, k, :] - np.einsum("gk,gok->go", grams.hq[:, k, :k], weights[:, :, :k])) / rows[:, None]
    return np.concatenate([weights[:, :, :k], bias[..., None]], axis=2)


def _fit_layer(reference: np.ndarray, nearest: np.ndarray, scale: np.ndarray, folds: tuple[Grams, Grams],
               with_bias: bool) -> LayerFit:
    fitting, held_out = folds
    nearest_noise = held_out.noise(nearest)
    nearest_db = sqnr_db(held_out.energy, nearest_noise)
    finite = (all(np.isfinite(g.hq).all() and np.isfinite(g.cross).all() and math.isfinite(g.energy) for g in folds)
              and (scale > 0).all())
    if not finite:
        return LayerFit(nearest_db, nearest_db, math.nan, None)

    def nearest_or_bias() -> LayerFit:
        """Nearest rounding's integers, with the bias refitted where that scores higher on the second
        fold (empirical bias correction, decided per layer on rows it was not fitted on)."""
        if with_bias and fitting.hq[0, -1, -1] > 0:
            refitted = held_out.noise(refit_bias(fitting, nearest))
            if refitted < nearest_noise:
                chosen = refit_bias(fitting + held_out, nearest)
                if np.isfinite(chosen).all():
                    return LayerFit(nearest_db, sqnr_db(held_out.energy, refitted), math.nan, chosen, True, True)
        return LayerFit(nearest_db, nearest_db, math.nan, None, bias_chosen=with_bias)

    if fitting.hq[0, -1, -1] < MIN_ROWS_PER_COLUMN * fitting.hq.shape[1]:  # the ones column's square: the rows
        return nearest_or_bias()
    noise: dict[float, float] = {}
    last = math.inf
    for damping in sorted(DAMPINGS, reverse=True):  # held-out noise is U-shaped in λ: from the largest down, to its low
        solved = solve(fitting, reference, scale, damping, with_bias)
        if not noise and held_out.noise(solved.weights) >= nearest_noise:
            # even unrounded, the least-squares weights score no better than nearest here: rounding them only
            # adds to their error (YOLOv10n: 48 of 83 layers, the largest ones; the one of them adaptive
            # rounding kept gained 1e-4 dB)
            return nearest_or_bias()
        noise[damping] = held_out.noise(solved.rounded())
        if noise[damping] >= last:
            break
        last = noise[damping]
    damping = min(noise, key=noise.get)
    if noise[damping] >= nearest_noise:
        return nearest_or_bias()
    chosen = fit(fitting + held_out, reference, scale, damping, with_bias)
    if not np.isfinite(chosen).all():
        return LayerFit(nearest_db, nearest_db, math.nan, None)
    return LayerFit(nearest_db, sqnr_db(held_out.energy, noise[damping]), damping, chosen, bias_chosen=with_bias)
