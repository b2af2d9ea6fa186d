"""The errors rvdeploy reports to its users.

Every one carries a single line that names the problem; the CLI prints it and exits non-zero.
"""


class RvdeployError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 1


class ArchError(RvdeployError):
    """An unknown or inconsistent architecture."""


class CheckpointError(RvdeployError):
    """A checkpoint that cannot be read, is not RepVGG, or does not match its architecture."""


class FoldError(RvdeployError):
    """The folded network does not compute what the multi-branch network computes."""

    exit_code = 3


class OutputError(RvdeployError):
    """An output that cannot be written where it was asked for."""
