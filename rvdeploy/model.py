"""Torch modules for RepVGG, training form and deploy form.

Module and parameter names follow the official repository, so a state dict of :class:`RepVGG`
is an official checkpoint: ``stage0``, ``stageN.i``, ``rbr_dense`` / ``rbr_1x1`` / ``rbr_identity``
in training form, ``rbr_reparam`` in deploy form, ``se.down`` / ``se.up`` and ``linear``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rvdeploy.arch import DEFAULT_BN_EPS, ArchSpec, BlockSpec



def conv_bn(block: BlockSpec, kernel_size: int, bn_eps: float) -> nn.Sequential:
    branch = nn.Sequential()
    branch.add_module(
        "conv",
        nn.Conv2d(
            block.in_channels,
            block.out_channels,
            kernel_size,
            stride=block.stride,
            padding=kernel_size // 2,
            groups=block.groups,
            bias=False,
        ),
    )
    branch.add_module("bn", nn.BatchNorm2d(block.out_channels, eps=bn_eps))
    return branch


class SqueezeExcite(nn.Module):
    """Squeeze-excitation as in RepVGG-D2se: global pool, 1x1 down, ReLU, 1x1 up, sigmoid gate."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, hidden, 1, bias=True)
        self.up = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.adaptive_avg_pool2d(x, 1)
        gate = torch.sigmoid(self.up(F.relu(self.down(gate))))
        return x * gate


class RepVGGBlock(nn.Module):
    """One block: three branches (training form) or one 3x3 conv with bias (deploy form)."""

    def __init__(self, block: BlockSpec, deploy: bool, bn_eps: float = DEFAULT_BN_EPS) -> None:
        super().__init__()
        self.spec = block
        self.deploy = deploy
        if deploy:
            self.rbr_reparam = nn.Conv2d(
                block.in_channels,
                block.out_channels,
                3,
                stride=block.stride,
                padding=1,
                groups=block.groups,
                bias=True,
            )
        else:
            self.rbr_identity = nn.BatchNorm2d(block.in_channels, eps=bn_eps) if block.has_identity else None
            self.rbr_dense = conv_bn(block, 3, bn_eps)
            self.rbr_1x1 = conv_bn(block, 1, bn_eps)
        self.se = SqueezeExcite(block.out_channels, block.se_channels) if block.se_channels else nn.Identity()
        self.nonlinearity = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            out = self.rbr_reparam(x)
        else:
            out = self.rbr_dense(x) + self.rbr_1x1(x)
            if self.rbr_identity is not None:
                out = out + self.rbr_identity(x)
        return self.nonlinearity(self.se(out))


class RepVGG(nn.Module):
    """A whole RepVGG network built from its :class:`ArchSpec`."""

    def __init__(self, spec: ArchSpec, deploy: bool = False, bn_eps: float = DEFAULT_BN_EPS) -> None:
        super().__init__()
        self.spec = spec
        self.deploy = deploy
        self.output_stages: tuple[int, ...] | None = None
        blocks = iter(spec.blocks)
        self.stage0 = RepVGGBlock(next(blocks), deploy, bn_eps)
        for stage, depth in enumerate(spec.depths, start=1):
            self.add_module(
                f"stage{stage}", nn.Sequential(*(RepVGGBlock(next(blocks), deploy, bn_eps) for _ in range(depth)))
            )
        if not spec.headless:  # a headless backbone ends at its last stage
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.linear = nn.Linear(spec.num_features, spec.num_classes)

    def stages(self) -> list[nn.Module]:
        return [self.stage0] + [getattr(self, f"stage{s}") for s in range(1, len(self.spec.depths) + 1)]

    def stage_outputs(self, x: torch.Tensor, stages: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """The outputs of ``stages`` (0 is the stem), running no stage beyond the last one asked for."""
        outputs = {}
        for index, stage in enumerate(self.stages()[: max(stages) + 1]):
            x = stage(x)
            outputs[index] = x
        return tuple(outputs[s] for s in stages)

    def as_backbone(self, stages: tuple[int, ...]) -> RepVGG:
        """From now on ``forward`` gives the feature maps of ``stages`` (what a detector's neck reads).
        The module keeps its names, so an export's node names stay ``/stageN/stageN.i/...``."""
        self.output_stages = tuple(stages)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Logits; with :meth:`as_backbone` the stage outputs; a headless net gives its last stage's map."""
        if self.output_stages:
            return self.stage_outputs(x, self.output_stages)
        for stage in self.stages():
            x = stage(x)
        return x if self.spec.headless else self.linear(torch.flatten(self.gap(x), 1))


def as_tuple(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A net's output as a tuple: one tensor for a classifier, one per stage for a backbone."""
    return out if isinstance(out, tuple) else (out,)


def build_model(
    spec: ArchSpec,
    deploy: bool,
    state_dict: dict[str, torch.Tensor] | None = None,
    bn_eps: float = DEFAULT_BN_EPS,
    dtype: torch.dtype = torch.float32,
) -> RepVGG:
    """The network in eval mode and ``dtype``, with ``state_dict`` loaded strictly when given.

    With a state dict the modules are built on the meta device and take its tensors directly,
    so a 100M-parameter net costs no random initialisation.
    """
    if state_dict is None:
        return RepVGG(spec, deploy=deploy, bn_eps=bn_eps).to(dtype).eval()
    return _loaded(lambda: RepVGG(spec, deploy=deploy, bn_eps=bn_eps), state_dict, dtype)


def _loaded(make: Callable[[], nn.Module], state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """``make()`` built on the meta device, then given ``state_dict``'s tensors (in ``dtype``) strictly."""
    with torch.device("meta"):
        module = make()
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    module.load_state_dict(tensors, strict=True, assign=True)
    return module.eval()


def build_block(block: BlockSpec, deploy: bool, state_dict: dict[str, torch.Tensor], bn_eps: float = DEFAULT_BN_EPS,
                dtype: torch.dtype = torch.float32) -> RepVGGBlock:
    """One block in eval mode and ``dtype``, with its tensors (``block.name``-prefixed keys of
    ``state_dict``) loaded strictly: what a block-by-block run of a net builds, one block at a time."""
    prefix = f"{block.name}."
    tensors = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return _loaded(lambda: RepVGGBlock(block, deploy, bn_eps), tensors, dtype)


def expected_shapes(spec: ArchSpec, deploy: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the network's state dict, without allocating it."""
    with torch.device("meta"):
        model = RepVGG(spec, deploy=deploy)
    return {
        name: tuple(t.shape)
        for name, t in model.state_dict().items()
        if not name.endswith("num_batches_tracked")
    }
