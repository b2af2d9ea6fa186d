"""Synthetic networks that look trained, for tests and benchmarks that need no real training."""

from __future__ import annotations

import torch

from rvdeploy.arch import ArchSpec
from rvdeploy.model import DEFAULT_BN_EPS, RepVGG, RepVGGBlock
from rvdeploy.probes import image_like



def image_like_batch(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """:func:`rvdeploy.probes.image_like` as a torch batch."""
    return torch.from_numpy(image_like(n, channels, size, seed))


def trained_like_state_dict(
    spec: ArchSpec, seed: int = 0, bn_eps: float = DEFAULT_BN_EPS, inputs: str = "gaussian"
) -> dict[str, torch.Tensor]:
    """An official-layout training state dict that looks trained: random weights, random BN affine
    parameters, and running statistics measured block by block on the activations the eval-mode
    net actually produces, so activations stay in a trained range at any depth.

    ``inputs`` is what the statistics are measured on: ``"gaussian"`` (white noise, the default)
    or ``"image"`` (:func:`image_like_batch`, as training measures them). A net fitted to images
    can be chaotic on a white-noise probe, as a really trained one is.

    Freshly initialised BNs (gamma 1, beta 0, mean 0, var 1) would hide folding mistakes; random
    statistics unrelated to the activations make deep nets explode, which no trained net does.
    """
    if inputs not in ("gaussian", "image"):
        raise ValueError(f"inputs must be 'gaussian' or 'image', not {inputs!r}")
    with torch.random.fork_rng():  # deterministic for a seed, without touching the caller's RNG
        torch.manual_seed(seed)
        model = RepVGG(spec, bn_eps=bn_eps)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.data.uniform_(0.2, 0.8)
                m.bias.data.normal_(0.0, 0.2)
                m.momentum = None  # running statistics become the plain average over the batch
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.data.normal_(0.0, 0.2)
        if inputs == "image":
            x = image_like_batch(16, spec.in_channels, 64, seed)
        else:
            x = torch.randn(16, spec.in_channels, 64, 64)
        with torch.no_grad():
            for block in (m for m in model.modules() if isinstance(m, RepVGGBlock)):  # execution order
                block.train()(x)  # measure this block's statistics on its real (eval-mode) input
                x = block.eval()(x)
    return model.eval().state_dict()
