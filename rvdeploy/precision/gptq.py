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


def unfold(x: np.ndarray, attrs: dict, kernel: tuple[int, int], positions: tuple[np.ndarray, ...]) -> np.ndarray:
    """The Conv input ``x`` (N, C, H, W) at the kernel windows of ``positions`` (image, y, x of the
    output): (rows, groups, C/groups · kh · kw), in the order of the weights' last three axes."""
    sh, sw = attrs.get("strides", [1, 1])
    dh, dw = attrs.get("dilations", [1, 1])
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    span = ((kernel[0] - 1) * dh + 1, (kernel[1] - 1) * dw + 1)
    # every window a view, gathered in one indexing (2-5x faster than one gather per tap, stacked)
    windows = sliding_window_view(padded, span, axis=(2, 3))[..., ::dh, ::dw]
    image, oy, ox = positions
    return windows[image, :, oy * sh, ox * sw].reshape(len(image), attrs.get("group", 1), -1)


@dataclass
class Grams:
    """Per group: H = X̃qᵀX̃q (K + 1, K + 1), C = X̃qᵀY (K + 1, out/groups), with X̃q the INT8 rows and a
    column of ones for the bias; and ‖Y‖², the FP32 outputs' energy."""

    hq: np.ndarray
    cross: np.ndarray
    energy: float

    @classmethod
    def of(cls, xq: np.ndarray, y: np.ndarray) -> Grams:
        """From rows ``xq`` (rows, groups, K) and FP32 outputs ``y`` (rows, groups, out/groups)."""
        q = np.concatenate([xq, np.ones((*xq.shape[:2], 1), xq.dtype)], axis=2).transpose(1, 0, 2)  # (groups, rows, K + 1)
        qt = q.transpose(0, 2, 1)
        return cls((qt @ q).astype(np.float64), (qt @ y.transpose(1, 0, 2)).astype(np.float64),
                   float(np.square(y, dtype=np.float64).sum()))

    def __add__(self, other: Grams) -> Grams:
        return Grams(self.hq + other.hq, self.cross + other.cross, self.energy + other.energy)

    def noise(self, chosen: np.ndarray) -> float:
        """‖Y − X̃q·chosenᵀ‖² for ``chosen`` (groups, out/groups, K + 1: weights, then bias), in closed form."""
        fitted = float(np.sum(chosen * self.cross.transpose(0, 2, 1)))
        quadratic = float(np.sum((chosen @ self.hq) * chosen))  # matrix products: BLAS, where einsum would loop
        return max(self.energy - 2 * fitted + quadratic, 0.0)


def sqnr_db(energy: float, noise: float) -> float:
    return float(10 * np.log10(energy / noise)) if noise > 0 else math.inf


def inverse_factor(hessian: np.ndarray) -> np.ndarray:
    """U, upper triangular, with Uᵀ·U = ``hessian``⁻¹ (groups, n, n), from one Cholesky factorization
    and one triangular inverse: with J the reversal, J·H·J = M·Mᵀ gives H = Ũ·Ũᵀ (Ũ = J·M·J, upper),
    so H⁻¹ = (Ũ⁻¹)ᵀ·Ũ⁻¹. Many groups (a depthwise layer's hundreds of small matrices) are inverted in one
    batched call: one LAPACK call per group costs more than the arithmetic."""
    from scipy.linalg.lapack import dtrtri

    flipped = np.linalg.cholesky(hessian[:, ::-1, ::-1])[:, ::-1, ::-1]
    if len(flipped) > 1:
        return np.triu(np.linalg.inv(flipped))
    return dtrtri(np.ascontiguousarray(flipped[0]), lower=0)[0][None]


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


