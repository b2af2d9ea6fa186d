"""Top-1 / top-5 accuracy of any runner on an image folder laid out one sub-folder per class."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from rvdeploy.compare import Comparison, compare_outputs
from rvdeploy.data import DataError, ImageSet, batches, pad_batch
from rvdeploy.preprocess import Preprocess
from rvdeploy.progress import progress_bar
from rvdeploy.runners import Runner

TOP5_MIN_CLASSES = 10  # top-5 says little with fewer classes


@dataclass(frozen=True)
class Accuracy:
    model: str
    backend: str
    precision: str
    images: int
    top1: float  # percent
    top5: float | None
    skipped: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def predictions(runner: Runner, images: ImageSet, recipe: Preprocess, batch_size: int = 64,
                show_progress: bool = False) -> tuple[np.ndarray, list[int]]:
    """Logits for every image that decoded, and the indices of those images in ``images``."""
    size = runner.fixed_batch or batch_size
    logits, kept = [], []
    with progress_bar(show_progress) as progress:
        task = progress.add_task(f"evaluating {runner.name}", total=len(images))
        for pixels, indices in batches(images, recipe, size):
            real = len(pixels)
            logits.append(runner.infer(pad_batch(pixels, size) if runner.fixed_batch else pixels)[:real])
            kept += indices
            progress.advance(task, real)
    return np.concatenate(logits), kept


@dataclass(frozen=True)
class Evaluation:
    """An accuracy and the logits it came from, for comparing models image by image."""

    accuracy: Accuracy
    logits: np.ndarray
    indices: tuple[int, ...]  # of the images in the image set, one per logits row

    def agreement(self, reference: Evaluation) -> Comparison:
        """These logits against ``reference``'s on the images both decoded: top-1 agreement, SQNR, error."""
        common = sorted(set(self.indices) & set(reference.indices))
        mine = {i: row for i, row in zip(self.indices, self.logits)}
        theirs = {i: row for i, row in zip(reference.indices, reference.logits)}
        if not common or self.logits.shape[1:] != reference.logits.shape[1:]:
            raise DataError(f"{self.accuracy.model} and {reference.accuracy.model} share no comparable outputs")
        return compare_outputs(np.stack([mine[i] for i in common]), np.stack([theirs[i] for i in common]))


def evaluate(runner: Runner, images: ImageSet, recipe: Preprocess | None = None, batch_size: int = 64,
             show_progress: bool = False) -> Accuracy:
    """Accuracy of ``runner`` on labelled ``images`` with the model's recipe (or ``recipe``)."""
    return run_evaluation(runner, images, recipe, batch_size, show_progress).accuracy


def require_classifier(runner: Runner) -> None:
    """Refuse a model with no (batch, classes) logits output, a backbone's feature maps say: no top-1 to take."""
    if not runner.is_classifier:
        outputs = ", ".join(runner.output_names)
        raise DataError(f"{runner.name} has no classifier output ([N, C] logits; it gives {outputs}): eval needs one")


def run_evaluation(runner: Runner, images: ImageSet, recipe: Preprocess | None = None, batch_size: int = 64,
                   show_progress: bool = False) -> Evaluation:
    """:func:`evaluate`, keeping the logits."""
    recipe = recipe or runner.preprocess
    if recipe is None:
        raise DataError(f"{runner.name} carries no preprocessing recipe: give --mean, --std and --input-size")
    require_classifier(runner)
    if runner.num_classes is not None and len(images.classes) != runner.num_classes:
        raise DataError(
            f"the data has {len(images.classes)} class folders, {runner.name} has {runner.num_classes} classes"
        )
    start = time.perf_counter()
    logits, kept = predictions(runner, images, recipe, batch_size, show_progress)
    labels = np.asarray([images.labels[i] for i in kept])
    ranked = np.argsort(-logits, axis=1)
    top1 = float((ranked[:, 0] == labels).mean() * 100)
    top5 = float((ranked[:, :5] == labels[:, None]).any(axis=1).mean() * 100) if logits.shape[1] >= TOP5_MIN_CLASSES else None
    accuracy = Accuracy(
        model=runner.name,
        backend=runner.backend,
        precision=runner.precision,
        images=len(kept),
        top1=top1,
        top5=top5,
        skipped=len(images.skipped),
        seconds=time.perf_counter() - start,
    )
    return Evaluation(accuracy, logits, tuple(kept))
