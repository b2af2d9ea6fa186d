"""Tensor shapes where ONNX's shape inference knows them (with data propagation, so a reshape
target computed from ``Shape`` → ``Gather`` → ``Concat`` is seen through): what tracking a channel
axis through reshapes needs.

The inference runs on :func:`rvdeploy.onnx_io.light_copy` of the graph, so a graph of gigabytes
costs what its nodes cost."""

from __future__ import annotations

import onnx

from rvdeploy.onnx_io import light_copy

Dim = int | str | None  # a size, a symbol (equal symbols are equal sizes), or unknown


def tensor_dims(model: onnx.ModelProto) -> dict[str, tuple[Dim, ...]]:
    """Every tensor whose rank shape inference finds, by name; empty when inference fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(light_copy(model), data_prop=True)
    except Exception:  # noqa: BLE001 - an op inference does not know: no shapes, reshapes stay unfolded
        return {}
    dims = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type" or not value.type.tensor_type.HasField("shape"):
            continue
        dims[value.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                 for d in value.type.tensor_type.shape.dim)
    return dims


def kept_axis(before: tuple[Dim, ...], after: tuple[Dim, ...], axis: int) -> int | None:
    """Where a reshape from ``before`` to ``after`` puts axis ``axis``, when every element keeps its
    index along it: the axes before it unchanged (or the axis and those after it unchanged), its own
    size unchanged. None when that cannot be shown from the known sizes."""
    size = before[axis]
    if size is None:
        return None
    head, tail = before[:axis], before[axis:]
    if len(after) > axis and None not in head and after[:axis] == head and after[axis] == size:
        return axis
    start = len(after) - len(tail)
    if start >= 0 and None not in tail and after[start:] == tail:
        return start
    return None


def merged_repeats(before: tuple[Dim, ...], after: tuple[Dim, ...], axis: int) -> int | None:
    """When a reshape from ``before`` to ``after`` merges axis ``axis`` with every axis after it
    (a flatten of [N, C, H, W] to [N, C*H*W]), how many values of each channel lie side by side on
    the merged axis; else None."""
    tail = before[axis + 1:]
    if len(after) != axis + 1 or after[:axis] != before[:axis] or None in before[:axis] or \
            not all(isinstance(d, int) for d in (before[axis], after[axis], *tail)):
        return None
    repeats = 1
    for d in tail:
        repeats *= d
    return repeats if after[axis] == before[axis] * repeats else None
