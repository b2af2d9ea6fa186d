"""ONNX files in and out: loading with validation and one-line errors, atomic deterministic saves,
the IR version, rvdeploy's metadata, and ONNX Runtime sessions.

Every stage that reads a graph reads it here, so a truncated file, a file that is not ONNX or a
well-formed file whose graph is invalid (a node reading a tensor nothing produces) is refused at
the door with a message naming the file, instead of failing deep inside a later library.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, EncodeError

from rvdeploy.errors import OnnxError, OutputError, first_line
from rvdeploy.files import atomic_output, check_output_path

METADATA_PREFIX = "rvdeploy."
# ONNX Runtime's FATAL log level: it logs errors on stderr on its own, besides raising them.
ORT_QUIET = 4
_PROTO_LIMIT = 2**31 - 1  # protobuf's limit: larger models keep their weights as external data
_STRUCTURE_MARGIN = 2**26  # room for the nodes, names and metadata beside the weights


def existing_file(path: str | os.PathLike) -> Path:
    """``path`` when it is a file to read; :class:`OnnxError` saying what it is otherwise."""
    path = Path(path)
    if not path.is_file():
        raise OnnxError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    return path


def load_onnx(path: str | os.PathLike, load_weights: bool = True) -> onnx.ModelProto:
    """The graph at ``path``, checked by ``onnx.checker``; :class:`OnnxError` when it is not a valid one."""
    path = existing_file(path)
    # The checker reads the file itself, beside the load (it leaves the GIL): from the path, since
    # re-serializing the loaded model would cost more, and a model over 2 GB has no single protobuf.
    with ThreadPoolExecutor(1) as pool:
        checked = pool.submit(onnx.checker.check_model, str(path))
        try:
            model = onnx.load(str(path), load_external_data=load_weights)
        except onnx.checker.ValidationError as exc:  # onnx.load's error for an external-data file it cannot read
            raise OnnxError(f"{path}: its external data cannot be read ({first_line(exc)})") from None
        except (DecodeError, ValueError, RuntimeError, OSError, UnicodeDecodeError) as exc:
            raise OnnxError(f"{path} is not an ONNX model ({first_line(exc)})") from None
        refuse_unusable(model, path, checked.result)
    return model


def refuse_unusable(model: onnx.ModelProto, path: Path, check) -> None:
    """:class:`OnnxError` naming ``path`` when the parsed ``model`` has no nodes, inputs or outputs,
    a string that is not text, fails ``check()`` (onnx's checker) or has mistyped rvdeploy metadata."""
    if not model.graph.node:
        raise OnnxError(f"{path} is not an ONNX model (no graph nodes)")
    if not model.graph.input or not model.graph.output:
        raise OnnxError(f"{path} is not a usable ONNX model (its graph has no inputs or no outputs)")
    not_text = _first_non_text(model)
    if not_text:
        raise OnnxError(f"{path} is not a valid ONNX graph: {not_text} is not UTF-8 text")
    try:
        check()
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        raise OnnxError(f"{path} is not a valid ONNX graph: {first_line(exc)}") from None
    check_metadata(read_metadata(model), path)


def _first_non_text(message) -> str | None:
    """The first string field (recursively) that is not UTF-8 text, or None.

    ONNX strings are UTF-8, but protobuf does not check that for ONNX's proto2 fields: it hands
    such a field over as bytes, and the checker passes it. Every later name or metadata lookup
    would then fail on it.
    """
    if isinstance(message, onnx.TensorProto):  # its data fields are bytes by design (and large); only the name is text
        return f"tensor name {message.name!r}" if isinstance(message.name, bytes) else None
    for field, value in message.ListFields():
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        values = value if repeated else (value,)
        if field.type == field.TYPE_MESSAGE:
            for item in values:
                found = _first_non_text(item)
                if found:
                    return found
        elif field.type == field.TYPE_STRING:
            for item in values:
                if isinstance(item, bytes):
                    return f"{message.DESCRIPTOR.name}.{field.name} {item[:40]!r}"
    return None


def runtime_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs fed at run time: an old IR version also lists every initializer among the inputs."""
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def with_min_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """Set the lowest IR version that carries the model's opsets: every runtime that knows them reads it."""
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    return model


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, full_check: bool = False) -> Path:
    """Check ``model`` and write it atomically, byte-deterministically; an existing file is replaced
    only by a complete graph. Over protobuf's 2 GB the weights go to ``OUT.data`` beside it."""
    path = Path(path)
    data = checked_bytes(model, full_check)
    if data is None:
        return _save_with_external_data(model, path, full_check)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return path


