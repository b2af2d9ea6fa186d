"""The ``quantize --fp16`` stage: an FP32 ONNX graph file in, its strongly typed FP16 graph file out
(:mod:`rvdeploy.precision.fp16` plans and converts it), with its output SQNR measured and, by default,
held to a label-free floor."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx

from rvdeploy.data import image_folder
from rvdeploy.errors import QuantizeError
from rvdeploy.files import check_output_path, sha256_file
from rvdeploy.onnx_io import read_metadata
from rvdeploy.precision.calib import activation_stats, model_feeds
from rvdeploy.precision.choices import DEFAULT_FP16_MIN_SQNR_DB
from rvdeploy.precision.fp16 import Fp16Report, fp16_node_names, plan_fp16
from rvdeploy.precision.guard import check_min_sqnr
from rvdeploy.precision.quantize import ImageOptions, load_fp32_graph, model_recipe, write_typed
from rvdeploy.precision.sensitivity import OutputProbe
from rvdeploy.progress import progress_bar

FP16_PROBES = 8
# The FP16 graph's output SQNR is judged on the first of the observed inputs (ranges are checked on all):
# each floor candidate is a pass over them (RT-DETR-L, 160 px: 64 images 184 s for 8 candidates).
FP16_JUDGED = 16


@dataclass(frozen=True)
class Fp16Options(ImageOptions):
    io_fp16: bool = False  # FP16 graph input and output too
    probe_size: tuple[int, int] | None = None  # (H, W) of the random probes without calib_dir, for a graph whose own is dynamic
    # label-free floor: output SQNR (dB) against FP32 on the observed inputs; 0 or None: off
    min_sqnr: float | None = DEFAULT_FP16_MIN_SQNR_DB
    show_progress: bool = True

    def __post_init__(self) -> None:
        check_min_sqnr(self.min_sqnr)


def _probe_shape(model: onnx.ModelProto, path: str | os.PathLike, options: Fp16Options) -> tuple[int | None, ...]:
    """(N, C, H, W) of the graph's input for the random probes (N None where the batch is dynamic); where
    H, W are dynamic, the size given (``probe_size``, the recipe's) or the one in the graph's metadata."""
    dims = [d.dim_value if d.HasField("dim_value") else None for d in model.graph.input[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise QuantizeError(f"{path}: its input {model.graph.input[0].name} has {len(dims)} dimensions, not N, C, H, W")
    size = dims[2:]
    if None in size:
        size = options.probe_size or (options.recipe.input_size if options.recipe else read_metadata(model).get("input_size"))
    if size is None:
        raise QuantizeError(f"{path} has a dynamic input size ({dims[2] or '?'}x{dims[3] or '?'}): give --input-size "
                            "for the FP16 range probes, or --calib")
    return dims[0], dims[1] or 3, *size


def random_probes(shape: tuple[int | None, ...], count: int) -> tuple[np.ndarray, np.ndarray]:
    """Two kinds of ``count`` inputs of ``shape`` (N, C, H, W; N is ``count``): standard-normal, and smooth
    fields in [0, 1] as images are before normalization. Judged apart: their DC is what a stem's BN
    subtracts, and it rounds in FP16 as a zero-mean probe does not (RT-DETR-L, random weights: FP16 is
    41 dB from FP32 on normal probes, 19 dB on the smooth ones, 20 dB on images; pooled with the normal
    ones, whose outputs are larger, the smooth ones' noise did not show)."""
    from scipy.ndimage import zoom

    rng = np.random.default_rng(0)
    _, channels, height, width = shape
    normal = rng.standard_normal((count, channels, height, width), dtype=np.float32)
    coarse = rng.random((count, channels, 8, 8), dtype=np.float32)
    smooth = zoom(coarse, (1, 1, height / 8, width / 8), order=1, grid_mode=True, mode="nearest")
    return normal, np.clip(smooth, 0, 1)


def _observation_feeds(model: onnx.ModelProto, path: str | os.PathLike, options: Fp16Options):
    """Inputs on which FP16 is checked, in kinds whose output SQNRs are judged apart: calibration images
    (with the model's recipe), else the two kinds of :func:`random_probes` of the graph's input shape (no
    recipe needed); each a list of feeds in batches the graph takes."""
    name = model.graph.input[0].name
    if options.calib_dir is None:
        shape = _probe_shape(model, path, options)
        batch = shape[0] or FP16_PROBES
        kinds = random_probes(shape, max(FP16_PROBES, batch) // batch * batch)
        groups = [[{name: probes[i:i + batch]} for i in range(0, len(probes), batch)] for probes in kinds]
        return groups, sum(map(len, kinds)), "random probes"
    recipe = model_recipe(model, path, options.recipe)
    images = image_folder(options.calib_dir, recipe, options.num_images, options.allow_upscale)
    return [list(model_feeds(model, images, recipe, batch_size=32))], len(images), "calibration images"


def quantize_fp16(model_path: str | os.PathLike, out_path: str | os.PathLike,
                  options: Fp16Options = Fp16Options()) -> Fp16Report:
    """Write the FP16 graph of ``model_path``: nodes whose values FP16 cannot hold stay FP32, and so
    does a run of nodes in graph order where the output SQNR misses ``options.min_sqnr``."""
    check_output_path(out_path)
    model = load_fp32_graph(model_path)
    groups, observed, observed_on = _observation_feeds(model, model_path, options)
    # measured, not assumed: FP16 is usually 60-80 dB from FP32, but a graph that amplifies rounding is not
    judges = [OutputProbe(model, feeds, None, model_path).first(FP16_JUDGED // len(groups)) for feeds in groups]

    stats = activation_stats(model, [feed for feeds in groups for feed in feeds], model_path)
    with progress_bar(options.show_progress) as bar:  # a dozen candidates where the floor needs a search
        task = bar.add_task("FP16 graphs measured", total=None)

        def sqnr(candidate: onnx.ModelProto) -> float:  # the worse kind's
            serialized = candidate.SerializeToString()
            value = min(judge.sqnr(serialized) for judge in judges)
            bar.advance(task)
            return value

        plan = plan_fp16(model, stats, sqnr, options.min_sqnr, options.io_fp16)
    kept_names = {k.node for k in plan.kept_fp32}
    converted = plan.model
    report = Fp16Report(len(fp16_node_names(converted)), plan.kept_fp32, plan.weights_flushed_to_zero, observed,
                        observed_on, sum(len(judge.reference) for judge in judges), plan.output_sqnr_db, plan.floor)
    write_typed(converted, model, out_path, {
        "precision": "fp16",
        "io_precision": "fp16" if options.io_fp16 else "fp32",
        "fp32_nodes": sorted(kept_names),
        "source_onnx_sha256": sha256_file(model_path),
    })
    return report
