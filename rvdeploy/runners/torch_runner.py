"""A checkpoint in torch: the multi-branch net for training form, the plain net for fused form."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from rvdeploy.checkpoint import load_weights
from rvdeploy.runners.base import Runner, RunnerError, RunnerOptions
from rvdeploy.weights import DeployWeights, TrainWeights


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, path: str | os.PathLike, options: RunnerOptions = RunnerOptions(),
                 weights: TrainWeights | DeployWeights | None = None) -> None:
        """``weights`` already loaded from ``path`` (a fold of them, say) are used instead of reading it."""
        super().__init__(path, options)
        self.weights = weights
        self.model: torch.nn.Module | None = None

    def _acquire(self) -> None:
        device = self.options.device
        if device == "cuda" and not torch.cuda.is_available():
            raise RunnerError("--device cuda: no CUDA GPU is available to torch here")
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        weights = self.weights or load_weights(self.path, bn_eps=self.options.bn_eps)
        self.model = weights.to_module().to(device)
        self.form = weights.form
        self.arch = weights.spec.name
        self.preprocess = weights.preprocess
        self.num_classes = weights.spec.num_classes
        self.input_chw = (weights.spec.in_channels, None, None)
        if weights.spec.headless:  # its forward gives the last stage's feature map
            self.output_names, self.output_ranks = (f"stage{weights.spec.num_stages - 1}",), (4,)

    def _release(self) -> None:
        self.model = None
        if self.options.device == "cuda":
            torch.cuda.empty_cache()

    def _infer(self, feed: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            return [self.model(torch.from_numpy(feed).to(self.options.device)).float().cpu().numpy()]

    def _timed(self, feed: np.ndarray) -> Callable[[], None]:
        x = torch.from_numpy(feed).to(self.options.device)

        def run() -> None:
            with torch.inference_mode():
                self.model(x)

        return run
