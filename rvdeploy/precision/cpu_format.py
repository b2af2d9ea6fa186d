"""Which ONNX Runtime INT8 kernels each layer of an onnxruntime-layout graph runs, for a CPU class.

On a VNNI CPU the uint8 x int8 (u8s8) kernels add exactly, and they are the fastest. Without VNNI
(the ``avx2`` class) they add adjacent products in 16 bits, which saturate: the digits model in
all-u8s8 reaches 12.6 dB output SQNR there, 29.9 dB on VNNI. A layer whose weights are stored as
uint8 (zero point 128, the same grid: :func:`rvdeploy.precision.int8.encode_weights`) runs the
uint8 x uint8 kernels instead, which do not saturate but are slower. So:

- a graph for ``vnni`` CPUs is all u8s8;
- a graph for ``avx2`` CPUs made on an AVX2 CPU keeps u8s8 where saturation costs least: each layer
  alone in INT8 is measured both ways, and the layers that lose least stay u8s8 while their losses
  add up to at most :data:`SATURATION_BUDGET` of the graph's INT8 noise; the rest go u8u8;
- a graph for ``avx2`` CPUs made on a VNNI CPU, where saturation cannot be seen, is all u8u8.

Every graph measured on the way (sensitivity, bias correction, the guard) computes here what the
target CPU computes: u8u8 layers compute the same on every CPU, and a VNNI graph made on an AVX2
CPU is measured through its all-u8u8 twin, which computes what a VNNI CPU computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx

from rvdeploy.compare import json_safe
from rvdeploy.machine import cpu_int8_class
from rvdeploy.precision.int8 import encode_weights, quantizable_nodes
from rvdeploy.precision.sensitivity import OutputProbe, layer_sqnr

# Saturation may add this share of the all-u8u8 graph's output noise power (about 0.4 dB of SQNR).
SATURATION_BUDGET = 0.1
# Images the saturation check runs on: saturation shows on every image that drives a layer to its range.
SATURATION_IMAGES = 32


@dataclass
class CpuFormat:
    cpu: str  # the class the graph is for
    this_cpu: str  # the class of the CPU it was made and measured on
    unsigned: frozenset[str]  # layers with uint8 weights (u8u8 kernels) in the written graph
    measured_unsigned: frozenset[str]  # ... in the graphs measured here
    how: str  # why these layers
    saturation_db: dict[str, float] = field(default_factory=dict)  # SQNR each layer alone loses to saturation (AVX2 CPUs)

    def to_dict(self) -> dict:
        return json_safe({"cpu": self.cpu, "this_cpu": self.this_cpu, "u8u8_layers": sorted(self.unsigned),
                          "how": self.how, "saturation_db": self.saturation_db})


def _noise(sqnr_db: float) -> float:
    """Output noise power relative to the signal's; a NaN SQNR is as bad as it gets."""
    return math.inf if math.isnan(sqnr_db) else 10 ** (-sqnr_db / 10)


def saturating_layers(signed_db: dict[str, float], unsigned_db: dict[str, float], whole_unsigned_db: float) -> frozenset[str]:
    """The layers to run u8u8: all but those whose saturation losses (each layer alone, u8s8 against
    u8u8) add up to at most :data:`SATURATION_BUDGET` of the all-u8u8 graph's noise, least first."""
    extra = {node: max(0.0, _noise(signed_db[node]) - _noise(unsigned_db[node])) for node in signed_db}
    budget, spent, kept = SATURATION_BUDGET * _noise(whole_unsigned_db), 0.0, set()
    for node in sorted(extra, key=extra.get):
        if spent + extra[node] > budget:
            break
        spent += extra[node]
        kept.add(node)
    return frozenset(extra) - kept


def plan_cpu_format(cpu: str, fp32: onnx.ModelProto, signed: onnx.ModelProto, probe: OutputProbe,
                    show_progress: bool = True) -> CpuFormat:
    """The kernels of each INT8 layer of ``signed`` (the all-u8s8 onnxruntime-layout graph of ``fp32``)
    for ``cpu`` (a class, or "auto": this CPU's)."""
    here = cpu_int8_class()
    cpu = here if cpu == "auto" else cpu
    layers = frozenset(quantizable_nodes(fp32))  # every one of them INT8 in ``signed``
    if cpu == "vnni":
        how = ("measured here through its u8u8 twin, which computes what VNNI CPUs do" if here == "avx2"
               else "exact and fastest on VNNI")
        return CpuFormat(cpu, here, frozenset(), layers if here == "avx2" else frozenset(), how)
    if here == "vnni":
        return CpuFormat(cpu, here, layers, layers, "a VNNI CPU cannot show where u8s8 would saturate; u8u8 computes the same on both classes")
    sample = probe.first(SATURATION_IMAGES)
    unsigned = encode_weights(signed, layers)
    signed_db = layer_sqnr(fp32, signed, sample, show_progress, "saturation check (u8s8)")
    unsigned_db = layer_sqnr(fp32, unsigned, sample, show_progress, "saturation check (u8u8)")
    chosen = saturating_layers(signed_db, unsigned_db, sample.sqnr(unsigned))
    losses = {node: 0.0 if unsigned_db[node] == signed_db[node] else unsigned_db[node] - signed_db[node] for node in signed_db}
    how = f"u8u8 where saturation lost most, measured here on {len(sample.reference)} images with each layer alone in INT8"
    return CpuFormat(cpu, here, chosen, chosen, how, losses)
