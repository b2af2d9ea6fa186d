"""The preprocessing recipe a model was trained with.

It travels with the weights (fused checkpoint meta, ONNX metadata) so that later stages
(calibration, evaluation) feed the model what it was trained on without asking again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from rvdeploy.errors import RvdeployError

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize``, centre-crop ``input_size``, scale to [0, 1], normalise."""

    input_size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.input_size < 1 or self.resize < self.input_size:
            raise RvdeployError(
                f"bad preprocessing: input size {self.input_size} must be positive and not above resize {self.resize}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise RvdeployError("bad preprocessing: mean and std need 3 values each, std positive")
        if self.interpolation not in _RESAMPLE:
            raise RvdeployError(f"bad preprocessing: interpolation must be one of {', '.join(_RESAMPLE)}")

    def apply(self, image: Image.Image) -> np.ndarray:
        """A PIL image as the float32 CHW array the model takes."""
        image = image.convert("RGB")
        w, h = image.size
        ratio = self.resize / min(w, h)
        size = (max(self.resize, round(w * ratio)), max(self.resize, round(h * ratio)))
        image = image.resize(size, _RESAMPLE[self.interpolation])
        left, top = (size[0] - self.input_size) // 2, (size[1] - self.input_size) // 2
        image = image.crop((left, top, left + self.input_size, top + self.input_size))
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        try:
            return cls(
                input_size=int(data["input_size"]),
                resize=int(data["resize"]),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                interpolation=str(data.get("interpolation", "bilinear")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RvdeployError(f"malformed preprocessing recipe: {exc!r}") from None


# The recipe of the official ImageNet RepVGG checkpoints (and timm's and mmpretrain's).
IMAGENET = Preprocess(input_size=224, resize=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