@dataclass(frozen=True)
class Solved:
    """The least-squares weights W* of one layer for one λ (``weights``: groups, out/groups, K + 1, the
    bias last, fixed or fitted) and the factor GPTQ rounds them with."""

    weights: np.ndarray
    upper: np.ndarray
    scale: np.ndarray

    def rounded(self) -> np.ndarray:
        """W* on the grid by GPTQ, the bias (when fitted) taking what rounding leaves: alike (groups, out/groups, K + 1)."""
        k = self.weights.shape[2] - 1
        with_bias = self.upper.shape[1] == k + 1
        integers, free = gptq(self.weights[:, :, :self.upper.shape[1]], self.upper, self.scale, k)
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
    upper = inverse_factor(regularized)
    # argmin ‖Y − X̃q·W*ᵀ‖² + λ‖W* − W‖²: (H + λ)·W*ᵀ = C + λ·Wᵀ, with (H + λ)⁻¹ = Uᵀ·U
    right = cross + penalty[:, None, None] * reference[:, :, :columns].transpose(0, 2, 1)
    best = (upper.transpose(0, 2, 1) @ (upper @ right)).transpose(0, 2, 1)
    return Solved(best if with_bias else np.concatenate([best, reference[:, :, k:]], axis=2), upper, scale)


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


def fit_layer(reference: np.ndarray, nearest: np.ndarray, scale: np.ndarray, folds: tuple[Grams, Grams],
              with_bias: bool) -> LayerFit:
    """Nearest and adaptive rounding of one layer (``reference``, ``nearest``: (groups, out/groups,
    K + 1) weights and bias). Fitted on the first fold, the λ of :data:`DAMPINGS` that predicts the
    second fold best is chosen (tried from the largest down until the score stops improving), and the
    layer refitted on both, unless that held-out score does not beat nearest rounding's on the same
    rows. Rows to fit on fewer than a quarter of the weights in a
    row (a wide layer on small feature maps: nothing to learn from), values that are not finite, or
    unrounded least-squares weights (at the largest λ) no better than nearest rounding on the second
    fold leave the layer rounded to nearest, its adaptive SQNR reported as nearest's."""
    with np.errstate(all="ignore"):  # a value that is not finite is caught below, not printed
        return _fit_layer(reference, nearest, scale, folds, with_bias)


def _fit_layer(reference: np.ndarray, nearest: np.ndarray, scale: np.ndarray, folds: tuple[Grams, Grams],
               with_bias: bool) -> LayerFit:
    fitting, held_out = folds
    nearest_noise = held_out.noise(nearest)
    nearest_db = sqnr_db(held_out.energy, nearest_noise)
    finite = (all(np.isfinite(g.hq).all() and np.isfinite(g.cross).all() and math.isfinite(g.energy) for g in folds)
              and (scale > 0).all())
    if not finite or fitting.hq[0, -1, -1] < MIN_ROWS_PER_COLUMN * fitting.hq.shape[1]:  # the ones column's square: the rows
        return LayerFit(nearest_db, nearest_db, math.nan, None)
    noise: dict[float, float] = {}
    last = math.inf
    for damping in sorted(DAMPINGS, reverse=True):  # held-out noise is U-shaped in λ: from the largest down, to its low
        solved = solve(fitting, reference, scale, damping, with_bias)
        if not noise and held_out.noise(solved.weights) >= nearest_noise:
            # even unrounded, the least-squares weights score no better than nearest here: rounding them only
            # adds to their error (YOLOv10n: 48 of 83 layers, the largest ones; the one of them adaptive
            # rounding kept gained 1e-4 dB)
            return LayerFit(nearest_db, nearest_db, math.nan, None)
        noise[damping] = held_out.noise(solved.rounded())
        if noise[damping] >= last:
            break
        last = noise[damping]
    damping = min(noise, key=noise.get)
    chosen = fit(fitting + held_out, reference, scale, damping, with_bias) if noise[damping] < nearest_noise else None
    return LayerFit(nearest_db, sqnr_db(held_out.energy, noise[damping]), damping,
                    chosen if chosen is not None and np.isfinite(chosen).all() else None)