def checked_bytes(model: onnx.ModelProto, full_check: bool = False) -> bytes | None:
    """``model``'s deterministic serialization, checked (the bytes a save writes); None when it is
    too large for one protobuf (its weights must go to external data)."""
    if not fits_one_protobuf(model):
        return None
    data = model.SerializeToString(deterministic=True)
    onnx.checker.check_model(data, full_check=full_check)  # the bytes written: one serialization, not two
    return data


LIGHT_COPY_ELEMENTS = 4096  # initializers up to this many elements are copied: shape tensors are small


def _large_float(t: onnx.TensorProto) -> bool:
    return math.prod(t.dims) > LIGHT_COPY_ELEMENTS and t.data_type == onnx.TensorProto.FLOAT


def light_copy(model: onnx.ModelProto, large=_large_float) -> onnx.ModelProto:
    """``model`` with its large float initializers (those ``large`` picks) declared as graph inputs
    of their type and shape instead of copied: what shape inference and the checker need of a graph
    of gigabytes, at the cost of its nodes; and, fed those weights, what ONNX Runtime runs without
    copying them."""
    graph = model.graph
    inputs = {i.name for i in graph.input}  # an old IR lists its initializers as inputs too
    declared = [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                for t in graph.initializer if large(t) and t.name not in inputs]
    light = onnx.helper.make_graph(list(graph.node), graph.name, list(graph.input) + declared, list(graph.output),
                                   [t for t in graph.initializer if not large(t)], value_info=list(graph.value_info))
    copy = onnx.helper.make_model(light, opset_imports=model.opset_import, ir_version=model.ir_version)
    copy.functions.extend(model.functions)
    copy.metadata_props.extend(model.metadata_props)
    return copy


def fits_one_protobuf(model: onnx.ModelProto) -> bool:
    """Whether ``model`` fits one protobuf, from its initializers' shapes (``ByteSize`` takes as
    long as a serialization)."""
    weight_bytes = sum(math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                       for t in model.graph.initializer if t.data_type != onnx.TensorProto.STRING)
    return weight_bytes <= _PROTO_LIMIT - _STRUCTURE_MARGIN


def _save_with_external_data(model: onnx.ModelProto, path: Path, full_check: bool) -> Path:
    """``path`` plus its weights in ``path.name + '.data'``, both staged under temporary names and
    checked there (the checker cannot hold such a model in one protobuf) before they replace anything."""
    check_output_path(path)
    data_name = path.name + ".data"
    staged_model = onnx.ModelProto()
    staged_model.CopyFrom(model)  # saving with external data moves the tensors out of the model it is given
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        try:
            onnx.save_model(staged_model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            onnx.checker.check_model(str(staged), full_check=full_check)
            os.replace(Path(tmp) / data_name, path.parent / data_name)
            os.replace(staged, path)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


# -- metadata --------------------------------------------------------------------------------
def decode_metadata(props: dict[str, str]) -> dict:
    """The rvdeploy entries of a graph's metadata (key → value strings), JSON values decoded."""
    data = {}
    for key, value in props.items():
        if key.startswith(METADATA_PREFIX):
            try:
                data[key[len(METADATA_PREFIX):]] = json.loads(value)
            except json.JSONDecodeError:
                data[key[len(METADATA_PREFIX):]] = value
    return data


# The rvdeploy metadata entries later stages rely on, and the JSON type each must have.
_METADATA_TYPES = {"arch": str, "form": str, "precision": str, "int8_target": str, "int8_cpu": str, "io_precision": str,
                   "num_classes": int, "input_size": list, "fp32_nodes": list, "arch_spec": dict, "preprocess": dict}
_JSON_TYPE_NAMES = {str: "string", int: "integer", list: "array", dict: "object"}


def check_metadata(meta: dict, where: str | os.PathLike) -> dict:
    """``meta`` when each entry rvdeploy relies on has its JSON type; :class:`OnnxError` naming the first that does not."""
    for key, kind in _METADATA_TYPES.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, kind) or isinstance(value, bool)):
            raise OnnxError(f"{where}: its metadata {METADATA_PREFIX}{key} is {json.dumps(value)[:40]}, "
                            f"not a JSON {_JSON_TYPE_NAMES[kind]}")
    return meta


def read_metadata(model: onnx.ModelProto) -> dict:
    """The rvdeploy metadata of a graph, JSON values decoded; empty when it has none."""
    return decode_metadata({p.key: p.value for p in model.metadata_props})


def write_metadata(model: onnx.ModelProto, updates: dict) -> None:
    """Set (or replace) rvdeploy metadata entries of ``model``, keeping every other entry."""
    props = {p.key: p.value for p in model.metadata_props}
    props.update({METADATA_PREFIX + k: json.dumps(v, sort_keys=True) for k, v in updates.items()})
    onnx.helper.set_model_props(model, props)


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The graph's batch size when it is fixed, None when the batch dimension is dynamic."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None


