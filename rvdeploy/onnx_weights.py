"""ONNX graphs whose large weights are held apart from the protobuf, in arrays: read from the file
straight into them, fed to ONNX Runtime as inputs, and streamed from them into the written file.

A graph of half a gigabyte loaded by protobuf costs its weights twice while it is parsed, once more
per copy a check or a session makes, and once more per serialization. Held apart, they cost their
size once, and the fold's new weights theirs once (the fold of timm's RepVGG-D2se peaked at 7.8x
its file's size through the protobuf route). The graph itself (nodes, names, small tensors) stays an
ordinary ModelProto, in which each weight held apart is an initializer of its name, shape and type
whose data lies "externally", at :data:`HELD`: no file, the caller's dict of arrays.

What is held apart is what :func:`rvdeploy.onnx_io.light_copy` declares instead of copying (float32
of over ``LIGHT_COPY_ELEMENTS`` elements), so shape inference and the checker run on the graph as
they do on a loaded one.

The reader walks protobuf's wire format, three levels deep (model → graph → initializer), only to
cut the weights' bytes out before protobuf parses the rest: neither onnx nor protobuf can parse a
message without copying its bytes fields. Everything else (the graph, its checks and edits) is the
ordinary ModelProto and onnx-graphsurgeon.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from rvdeploy.errors import OnnxError, first_line
from rvdeploy.files import atomic_output
from rvdeploy.onnx_io import LIGHT_COPY_ELEMENTS, existing_file, fits_one_protobuf, light_copy, refuse_unusable, save_onnx

HELD = "rvdeploy:held-apart"  # an external-data location that names no file: the weight is in an array

# Protobuf field numbers (onnx.proto) and wire types the reader walks.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_DATA_TYPE, _TENSOR_RAW_DATA = 7, 5, 2, 9
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_HELD_BYTES = 4 * LIGHT_COPY_ELEMENTS  # raw float32 data larger than this is held apart


class _Malformed(Exception):
    pass


def _varint(data, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data, start: int, end: int):
    """(field number, wire type, field start, value start, value end) of each field in ``data[start:end]``."""
    pos = start
    while pos < end:
        field_start = pos
        tag, pos = _varint(data, pos, end)
        wire = tag & 7
        if wire == _VARINT:
            value_start = pos
            _, pos = _varint(data, pos, end)
        elif wire in (_FIXED64, _FIXED32):
            value_start, pos = pos, pos + (8 if wire == _FIXED64 else 4)
        elif wire == _LENGTH:
            size, value_start = _varint(data, pos, end)
            pos = value_start + size
        else:  # groups: no ONNX message has one
            raise _Malformed
        if pos > end:
            raise _Malformed
        yield tag >> 3, wire, field_start, value_start, pos


def _encoded_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_field(field: int, payload_size: int) -> bytes:
    """The tag and length that open a length-delimited field of ``payload_size`` bytes."""
    return _encoded_varint(field << 3 | _LENGTH) + _encoded_varint(payload_size)


def _tensor_without_raw_data(data, start: int, end: int) -> tuple[bytes, tuple[int, int]] | None:
    """A TensorProto's bytes without its raw data, and where that data lies (offset, size), when it
    is float32 raw data to hold apart; else None (the tensor is kept as it is)."""
    kept, raw, data_type = [], None, None
    for field, wire, field_start, value_start, value_end in _fields(data, start, end):
        if field == _TENSOR_RAW_DATA and wire == _LENGTH:
            raw = (value_start, value_end - value_start)
            continue
        if field == _TENSOR_DATA_TYPE and wire == _VARINT:
            data_type, _ = _varint(data, value_start, value_end)
        kept.append(data[field_start:value_end])
    if raw is None or data_type != onnx.TensorProto.FLOAT or raw[1] <= _HELD_BYTES:
        return None
    return b"".join(kept), raw


def _structure(data) -> tuple[bytes, list[tuple[int, int, int]]]:
    """The model's bytes with the held-apart raw data cut out, and for each weight cut (initializer
    index in file order, data offset, data size)."""
    cuts: list[tuple[int, int, int]] = []
    model, index = [], 0
    for field, wire, field_start, value_start, value_end in _fields(data, 0, len(data)):
        if field != _MODEL_GRAPH or wire != _LENGTH:
            model.append(data[field_start:value_end])
            continue
        graph = []
        for g_field, g_wire, g_start, g_value, g_end in _fields(data, value_start, value_end):
            initializer = (g_field, g_wire) == (_GRAPH_INITIALIZER, _LENGTH)
            cut = _tensor_without_raw_data(data, g_value, g_end) if initializer else None
            if cut is None:
                graph.append(data[g_start:g_end])
            else:
                tensor, (offset, size) = cut
                graph += [_length_field(_GRAPH_INITIALIZER, len(tensor)), tensor]
                cuts.append((index, offset, size))
            index += initializer
        graph_bytes = b"".join(graph)
        model += [_length_field(_MODEL_GRAPH, len(graph_bytes)), graph_bytes]
    return b"".join(model), cuts


def mark_held(tensor: onnx.TensorProto) -> None:
    """Make ``tensor`` (name, shape and type set, no data) a weight held apart."""
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    tensor.external_data.add(key="location", value=HELD)


def is_held(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == HELD for e in tensor.external_data)


def held_tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    """The initializer that stands for ``array`` held apart."""
    tensor = onnx.TensorProto(name=name, dims=array.shape, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
    mark_held(tensor)
    return tensor


def _hold_external(model: onnx.ModelProto, path: Path, weights: dict[str, np.ndarray]) -> None:
    """Read the model's own external data (onnx's loader checks where it points): the large float32
    tensors into ``weights``, the rest into the graph."""
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        try:
            onnx.external_data_helper.load_external_data_for_tensor(tensor, str(path.parent))
        except (onnx.checker.ValidationError, OSError, ValueError) as exc:
            raise OnnxError(f"{path}: its external data cannot be read ({first_line(exc)})") from None
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
        if tensor.data_type == onnx.TensorProto.FLOAT and math.prod(tensor.dims) > LIGHT_COPY_ELEMENTS:
            array = onnx.numpy_helper.to_array(tensor).copy()
            array.flags.writeable = False
            weights[tensor.name] = array
            tensor.ClearField("raw_data")
            mark_held(tensor)


def read_apart(path: str | os.PathLike) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The graph at ``path`` with its large weights held apart (by name), validated as
    :func:`rvdeploy.onnx_io.load_onnx` validates a graph; :class:`OnnxError` naming the file and
    the problem otherwise. The weights are read from the file into arrays of their own."""
    path = existing_file(path)
    weights: dict[str, np.ndarray] = {}
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise OnnxError(f"{path} is not an ONNX model (the file is empty)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:  # only the structure's pages are read
                structure, cuts = _structure(mapped)
            model = onnx.ModelProto.FromString(structure)
            initializers = model.graph.initializer
            for index, offset, size in cuts:
                tensor = initializers[index]
                count = math.prod(tensor.dims)
                if count * 4 != size:
                    raise OnnxError(f"{path} is not a valid ONNX graph: initializer {tensor.name!r} holds {size} bytes, "
                                    f"its shape {list(tensor.dims)} needs {count * 4}")
                array = np.empty(tensor.dims, "<f4")
                f.seek(offset)
                if f.readinto(array) != size:
                    raise _Malformed
                array.flags.writeable = False  # a weight is read, never written: a fold makes new arrays
                weights[tensor.name] = array
        _hold_external(model, path, weights)  # before the cut tensors are marked: only the file's own
        for index, _, _ in cuts:
            mark_held(initializers[index])
    except (_Malformed, IndexError):
        raise OnnxError(f"{path} is not an ONNX model (its protobuf encoding is broken or truncated)") from None
    except (DecodeError, ValueError, RuntimeError, OSError, UnicodeDecodeError, onnx.checker.ValidationError) as exc:
        raise OnnxError(f"{path} is not an ONNX model ({first_line(exc)})") from None
    refuse_unusable(model, path, lambda: onnx.checker.check_model(light_copy(model)))
    return model, weights


def materialized(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with every weight held apart written into it (what a library that takes a
    whole ModelProto needs)."""
    whole = onnx.ModelProto()
    whole.CopyFrom(model)
    for tensor in whole.graph.initializer:
        if is_held(tensor):
            tensor.CopyFrom(onnx.numpy_helper.from_array(weights[tensor.name], tensor.name))
    return whole


def write_apart(model: onnx.ModelProto, weights: dict[str, np.ndarray], path: str | os.PathLike,
                full_check: bool = False) -> Path:
    """Check ``model`` (on its light copy: the weights were made by their shape) and write it with
    its weights, atomically and byte-deterministically, streamed from the arrays: the graph's fields,
    then its initializers one by one (protobuf reads fields in any order). Over protobuf's 2 GB:
    :func:`rvdeploy.onnx_io.save_onnx`'s external data, from a materialized copy."""
    onnx.checker.check_model(light_copy(model), full_check=full_check)
    if not fits_one_protobuf(model):
        return save_onnx(materialized(model, weights), path, full_check)
    head = onnx.ModelProto()
    head.CopyFrom(model)  # the structure alone: the weights held apart are not in it
    del head.graph.initializer[:]
    graph_bytes = head.graph.SerializeToString(deterministic=True)
    head.ClearField("graph")
    entries = []  # (header bytes, array or None)
    for tensor in model.graph.initializer:
        if not is_held(tensor):
            encoded = tensor.SerializeToString(deterministic=True)
            entries.append((_length_field(_GRAPH_INITIALIZER, len(encoded)) + encoded, None))
            continue
        array = np.ascontiguousarray(weights[tensor.name], "<f4")
        bare = onnx.TensorProto()
        bare.CopyFrom(tensor)
        bare.ClearField("data_location")
        del bare.external_data[:]
        encoded = bare.SerializeToString(deterministic=True) + _length_field(_TENSOR_RAW_DATA, array.nbytes)
        entries.append((_length_field(_GRAPH_INITIALIZER, len(encoded) + array.nbytes) + encoded, array))
    graph_size = len(graph_bytes) + sum(len(h) + (0 if a is None else a.nbytes) for h, a in entries)
    with atomic_output(path) as staged, open(staged, "wb") as f:
        f.write(head.SerializeToString(deterministic=True))
        f.write(_length_field(_MODEL_GRAPH, graph_size))
        f.write(graph_bytes)
        for header, array in entries:
            f.write(header)
            if array is not None:
                f.write(memoryview(array).cast("B"))
    return Path(path)
