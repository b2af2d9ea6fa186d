"""Comparing a candidate's outputs with a reference's: the error, the budget it must meet, the verdict.

The fold's end-to-end figure, ``verify``'s ONNX Runtime parity, ``eval --compare`` and ``bench``'s
check that every timed form computes the same function all use :func:`compare_outputs`.

A network's float32 output differs from its float64 output by an amount set by the network itself
(depth, conditioning, cancellation in BN). That difference, measured on the reference, is what
float32 explains; a second float32 computation of the same function may differ from the float64
reference by a small multiple of it, and anything beyond is a real discrepancy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)
# The candidate may be this many times further from float64 than the reference's own float32.
NOISE_MARGIN = 10.0
# Floor: a few float32 ulps, so a tiny, lucky noise measurement cannot fail a correct result.
NOISE_FLOOR = 16 * FLOAT32_EPS

# A fold's local rounding bound (checkpoint folds and graph folds): a dot product of n terms rounds
# by at most n u times the sum of its absolute terms. SAFETY covers the worst case (real rounding is
# far smaller, ~sqrt(n) u); EXTRA_TERMS the operations beyond the kernel's dot product (BN scale
# and shift, the branch sum, the folded kernel's sum).
U32 = FLOAT32_EPS / 2
U64 = float(np.finfo(np.float64).eps) / 2
SAFETY = 8
EXTRA_TERMS = 10


def _array(values) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def relative_error(value, reference) -> float:
    """max |value - reference| / max |reference| (norm-wise, robust to outputs near zero)."""
    value, reference = _array(value), _array(reference)
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    return float(np.abs(value - reference).max()) / (scale or 1.0) if value.size else 0.0


def sqnr_db(value, reference) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(sum ref^2 / sum (value - ref)^2); inf when equal,
    -inf for a zero reference, NaN when either is not finite."""
    value, reference = _array(value), _array(reference)
    if not (np.isfinite(value).all() and np.isfinite(reference).all()):
        return math.nan
    noise, signal = float(((value - reference) ** 2).sum()), float((reference ** 2).sum())
    if noise == 0:
        return math.inf
    return -math.inf if signal == 0 else 10 * math.log10(signal / noise)


def float32_budget(noise_rel: float) -> float:
    """What float32 explains for a computation whose reference float32 noise is ``noise_rel``."""
    return max(NOISE_MARGIN * noise_rel, NOISE_FLOOR)


def json_safe(value):
    """Tuples become lists, non-finite floats (an overflowing float32 net, identical outputs' SQNR)
    None: JSON has no inf or NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@dataclass(frozen=True)
class Comparison:
    """A candidate against a reference. ``budget_rel`` None: a figure to report, not a test."""

    max_abs_error: float  # candidate vs. the reference a user sees (float32 when there is one)
    max_rel_error: float  # candidate vs. the most exact reference, relative to its largest output
    sqnr_db: float
    top1_agreement: float | None  # share of rows whose arg-max agrees (2-d outputs)
    noise_rel: float | None  # the reference's own float32 vs. float64 difference
    budget_rel: float | None
    finite: bool

    @property
    def passed(self) -> bool | None:
        if self.budget_rel is None:
            return None if self.finite else False
        return self.finite and self.max_rel_error <= self.budget_rel

    @property
    def severity(self) -> float:
        """The error as a share of its budget (over 1: failed; inf when not finite); without a budget,
        the relative error itself."""
        if not self.finite:
            return math.inf
        return self.max_rel_error if self.budget_rel is None else self.max_rel_error / self.budget_rel

    def to_dict(self) -> dict:
        return json_safe({**asdict(self), "passed": self.passed})  # identical outputs' SQNR is inf: None


def worst(comparisons: Iterable[Comparison]) -> Comparison:
    """The comparison nearest to (or furthest over) its budget: what a multi-output check reports."""
    return max(comparisons, key=lambda c: c.severity)


def compare_outputs(candidate, reference, reference32=None, budget_rel: float | None = None) -> Comparison:
    """Compare ``candidate`` with ``reference`` (the most exact one, float64 where there is one).

    With ``reference32`` (the reference computed in float32) the budget is what float32 explains;
    ``budget_rel`` sets it directly; with neither the comparison is only reported.
    """
    cand, ref = _array(candidate), _array(reference)
    if cand.shape != ref.shape:
        raise ValueError(f"candidate shape {cand.shape} differs from reference shape {ref.shape}")
    finite = bool(np.isfinite(cand).all() and np.isfinite(ref).all())
    noise = None
    seen = ref
    if reference32 is not None:
        seen = _array(reference32)
        noise = relative_error(seen, ref)
        budget_rel = float32_budget(noise) if budget_rel is None else budget_rel
    agreement = None
    if cand.ndim == 2 and cand.shape[1] > 1 and cand.size:
        agreement = float((cand.argmax(1) == ref.argmax(1)).mean())
    return Comparison(
        max_abs_error=float(np.abs(cand - seen).max()) if cand.size else 0.0,
        max_rel_error=relative_error(cand, ref),
        sqnr_db=sqnr_db(cand, ref),
        top1_agreement=agreement,
        noise_rel=noise,
        budget_rel=budget_rel,
        finite=finite,
    )