# -- ONNX Runtime ----------------------------------------------------------------------------
def ort_session(model: str | os.PathLike | bytes, device: str = "cpu", threads: int | None = None,
                name: str | None = None, spinning: bool = True, optimize: bool = True):
    """An ONNX Runtime session on ``device``; :class:`OnnxError` naming the graph when ORT refuses it.

    Idle worker threads keep ONNX Runtime's default (they spin), as in deployment: ``bench`` times the
    model and the reference workload in blocks, not call by call, so they do not steal cores from each
    other (turning spinning off doubled the gate model's p50 at batch 4). ``spinning=False`` is for
    sessions timed call by call in turn, whose spinning pools would steal each other's cores.
    ``optimize=False`` runs the graph as written (no fusions, no layout changes): what a proof
    that compares two graphs wants, and 3x faster to start on a large graph.
    """
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise OnnxError("--device cuda: this onnxruntime has no CUDA provider (install the gpu extra)")
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = ORT_QUIET  # its errors reach the user as rvdeploy's one line (OnnxError)
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    in_memory = isinstance(model, bytes)
    try:
        return ort.InferenceSession(model if in_memory else str(model), options, providers=providers)
    except Exception as exc:  # onnxruntime's own exception types: a graph it cannot load
        what = name or ("the in-memory graph" if in_memory else model)
        raise OnnxError(f"ONNX Runtime cannot load {what}: {first_line(exc)}") from None


def ort_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's own exception types: what it raises on a graph it loaded but cannot run."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (state.Fail, state.InvalidArgument, state.InvalidGraph, state.RuntimeException, state.EPFail,
            state.NotImplemented)


def run_session(session, feed: dict, what: str | os.PathLike, output_names: list[str] | None = None) -> list:
    """``session.run``; :class:`OnnxError` naming the graph when ONNX Runtime fails on it (a graph that
    loads can still be one it cannot run, e.g. a Conv whose attributes contradict its shapes)."""
    try:
        return session.run(output_names, feed)
    except ort_errors() as exc:
        raise OnnxError(f"ONNX Runtime cannot run {what}: {first_line(exc)}") from None


def run_with_values(model: onnx.ModelProto, feeds: dict, extra_outputs: list[str], what: str,
                    threads: int | None = None, weights: dict | None = None) -> dict:
    """ONNX Runtime's values (the graph as written, no fusions) of the feeds, the graph outputs and
    ``extra_outputs`` (intermediate tensors, added as outputs for this run only), by name: what a
    proof captures. ``threads``: ONNX Runtime's intra-op threads (default: its own). ``weights``:
    the model's weights held apart (:mod:`rvdeploy.onnx_weights`), fed to its :func:`light_copy`
    as inputs, which ONNX Runtime reads where they are."""
    present = {o.name for o in model.graph.output} | set(feeds)
    added = [name for name in extra_outputs if name not in present]
    names = [o.name for o in model.graph.output] + added
    if weights is not None:
        light = light_copy(model, lambda t: t.name in weights)
        light.graph.output.extend(onnx.ValueInfoProto(name=name) for name in added)
        session = ort_session(light.SerializeToString(), name=what, optimize=False, threads=threads)
        fed = {**feeds, **{value.name: weights[value.name] for value in light.graph.input if value.name in weights}}
        return {**feeds, **dict(zip(names, run_session(session, fed, what, names)))}
    count = len(model.graph.output)
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in added)
    try:
        return {**feeds, **dict(zip(names, _run_serialized(model, feeds, what, names, threads)))}
    finally:
        del model.graph.output[count:]


def _run_serialized(model: onnx.ModelProto, feeds: dict, what: str, names: list[str], threads: int | None) -> list:
    """``model`` run without fusions from its serialization, or from a temporary file over 2 GB."""
    try:
        serialized = model.SerializeToString()
    except (ValueError, EncodeError):  # over protobuf's 2 GB
        serialized = None
    if serialized is not None:
        return run_session(ort_session(serialized, name=what, optimize=False, threads=threads), feeds, what, names)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_onnx(model, Path(tmp) / "model.onnx")  # its weights in model.onnx.data beside it
        return run_session(ort_session(path, name=what, optimize=False, threads=threads), feeds, what, names)


def precision_label(meta: dict, with_target: bool = True) -> str:
    """``fp32``, ``fp16``, ``int8/tensorrt``..., with the count of nodes left in FP32 by a mixed graph."""
    label = meta.get("precision", "fp32")
    if with_target and "int8_target" in meta:
        label += f"/{meta['int8_target']}" + (f"/{meta['int8_cpu']}" if "int8_cpu" in meta else "")
    if meta.get("fp32_nodes") and label != "fp32":
        label += f" ({len(meta['fp32_nodes'])} nodes fp32)"
    return label
