"""Seeded probe inputs for any ONNX graph: what a graph-level proof (a graph fold, an equalization)
runs the graph before and after on; and the one-thread setting the proofs' small checks run in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import onnx

from rvdeploy.onnx_io import runtime_inputs


def probe_feeds(model: onnx.ModelProto, batch: int = 2, size: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs shaped like the graph's: fixed dims kept, a dynamic batch → ``batch``, other dynamic
    dims → ``size``. Image-like for a float N x C x H x W input, standard normal for other float
    inputs, zeros for the rest. A net fitted to images can be chaotic on white noise (D2se's float32
    and float64 outputs differ by O(1) there), so that no error budget would say anything."""
    from rvdeploy.synthetic import image_like_batch  # torch: only when a graph has an image input

    rng = np.random.default_rng(seed)
    feeds = {}
    for value in runtime_inputs(model):
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (batch if axis == 0 else size)
                 for axis, d in enumerate(tensor_type.shape.dim)]
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        if dtype.kind != "f":
            feeds[value.name] = np.zeros(shape, dtype)
        elif len(shape) == 4:
            images = image_like_batch(shape[0], shape[1], max(shape[2:]), seed).numpy()
            feeds[value.name] = np.ascontiguousarray(images[:, :, :shape[2], :shape[3]]).astype(dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


# A proof checks a linear, shift-invariant map (a conv) on a window this many receptive fields
# (plus strides) wide: interior taps, borders and every stride phase are in it, so it fixes the map.
WINDOW_FIELDS = 2


def full_window(kernel: int, stride: int = 1, dilation: int = 1) -> int:
    """The window along one axis that fixes a conv: :data:`WINDOW_FIELDS` receptive fields plus strides."""
    return WINDOW_FIELDS * ((kernel - 1) * dilation + 1 + stride)


def window_size(size: int, kernel: int, stride: int = 1, dilation: int = 1) -> int:
    """How much of an axis of ``size`` a proof of a conv (``kernel``, ``stride``, ``dilation``) needs:
    :func:`full_window`, congruent to ``size`` modulo the stride (SAME pads depend on it); all of it
    when it is smaller."""
    wanted = full_window(kernel, stride, dilation)
    return size if wanted >= size else wanted + (size - wanted) % stride


def corner(x, kernels, strides, dilations=None):
    """The corner of ``x`` (N, C, spatial...: a numpy array or a torch tensor) that fixes a conv with
    these per-axis ``kernels``, ``strides`` and ``dilations`` (:func:`window_size` along each axis)."""
    dilations = dilations or [1] * len(kernels)
    sizes = [window_size(*axis) for axis in zip(x.shape[2:], kernels, strides, dilations)]
    return x[(slice(None), slice(None), *(slice(0, n) for n in sizes))]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread: a proof's small checks gain nothing from more, and on a busy machine
    torch's OpenMP threads wait on a descheduled peer (425 small float64 convolutions: 0.9 s idle,
    111 s with another process on one of two cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
