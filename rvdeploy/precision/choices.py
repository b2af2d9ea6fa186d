"""The precision stage's named choices, importable without its libraries: the CLI builds its options
from them before any stage loads."""

TARGETS = ("tensorrt", "onnxruntime")  # INT8 Q/DQ layouts (rvdeploy.precision.int8)
METHODS = ("entropy", "percentile", "minmax")  # calibration methods (rvdeploy.precision.calib)
# The label-free floor every INT8 graph meets unless told otherwise: noise at 10 % of the outputs' RMS.
# Healthy INT8 graphs of the shipped model reach 28-30 dB; broken ones (saturated, imbalanced) 5-15 dB.
DEFAULT_MIN_SQNR_DB = 20.0
DEFAULT_METHOD = "minmax"  # the best of the three measured on the shipped model: benchmarks/results/int8_methods.md
ROUNDINGS = ("nearest", "adaptive")  # how INT8 weights are rounded (rvdeploy.precision.rounding)
DEFAULT_ROUNDING = "adaptive"  # 1.8x the time of nearest on RepVGG-A0, 224 px, 256 images (benchmarks/results/int8_rounding.md)
