"""Adaptive rounding of INT8 weights: each layer's integers (and bias) chosen to reproduce its FP32
outputs on the calibration images, not each weight rounded to nearest on its own.

Layer by layer in graph order, with the layers before it already rounded (so each corrects what
reaches it from upstream): the layer's input is captured from the INT8 graph, run stepwise (one
pass for all layers, :mod:`rvdeploy.precision.stepwise`), unfolded into kernel windows at a random
sample of output positions (a Gemm's rows as they are), and paired with the FP32 graph's outputs of
that layer at the same positions, captured for every layer in one FP32 pass. The fit (least squares toward FP32, then GPTQ's error-feedback
rounding onto the layer's own grid, regularization chosen by cross-validation) is
:mod:`rvdeploy.precision.gptq`. Each layer keeps adaptive rounding only where it beats nearest
rounding on images it was not fitted on.

The grid does not change: symmetric int8 with zero point 0, the per-output-channel scales the
quantizer chose, which TensorRT's explicit quantization and ONNX Runtime's kernels read (a layer
stored as uint8 with zero point 128 for AVX2 CPUs keeps that form).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from rvdeploy.compare import json_safe
from rvdeploy.graph_edit import prefix_model
from rvdeploy.onnx_io import ort_session, run_session
from rvdeploy.precision.gptq import Grams, channels_last, fit_layer, kernel_windows, output_positions, unfold, window_order
from rvdeploy.precision.stepwise import StepwiseRun
from rvdeploy.progress import progress_bar

ROWS_PER_COLUMN = 16  # sampled rows per weight column of a layer (K + 1 columns), at most...
MIN_ROWS = 4096  # ... and at least this many (or every output position, if fewer)
MAX_SAMPLE_BYTES = 2**28  # the FP32 outputs kept per layer until it is fitted, at most
CHUNK_BYTES = 2**23  # unfolded rows made at once, at most


@dataclass(frozen=True)
class LayerRounding:
    node: str
    nearest_sqnr_db: float  # the layer's outputs against FP32 on the sampled rows of the odd images, rounded to nearest...
    adaptive_sqnr_db: float  # ... and adaptively, fitted on the even images' rows
    damping: float  # the regularization chosen (× the mean of diag XqᵀXq)
    kept: bool  # adaptive rounding used (it scored higher)
    bias_only: bool = False  # of it, only the bias refitted: the integers are nearest rounding's


@dataclass
class Rounding:
    """Adaptive rounding's result: per layer, the integers and bias it chose (for the layers it kept)
    and what it measured."""

    layers: list[LayerRounding] = field(default_factory=list)
    sqnr_before_db: float | None = None  # the graph's output SQNR against FP32 on the calibration images, nearest...
    sqnr_after_db: float | None = None  # ... and adaptive
    kept: bool = False  # adaptive rounding written (its output SQNR is the higher)
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # node → int8 weights
    biases: dict[str, np.ndarray] = field(default_factory=dict)  # node → float bias (where the layout lets it change)
    # the layers whose bias was chosen on held-out rows (refitted, or kept as it was): bias correction leaves them alone
    bias_chosen: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return json_safe({"sqnr_before_db": self.sqnr_before_db, "sqnr_after_db": self.sqnr_after_db, "kept": self.kept,
                          "layers": [asdict(layer) for layer in self.layers]})

    def apply(self, quantized: onnx.ModelProto, fallback: tuple[str, ...] = ()) -> onnx.ModelProto:
        """A copy of ``quantized`` (a Q/DQ graph of the same FP32 graph, the ``fallback`` layers out of
        INT8) with the chosen integers and biases written into its INT8 layers that come before every
        fallback layer in graph order. A layer after one was fitted to errors from upstream that the
        fallback removed: it is left rounded to nearest."""
        model = _copy(quantized)
        layers = _int8_layers(model)
        writer = _Writer(model)
        for node in model.graph.node:
            if node.name in fallback:
                break
            if node.name in layers and node.name in self.weights:
                writer.weights(layers[node.name], self.weights[node.name])
                if node.name in self.biases:
                    writer.bias(layers[node.name], self.biases[node.name])
        return model


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@dataclass(frozen=True)
class _Layer:
    node: onnx.NodeProto
    weight_dq: onnx.NodeProto  # DequantizeLinear of its int8 (or uint8, zero point 128) weights


def _int8_layers(model: onnx.ModelProto) -> dict[str, _Layer]:
    """The Conv (2-D) and Gemm (weights transposed, input not) layers whose weights are per-output-channel
    integers dequantized from initializers of their own: what adaptive rounding can round."""
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {init.name for init in model.graph.initializer}
    readers = _readers(model)
    layers = {}
    for node in model.graph.node:
        attrs = _attributes(node)
        if not node.name:  # layers are matched to the FP32 graph's by name
            continue
        if node.op_type == "Conv":
            usable = attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", b"VALID") and len(attrs.get("kernel_shape", [0, 0])) == 2
        elif node.op_type == "Gemm":  # weights (out, in), as exporters write them
            usable = not attrs.get("transA", 0) and attrs.get("transB", 0)
        else:
            continue
        dq = producers.get(node.input[1]) if len(node.input) > 1 else None
        if (not usable or dq is None or dq.op_type != "DequantizeLinear" or not set(dq.input[:3]) <= initializers
                or readers[dq.output[0]] > 1 or readers[dq.input[0]] > 1):  # a shared weight stays as it is
            continue
        if next((a.i for a in dq.attribute if a.name == "axis"), 1) == 0 and len(dq.input) == 3:
            layers[node.name] = _Layer(node, dq)
    return layers


def _readers(model: onnx.ModelProto) -> dict[str, int]:
    """How many node inputs read each tensor."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            counts[name] = counts.get(name, 0) + 1
    return counts


