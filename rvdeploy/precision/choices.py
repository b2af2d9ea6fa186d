"""The precision stage's named choices, importable without its libraries: the CLI builds its options
from them before any stage loads."""

TARGETS = ("tensorrt", "onnxruntime")  # INT8 Q/DQ layouts (rvdeploy.precision.int8)
METHODS = ("entropy", "percentile", "minmax")  # calibration methods (rvdeploy.precision.calib)
# The label-free floor every INT8 graph meets unless told otherwise: noise at 10 % of the outputs' RMS.
# Healthy INT8 graphs of the shipped model reach 28-30 dB; broken ones (saturated, imbalanced) 5-15 dB.
DEFAULT_MIN_SQNR_DB = 20.0
# The FP16 graph's default floor, on the inputs it is observed on (rvdeploy.precision.fp16.plan_fp16).
DEFAULT_FP16_MIN_SQNR_DB = 35.0
KEPT_FP32_FOR = ("range", "underflow", "floor")  # why an FP16 graph's node stays FP32
DEFAULT_METHOD = "minmax"  # the best of the three measured on the shipped model: benchmarks/results/int8_methods.md
ROUNDINGS = ("nearest", "adaptive")  # how INT8 weights are rounded (rvdeploy.precision.rounding)
DEFAULT_ROUNDING = "adaptive"  # 1.8x the time of nearest on RepVGG-A0, 224 px, 256 images (benchmarks/results/int8_rounding.md)
# Layer sensitivity (one pass per layer) is measured on the first images only: it ranks layers, and the
# guard measures every candidate it builds on all of them. YOLOv10n at 320 px, 32 images: the ranking on 8
# has Spearman 0.9996 with the one on 32 (9 of the 10 most sensitive alike), in 12.7 s instead of 43.8 s.
SENSITIVITY_IMAGES = 8
# The label-free floor judges held-out calibration images (rvdeploy.precision.guard.held_out_split): this
# share of them, at most this many, once there are at least this many images.
HELD_OUT_SHARE, MAX_HELD_OUT, MIN_IMAGES_TO_HOLD_OUT = 0.25, 32, 8
