"""The shipped trained model: the file the card describes, and its accuracy through the fold."""

import re

import numpy as np
import torch
from PIL import Image

from rvdeploy.checkpoint import load_train_weights
from rvdeploy.files import sha256_file
from rvdeploy.model import build_model
from rvdeploy.reparam import fuse

from conftest import DIGITS_CKPT, ROOT

CARD = DIGITS_CKPT.parent / "README.md"
HELDOUT = DIGITS_CKPT.parent / "heldout"


def test_card_describes_the_shipped_file():
    recorded = re.search(r"\| sha256 \| `([0-9a-f]{64})` \|", CARD.read_text()).group(1)
    assert sha256_file(DIGITS_CKPT) == recorded


def test_splits_are_disjoint_and_complete():
    heldout = sorted(HELDOUT.glob("*/*.png"))
    calib = sorted((ROOT / "calib" / "digits").glob("*.png"))
    assert len(heldout) == 360 and sorted({p.parent.name for p in heldout}) == [str(d) for d in range(10)]
    assert len(calib) == 256
    assert not {p.name for p in heldout} & {p.name for p in calib}


def test_fused_model_keeps_the_heldout_accuracy():
    weights = load_train_weights(DIGITS_CKPT)
    assert weights.preprocess.input_size == (32, 32)
    deploy, report = fuse(weights)
    assert report.passed
    files = sorted(HELDOUT.glob("*/*.png"))
    x = torch.from_numpy(np.stack([weights.preprocess.apply(Image.open(f)) for f in files]))
    labels = torch.tensor([int(f.parent.name) for f in files])
    with torch.no_grad():
        multi = build_model(weights.spec, False, weights.tensors)(x)
        fused = build_model(deploy.spec, True, deploy.tensors)(x)
    assert torch.equal(multi.argmax(1), fused.argmax(1))
    top1 = (fused.argmax(1) == labels).float().mean().item()
    assert top1 >= 0.99  # the card says 99.72 % (359 / 360)
    assert (fused - multi).abs().max() <= 1e-5 * multi.abs().max()