class _Writer:
    """Writes a layer's weights (in its DequantizeLinear's encoding) and float or int32 bias into a protobuf."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.initializers = {init.name: init for init in model.graph.initializer}
        self.producers = {out: node for node in model.graph.node for out in node.output}
        self.readers = _readers(model)

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    def _set(self, name: str, values: np.ndarray) -> None:
        self.initializers[name].CopyFrom(numpy_helper.from_array(values, name))

    def weights(self, layer: _Layer, integers: np.ndarray) -> None:
        stored = self.array(layer.weight_dq.input[0])
        shift = 128 if stored.dtype == np.uint8 else 0  # encode_weights' uint8 form: q + 128
        self._set(layer.weight_dq.input[0], (integers.astype(np.int16).reshape(stored.shape) + shift).astype(stored.dtype))

    def bias(self, layer: _Layer, bias: np.ndarray) -> None:
        node = layer.node
        name = node.input[2] if len(node.input) > 2 else ""
        dq = self.producers.get(name)
        if dq is not None and dq.op_type == "DequantizeLinear":  # the onnxruntime layout: int32 at its scale
            scale = self.array(dq.input[1]).astype(np.float64).reshape(-1)
            info = np.iinfo(np.int32)
            integers = np.clip(np.round(bias / scale), info.min, info.max).astype(np.int32)
            self._own(dq, 0, f"{node.name}/rounded_bias_quantized", integers)
            return
        self._own(node, 2, f"{node.name}/rounded_bias", bias.astype(np.float32))

    def _own(self, node: onnx.NodeProto, index: int, new_name: str, values: np.ndarray) -> None:
        """``values`` as ``node``'s input ``index``: into its initializer where only ``node`` reads it,
        else (shared, or absent) into a new one."""
        name = node.input[index] if len(node.input) > index else ""
        if name in self.initializers and self.readers.get(name) == 1:
            self._set(name, values.reshape(self.array(name).shape))
            return
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = new_name
        self.model.graph.initializer.append(numpy_helper.from_array(values, new_name))
        self.initializers[new_name] = self.model.graph.initializer[-1]
        self.readers[new_name] = 1


def _layer_weights(node: onnx.NodeProto | None, initializers: dict[str, onnx.TensorProto]) -> tuple[np.ndarray, np.ndarray] | None:
    """The FP32 graph's weights (out, ...) and bias of ``node``, when they are ``initializers`` (and a
    Gemm scales neither)."""
    has_bias = len(node.input) > 2 and bool(node.input[2]) if node is not None else False
    if node is None or node.input[1] not in initializers or (has_bias and node.input[2] not in initializers):
        return None
    attrs = _attributes(node)
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    weights = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)  # (out, ...): a Gemm's transB=1
    if node.op_type == "Conv" and weights.ndim != 4:  # 2-D convolutions only
        return None
    bias = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64).reshape(-1) if has_bias else np.zeros(len(weights))
    return (weights, bias) if bias.size == len(weights) else None


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied


@dataclass
class _Samples:
    """A layer's sampled FP32 outputs, batch by batch: the output positions (Conv: image, y, x within
    the batch; Gemm: None, every row) and the outputs there (rows, groups, out/groups)."""

    positions: list[tuple[np.ndarray, ...] | None] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)


def _fp32_samples(fp32: onnx.ModelProto, layers: dict[str, tuple[onnx.NodeProto, tuple[int, ...]]], feeds: list[dict],
                  what: str, rng: np.random.Generator) -> dict[str, _Samples]:
    """Every layer's FP32 outputs at its sampled positions, from one pass of the FP32 graph."""
    outputs = [node.output[0] for node, _ in layers.values()]
    session = ort_session(prefix_model(fp32, outputs).SerializeToString(), name=f"the rounding probe of {what}")
    samples = {name: _Samples() for name in layers}
    for feed in feeds:
        values = run_session(session, feed, what, outputs)
        for (name, (node, shape)), y in zip(layers.items(), values):
            groups = _attributes(node).get("group", 1)
            if node.op_type == "Conv":
                rows = min(max(MIN_ROWS, ROWS_PER_COLUMN * (int(np.prod(shape[1:])) + 1)),
                           MAX_SAMPLE_BYTES // (4 * shape[0])) // len(feeds) + 1
                positions = output_positions(y.shape[0], y.shape[2], y.shape[3], rows, rng)
                y = y[positions[0], :, positions[1], positions[2]]
            else:
                positions = None
            samples[name].positions.append(positions)
            samples[name].outputs.append(np.ascontiguousarray(y.reshape(len(y), groups, -1), np.float32))
    return samples


def _folds(inputs: list[np.ndarray], layer: _Layer, shape: tuple[int, ...], samples: _Samples,
           pool: ThreadPoolExecutor) -> tuple[Grams, Grams]:
    """The Gram matrices of ``layer``'s INT8 ``inputs`` (one array per batch, as far as the graph is
    rounded) against its FP32 outputs at the sampled positions, on the even images (to fit on) and on
    the odd ones (to score on).

    The rows are unfolded a chunk of at most :data:`CHUNK_BYTES` at a time, and the chunks shared out
    between ``pool``'s two threads: BLAS runs on one thread in the quantizer
    (:func:`rvdeploy.probes.one_thread`), and no other work runs meanwhile. A small chunk is also
    memory the allocator reuses: a depthwise 7x7 layer's rows unfolded at once were 120 MB of fresh pages."""
    attrs, chunks, first = _attributes(layer.node), [], 0
    groups = attrs.get("group", 1)
    columns = int(np.prod(shape[1:])) * groups  # of a row
    conv = layer.node.op_type == "Conv"
    sampled = sum(len(y) for y in samples.outputs)
    last = conv and channels_last((sum(len(x) for x in inputs), *inputs[0].shape[1:]), shape[2:], groups, sampled)
    for xq, positions, y in zip(inputs, samples.positions, samples.outputs):
        xq = np.asarray(xq, np.float32)
        image = np.arange(len(xq)) if positions is None else positions[0]
        windows = kernel_windows(xq, attrs, shape[2:], last) if conv else None
        # two chunks at least (one a thread), more where they are large, but no fewer rows each than the layer
        # has columns: each chunk's Gram matrices are converted and summed, the work of that many rows' products
        count = max(2, min(-(-len(y) * columns * 4 // CHUNK_BYTES), len(y) // (columns + 1)))
        for part in np.array_split(np.arange(len(y)), count):
            if not part.size:
                continue
            picked = None if positions is None else tuple(axis[part] for axis in positions)
            chunks.append((xq[part] if positions is None else windows, picked, y[part], (first + image[part]) % 2))
        first += len(xq)

    def summed(share: list) -> list[Grams | None]:
        folds: list[Grams | None] = [None, None]
        for xq, positions, y, parity in share:  # xq: a Gemm's rows, or a Conv input's kernel windows
            rows = xq.reshape(len(xq), 1, -1) if positions is None else unfold(xq, attrs, positions)
            for fold in (0, 1):
                part = Grams.of(rows[parity == fold], y[parity == fold])
                folds[fold] = part if folds[fold] is None else folds[fold].add(part)
        return folds

    shares = list(pool.map(summed, [chunks[0::2], chunks[1::2]]))
    folds = [shares[0][fold] if shares[1][fold] is None else shares[0][fold].add(shares[1][fold]) for fold in (0, 1)]
    if last:
        order = window_order(shape[2:], shape[1], last)
        folds = [grams.reordered(order) for grams in folds]
    return folds[0], folds[1]


def adaptive_rounding(fp32: onnx.ModelProto, quantized: onnx.ModelProto, feeds: list[dict], target: str,
                      what: str = "the graph", show_progress: bool = True, seed: int = 0) -> tuple[onnx.ModelProto, Rounding]:
    """``quantized`` (a Q/DQ graph of ``fp32`` for ``target``) with its INT8 layers' weights and biases
    chosen by adaptive rounding on ``feeds``, layer by layer in graph order; and what it chose and measured."""
    writer = _Writer(_copy(quantized))
    fp32_nodes = {node.name: node for node in fp32.graph.node}
    fp32_initializers = {init.name: init for init in fp32.graph.initializer}
    candidates = _int8_layers(writer.model)
    weights = {name: found for name in candidates if (found := _layer_weights(fp32_nodes.get(name), fp32_initializers)) is not None}
    layers = {name: layer for name, layer in candidates.items() if name in weights}
    rounding = Rounding()
    with progress_bar(show_progress) as progress, ThreadPoolExecutor(2) as pool:
        task = progress.add_task("adaptive rounding", total=len(layers) + 1)
        samples = _fp32_samples(fp32, {name: (fp32_nodes[name], weights[name][0].shape) for name in layers}, feeds, what,
                                np.random.default_rng(seed))
        progress.advance(task)
        # each layer's input as the graph rounded up to it computes it: one stepwise pass for every layer
        captured = StepwiseRun(writer.model, [layer.node.input[0] for layer in layers.values()], feeds,
                               f"the rounding pass of {what}")
        for name, layer in layers.items():
            w, b = weights[name]
            groups = _attributes(layer.node).get("group", 1)
            shape = (groups, len(w) // groups)
            reference = np.concatenate([w.reshape(*shape, -1), b.reshape(*shape, 1)], axis=2)
            scale = writer.array(layer.weight_dq.input[1]).astype(np.float64).reshape(shape)
            stored = writer.array(layer.weight_dq.input[0])
            integers = stored.astype(np.int16) - (128 if stored.dtype == np.uint8 else 0)
            nearest = np.concatenate([integers.reshape(*shape, -1) * scale[..., None], reference[:, :, -1:]], axis=2)
            folds = _folds(captured.values(writer.model, layer.node.input[0]), layer, w.shape, samples.pop(name), pool)
            # an absent bias stays absent where the layout's bias is int32 at a scale of its own (onnxruntime's)
            with_bias = target == "tensorrt" or (len(layer.node.input) > 2 and bool(layer.node.input[2]))
            result = fit_layer(reference, nearest, scale, folds, with_bias)
            rounding.layers.append(LayerRounding(name, result.nearest_sqnr_db, result.adaptive_sqnr_db, result.damping,
                                                 result.chosen is not None, result.bias_only))
            if result.bias_chosen:
                rounding.bias_chosen.append(name)
            if result.chosen is not None:
                rounding.weights[name] = np.round(result.chosen[:, :, :-1] / scale[..., None]).reshape(stored.shape).astype(np.int8)
                writer.weights(layer, rounding.weights[name])
                if with_bias:
                    rounding.biases[name] = result.chosen[:, :, -1].reshape(-1)
                    writer.bias(layer, rounding.biases[name])
            progress.advance(task)
    return writer.model, rounding
