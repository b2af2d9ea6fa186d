"""The preprocessing recipe a model was trained with.

It travels with the weights (fused checkpoint meta, ONNX metadata) so that later stages
(calibration, evaluation) feed the model what it was trained on without asking again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from rvdeploy.errors import RvdeployError

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}
IMAGENET_CROP_RATIO = 0.875  # 224 / 256


def parse_size(value: int | str | tuple | list) -> tuple[int, int]:
    """``224``, ``"224"``, ``"224x192"``, ``"224,192"``, ``"224 192"`` or ``(224, 192)`` as (height, width)."""
    if isinstance(value, str):
        parts = value.replace("x", " ").replace(",", " ").split()
    elif isinstance(value, (tuple, list)):
        parts = list(value)
    else:
        parts = [value]
    try:
        numbers = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise RvdeployError(f"input size {value!r} is not a number: give S, HxW or 'H W'") from None
    if len(numbers) == 1:
        numbers *= 2
    if len(numbers) != 2 or min(numbers) < 1:
        raise RvdeployError(f"input size {value!r} must be one or two positive integers")
    return numbers[0], numbers[1]


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize``, centre-crop ``input_size`` (h, w), scale to [0, 1], normalise.

    ``upscale`` says the model was trained on images smaller than its input (enlarged by the resize),
    so such images are expected rather than a mistake.
    """

    input_size: tuple[int, int]
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    upscale: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", parse_size(self.input_size))
        if self.resize < max(self.input_size):
            raise RvdeployError(f"bad preprocessing: resize {self.resize} is smaller than the crop {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise RvdeployError("bad preprocessing: mean and std need 3 values each, std positive")
        if self.interpolation not in _RESAMPLE:
            raise RvdeployError(f"bad preprocessing: interpolation must be one of {', '.join(_RESAMPLE)}")

    def with_input_size(self, size: tuple[int, int]) -> Preprocess:
        """The same recipe for another input size: the resize scales with the crop."""
        scaled = round(self.resize * max(size) / max(self.input_size))
        return replace(self, input_size=size, resize=max(scaled, *size))

    def apply(self, image: Image.Image) -> np.ndarray:
        """A PIL image as the float32 CHW array the model takes."""
        image = image.convert("RGB")
        w, h = image.size
        ratio = self.resize / min(w, h)
        size = (max(self.resize, round(w * ratio)), max(self.resize, round(h * ratio)))
        image = image.resize(size, _RESAMPLE[self.interpolation])
        crop_h, crop_w = self.input_size
        left, top = (size[0] - crop_w) // 2, (size[1] - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h))
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def to_dict(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "resize": self.resize,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "upscale": self.upscale,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        try:
            return cls(
                input_size=parse_size(data["input_size"]),
                resize=int(data["resize"]),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                interpolation=str(data.get("interpolation", "bilinear")),
                upscale=bool(data.get("upscale", False)),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(inf)
            raise RvdeployError(f"malformed preprocessing recipe: {exc!r}") from None


def imagenet_recipe(size: tuple[int, int] = (224, 224)) -> Preprocess:
    """The recipe of the official ImageNet RepVGG checkpoints (and timm's and mmpretrain's)."""
    return Preprocess(
        input_size=size,
        resize=round(max(size) / IMAGENET_CROP_RATIO),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )


def given_recipe(mean: tuple[float, float, float] | None = None, std: tuple[float, float, float] | None = None,
                 input_size: tuple[int, int] | None = None, resize: int | None = None) -> Preprocess | None:
    """The recipe a user spelled out (``--mean --std --input-size [--resize]``), or None when none was.

    It overrides a model's own recipe; a partial one is refused rather than completed by guesses.
    """
    given = [v is not None for v in (mean, std, input_size)]
    if not any(given) and resize is None:
        return None
    if not all(given):
        raise RvdeployError("a preprocessing recipe needs all of --mean, --std and --input-size")
    size = parse_size(input_size)
    return Preprocess(size, resize or round(max(size) / IMAGENET_CROP_RATIO), tuple(mean), tuple(std))
