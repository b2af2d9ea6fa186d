"""rvdeploy: RepVGG from training checkpoint to fast inference."""

__version__ = "0.1.0"
