"""Image folders: finding images, checking them, and turning them into model input batches.

Calibration reads a folder of images (recursively); evaluation reads one sub-folder per class.
Unreadable images are skipped and counted; images smaller than the model input are refused unless
the recipe (or the caller) allows upscaling, because silently upscaled data calibrates and
measures the wrong thing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from rvdeploy.errors import RvdeployError, first_line
from rvdeploy.preprocess import Preprocess

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_BAD_IMAGE = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError)


class DataError(RvdeployError):
    """An image folder that cannot serve as calibration or evaluation data."""


def find_images(root: str | os.PathLike) -> list[Path]:
    """Every JPEG/PNG under ``root``, recursively, in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a directory" if root.exists() else f"{root}: no such directory")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


@dataclass
class ImageSet:
    """Images that passed the header check, and those skipped with the reason."""

    paths: list[Path]
    labels: list[int] | None = None
    classes: list[str] | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def _check(paths: list[Path], recipe: Preprocess, allow_upscale: bool, what: str) -> tuple[list[int], list[tuple[Path, str]]]:
    """Indices of usable images; refuses images smaller than the input unless upscaling is allowed."""
    usable, skipped, small = [], [], []
    height, width = recipe.input_size
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                w, h = image.size
        except _BAD_IMAGE as exc:
            skipped.append((path, first_line(exc)))
            continue
        if (w < width or h < height) and not (allow_upscale or recipe.upscale):
            small.append((path, w, h))
        usable.append(i)
    if small:
        path, w, h = min(small, key=lambda s: s[1] * s[2])
        raise DataError(
            f"{len(small)} of {len(paths)} {what} images are smaller than the {height}x{width} model input "
            f"(smallest: {path.name}, {w}x{h}); they would be upscaled: use larger images or --allow-upscale"
        )
    if not usable:
        raise DataError(f"none of the {len(paths)} {what} images could be read (first: {skipped[0][0]}: {skipped[0][1]})")
    return usable, skipped


def image_folder(root: str | os.PathLike, recipe: Preprocess, limit: int | None = None, allow_upscale: bool = False) -> ImageSet:
    """Calibration images: every image under ``root``, the first ``limit`` in a stable order."""
    paths = find_images(root)
    if not paths:
        raise DataError(f"{root} holds no JPEG or PNG images")
    paths = paths[:limit] if limit else paths
    usable, skipped = _check(paths, recipe, allow_upscale, "calibration")
    return ImageSet([paths[i] for i in usable], skipped=skipped)


def labelled_folder(root: str | os.PathLike, recipe: Preprocess, allow_upscale: bool = False) -> ImageSet:
    """Evaluation images: one sub-folder per class, classes numbered in sorted folder-name order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a directory" if root.exists() else f"{root}: no such directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected one folder of images per class)")
    paths, labels = [], []
    for index, name in enumerate(classes):
        found = find_images(root / name)
        paths += found
        labels += [index] * len(found)
    if not paths:
        raise DataError(f"the class folders of {root} hold no JPEG or PNG images")
    usable, skipped = _check(paths, recipe, allow_upscale, "evaluation")
    return ImageSet([paths[i] for i in usable], [labels[i] for i in usable], classes, skipped)


def pad_batch(pixels: np.ndarray, size: int) -> np.ndarray:
    """``pixels`` repeated cyclically up to ``size`` images: a fixed-batch model's last, short batch."""
    if len(pixels) >= size:
        return pixels
    return np.concatenate([pixels, np.resize(pixels, (size - len(pixels), *pixels.shape[1:]))])


def batches(images: ImageSet, recipe: Preprocess, batch_size: int) -> Iterator[tuple[np.ndarray, list[int]]]:
    """(N, C, H, W) float32 batches and the indices of the images in them.

    An image that passed the header check but fails to decode is skipped and added to ``images.skipped``;
    :class:`DataError` when none decodes (there would be nothing to calibrate or evaluate on).
    """
    pixels, indices, decoded = [], [], 0
    first_failure = len(images.skipped)
    for i, path in enumerate(images.paths):
        try:
            with Image.open(path) as image:
                pixels.append(recipe.apply(image))
        except _BAD_IMAGE as exc:
            images.skipped.append((path, first_line(exc)))
            continue
        indices.append(i)
        decoded += 1
        if len(pixels) == batch_size:
            yield np.stack(pixels), indices
            pixels, indices = [], []
    if pixels:
        yield np.stack(pixels), indices
    if images.paths and not decoded:
        path, reason = images.skipped[first_failure]
        raise DataError(f"none of the {len(images.paths)} images could be decoded (first: {path}: {reason})")
