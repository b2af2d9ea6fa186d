"""How close two float32 computations of the same network must be.

A network's float32 output differs from its float64 output by an amount set by the network itself
(depth, conditioning, cancellation in BN). That difference, measured on the reference net, is what
float32 explains; a second float32 computation of the same function may differ from the float64
reference by a small multiple of it, and anything beyond is a real discrepancy.
"""

from __future__ import annotations

import torch

FLOAT32_EPS = torch.finfo(torch.float32).eps
# The second computation may be this many times further from float64 than the reference's float32.
NOISE_MARGIN = 10.0
# Floor: a few float32 ulps, so a tiny, lucky noise measurement cannot fail a correct result.
NOISE_FLOOR = 16 * FLOAT32_EPS


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference| (norm-wise, robust to outputs near zero)."""
    scale = reference.abs().max().item() or 1.0
    return (value.double() - reference.double()).abs().max().item() / scale


def float32_tolerance(noise_rel: float) -> float:
    return max(NOISE_MARGIN * noise_rel, NOISE_FLOOR)
