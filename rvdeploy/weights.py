"""The artifacts of the first two stages: training-form and deploy-form weights.

Both hold tensors under the official repository's names; the architecture travels with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rvdeploy.arch import ArchSpec
from rvdeploy.files import FileDigest
from rvdeploy.model import DEFAULT_BN_EPS, RepVGG, build_model
from rvdeploy.preprocess import Preprocess


@dataclass(frozen=True)
class Source:
    """Where weights came from."""

    path: str
    digest: FileDigest
    layout: str  # "official", "timm", "mmpretrain" or "rvdeploy" (a fused file)
    wrapper: str | None = None  # the entry of a wrapped checkpoint that held the tensors

    @property
    def sha256(self) -> str:
        return self.digest.hex


@dataclass
class TrainWeights:
    """Multi-branch weights: ``stage0.rbr_dense.conv.weight``, ``stage1.0.rbr_identity.running_var``, ..."""

    spec: ArchSpec
    tensors: dict[str, torch.Tensor]
    source: Source | None = None
    preprocess: Preprocess | None = None
    bn_eps: float = DEFAULT_BN_EPS  # every BatchNorm of every module built from these weights uses it

    form = "multi-branch"

    def to_module(self, dtype: torch.dtype = torch.float32) -> RepVGG:
        """The multi-branch net in eval mode, with these weights and this BN epsilon."""
        return build_model(self.spec, False, self.tensors, self.bn_eps, dtype)


@dataclass
class DeployWeights:
    """Folded weights: ``stage0.rbr_reparam.{weight,bias}``, ``stageN.i.se.*``, ``linear.*``."""

    spec: ArchSpec
    tensors: dict[str, torch.Tensor]
    meta: dict  # provenance and the fold's report; "source_sha256" names the training checkpoint
    preprocess: Preprocess | None = None
    source: Source | None = None  # the fused file these were read from, if any

    form = "fused"

    def to_module(self, dtype: torch.dtype = torch.float32) -> RepVGG:
        """The plain net (3x3 conv + bias per block) in eval mode."""
        return build_model(self.spec, True, self.tensors, dtype=dtype)
