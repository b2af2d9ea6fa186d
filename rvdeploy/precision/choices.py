"""The precision stage's named choices, importable without its libraries: the CLI builds its options
from them before any stage loads."""

TARGETS = ("tensorrt", "onnxruntime")  # INT8 Q/DQ layouts (rvdeploy.precision.int8)
METHODS = ("entropy", "percentile", "minmax")  # calibration methods (rvdeploy.precision.calib)
DEFAULT_METHOD = "minmax"  # the best of the three measured on the shipped model: benchmarks/results/int8_methods.md
