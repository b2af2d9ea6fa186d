"""Train the small RepVGG that rvdeploy ships for its demo and its accuracy figures.

Data: scikit-learn's bundled copy of the UCI "Optical Recognition of Handwritten Digits" set
(1797 8x8 grayscale images, 10 classes, CC BY 4.0). A stratified, seeded split keeps 360 images
held out. The images go through rvdeploy's own preprocessing (the recipe saved with the model), so
training, calibration and evaluation see identical inputs.

Writes, relative to the repository root:
  models/digits/repvgg_digits_train.pth   training-form checkpoint (official layout, wrapped)
  models/digits/heldout/<class>/*.png     the held-out split, one folder per class
  calib/digits/*.png                      256 training-split images for INT8 calibration

Run: .venv/bin/python models/digits/train.py   (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from rvdeploy.arch import custom_spec
from rvdeploy.model import RepVGG
from rvdeploy.preprocess import Preprocess

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "models" / "digits"
SEED = 0
EPOCHS = 40
BATCH = 64
CALIB_IMAGES = 256
SPEC = custom_spec(depths=(2, 2, 2, 1), widths=(16, 32, 64, 128), num_classes=10, name="RepVGG-digits")


def to_images(pixels: np.ndarray) -> list[Image.Image]:
    # The set stores 17 gray levels (0..16); scale to 8-bit like any image file.
    return [Image.fromarray(np.round(p.reshape(8, 8) * 255.0 / 16.0).astype(np.uint8), mode="L") for p in pixels]


def write_images(images: list[Image.Image], indices: np.ndarray, labels: np.ndarray | None, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    for i, (image, index) in enumerate(zip(images, indices)):
        target = folder / str(labels[i]) if labels is not None else folder
        target.mkdir(parents=True, exist_ok=True)
        image.save(target / f"{index:04d}.png", optimize=True)


def main() -> None:
    torch.manual_seed(SEED)
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(indices, test_size=360, stratify=digits.target, random_state=SEED)
    images = to_images(digits.data)

    # Normalisation statistics from the training split, through the same resize as inference.
    plain = Preprocess(input_size=(32, 32), resize=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    train_raw = np.stack([plain.apply(images[i]) for i in train_idx])
    mean, std = float(train_raw.mean()), float(train_raw.std())
    # The 8x8 digits are enlarged to the 32x32 input by design: images smaller than the input are expected.
    recipe = Preprocess(input_size=(32, 32), resize=32, mean=(mean,) * 3, std=(std,) * 3, upscale=True)

    x_train = torch.from_numpy(np.stack([recipe.apply(images[i]) for i in train_idx]))
    y_train = torch.from_numpy(digits.target[train_idx]).long()
    x_test = torch.from_numpy(np.stack([recipe.apply(images[i]) for i in test_idx]))
    y_test = torch.from_numpy(digits.target[test_idx]).long()

    model = RepVGG(SPEC)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    steps = EPOCHS * math.ceil(len(x_train) / BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    background = (0.0 - mean) / std
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(x_train))
        for start in range(0, len(order), BATCH):
            batch = order[start:start + BATCH]
            # Augment: shift by up to 3 pixels, filling with the background value.
            x = F.pad(x_train[batch], (3, 3, 3, 3), value=background)
            dx, dy = torch.randint(0, 7, (2,)).tolist()
            x = x[:, :, dy:dy + 32, dx:dx + 32]
            loss = F.cross_entropy(model(x), y_train[batch], label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            top1 = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1:2d}  loss {loss.item():.3f}  held-out top-1 {100 * top1:.2f}%")

    checkpoint = OUT / "repvgg_digits_train.pth"
    torch.save(
        {"state_dict": model.state_dict(), "preprocess": recipe.to_dict(), "epoch": EPOCHS, "heldout_top1": top1},
        checkpoint,
    )
    write_images([images[i] for i in test_idx], test_idx, digits.target[test_idx], OUT / "heldout")
    calib = np.sort(np.random.default_rng(SEED).choice(train_idx, CALIB_IMAGES, replace=False))
    write_images([images[i] for i in calib], calib, None, ROOT / "calib" / "digits")
    summary = {
        "arch_spec": SPEC.to_dict(),
        "train_images": len(train_idx),
        "heldout_images": len(test_idx),
        "heldout_top1": top1,
        "preprocess": recipe.to_dict(),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
