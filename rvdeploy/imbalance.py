"""A function-preserving imbalance: the per-channel ranges that make a folded net hard to quantize,
without changing what it computes in FP32. Tests and benchmarks use it; rvdeploy itself does not.

For every pair of layers cross-layer equalization could balance, a seeded share of the first
layer's output channels is scaled up (weight row and bias) and the matching input channels of the
second layer scaled down by the same factor; ReLU is positively homogeneous, so the function stays.
"""

from __future__ import annotations

import numpy as np
import onnx

from rvdeploy.precision.equalize import ChainWeights, analysed_graph, find_pairs


def imbalance_graph(model: onnx.ModelProto, factor: float = 50.0, share: float = 1 / 16,
                    down_factor: float | None = None, seed: int = 0) -> onnx.ModelProto:
    """A copy of ``model`` whose chosen channels are ``factor`` times larger (and, with
    ``down_factor``, as many others ``down_factor`` times smaller) between every equalizable pair."""
    if factor <= 0 or (down_factor is not None and down_factor <= 0):
        raise ValueError("the factors must be positive")
    if not 0 < share <= (0.5 if down_factor else 1.0):
        raise ValueError(f"share {share} must be in (0, {0.5 if down_factor else 1}]")
    pairs, _ = find_pairs(analysed_graph(model))
    weights = ChainWeights(pairs)
    rng = np.random.default_rng(seed)
    for pair in pairs:
        channels = len(weights.layer(pair.first).out_scale)
        count = max(1, round(share * channels))
        chosen = rng.permutation(channels)
        scale = np.ones(channels)  # the first layer's channel c is divided by scale[c]
        scale[chosen[:count]] = 1.0 / factor
        if down_factor:
            scale[chosen[count:2 * count]] = down_factor
        weights.rescale(pair, scale)
    return weights.write(model)
