"""Seeded probe inputs for any ONNX graph: what a graph-level proof (a graph fold, an equalization)
runs the graph before and after on; and the one-thread setting the proofs' small checks run in."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _bilinear(size_in: int, size_out: int) -> np.ndarray:
    """The [out, in] matrix of a bilinear resize along one axis (half-pixel centres, edges clamped:
    torch's ``align_corners=False``)."""
    source = np.maximum((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(int), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    weights = np.zeros((size_out, size_in))
    np.add.at(weights, (np.arange(size_out), low), 1 - (source - low))
    np.add.at(weights, (np.arange(size_out), high), source - low)
    return weights


def image_like(n: int, channels: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` float32 images shaped like a normalised ImageNet batch, but random.

    Natural images are smooth and spatially correlated, their channels move together, and each
    has its own brightness and contrast; a white-noise batch has none of this, and BN statistics
    measured on it are not what training measures. Each image is low-resolution noise at two
    scales, upsampled bilinearly, mostly shared across channels, in [0, 1], then normalised with
    the ImageNet mean and std (their averages for other channel counts).
    """
    rng = np.random.default_rng(seed)

    def field(cells: int, depth: int) -> np.ndarray:
        resize = _bilinear(cells, size)
        return resize @ rng.random((n, depth, cells, cells)) @ resize.T

    shapes = 0.6 * field(max(2, size // 16), 1) + 0.4 * field(max(2, size // 4), 1)  # shared by the channels
    colour = 0.5 * field(max(2, size // 8), channels) + 0.25
    pixels = 0.7 * shapes + 0.3 * colour
    brightness = rng.random((n, 1, 1, 1)) * 0.6 - 0.3
    contrast = rng.random((n, 1, 1, 1)) * 2.0 + 0.5
    pixels = np.clip((pixels - pixels.mean((1, 2, 3), keepdims=True)) * contrast + 0.45 + brightness, 0, 1)
    mean = IMAGENET_MEAN if channels == 3 else (sum(IMAGENET_MEAN) / 3,) * channels
    std = IMAGENET_STD if channels == 3 else (sum(IMAGENET_STD) / 3,) * channels
    return ((pixels - np.reshape(mean, (1, -1, 1, 1))) / np.reshape(std, (1, -1, 1, 1))).astype(np.float32)


def probe_feeds(model: onnx.ModelProto, batch: int = 2, size: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs shaped like the graph's: fixed dims kept, a dynamic batch → ``batch``, other dynamic
    dims → ``size``. Image-like for a float N x C x H x W input, standard normal for other float
    inputs, zeros for the rest. A net fitted to images can be chaotic on white noise (D2se's float32
    and float64 outputs differ by O(1) there), so that no error budget would say anything."""
    import onnx  # here: the checkpoint fold's proofs use this module's windows without onnx

    from rvdeploy.onnx_io import runtime_inputs

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
            images = image_like(shape[0], shape[1], max(shape[2:]), seed)
            feeds[value.name] = np.ascontiguousarray(images[:, :, :shape[2], :shape[3]]).astype(dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


# A proof checks a linear, shift-invariant map (a conv) on a window one receptive field plus one
# stride less one wide: whatever its padding, one output reads the window's interior alone (every
# tap on real values), the first outputs read the begin border's padding and the last the window's
# own end border, so it fixes the map. A chain of convs with nonlinearities between (an equalized
# pair) needs one field per conv.


def full_window(kernel: int, stride: int = 1, dilation: int = 1, fields: int = 1) -> int:
    """The window along one axis that fixes ``fields`` chained convs like this one: that many
    receptive fields plus strides less one."""
    return fields * ((kernel - 1) * dilation + stride)


def window_size(size: int, kernel: int, stride: int = 1, dilation: int = 1, fields: int = 1) -> int:
    """How much of an axis of ``size`` a proof of a conv (``kernel``, ``stride``, ``dilation``) needs:
    :func:`full_window`, congruent to ``size`` modulo the stride (SAME pads depend on it); all of it
    when it is smaller."""
    wanted = full_window(kernel, stride, dilation, fields)
    return size if wanted >= size else wanted + (size - wanted) % stride


def corner(x, kernels, strides, dilations=None, fields: int = 1):
    """The corner of ``x`` (N, C, spatial...: a numpy array or a torch tensor) that fixes ``fields``
    chained convs with these per-axis ``kernels``, ``strides`` and ``dilations`` (:func:`window_size`
    along each axis)."""
    dilations = dilations or [1] * len(kernels)
    sizes = [window_size(*axis, fields=fields) for axis in zip(x.shape[2:], kernels, strides, dilations)]
    return x[(slice(None), slice(None), *(slice(0, n) for n in sizes))]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """BLAS (and torch, where it is loaded) on one thread: a proof's small checks gain nothing from
    more, and on a busy machine a thread pool waits on a descheduled peer (425 small float64 torch
    convolutions: 0.9 s idle, 111 s with another process on one of two cores); the quantizer's fits,
    between ONNX Runtime's runs, stalled the same way on numpy's and scipy's two pools."""
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        if torch:
            torch.set_num_threads(threads)
