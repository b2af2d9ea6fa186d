"""The errors rvdeploy reports to its users, and the one helper that turns an exception into text.

Every error carries a single line that names the problem; the CLI prints it and exits with the
error's ``exit_code``. Anything else that escapes is a bug.
"""

INPUT_EXIT = 1
FOLD_FAILED_EXIT = 3
VERIFY_FAILED_EXIT = 4
REGRESSION_EXIT = 5
INTERNAL_ERROR_EXIT = 70


def first_line(exc: BaseException | str) -> str:
    """The first non-empty line of a message (an exception's, or a library's text), else the
    exception's type name."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return "" if isinstance(exc, str) else type(exc).__name__


class RvdeployError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = INPUT_EXIT


class ArchError(RvdeployError):
    """An unknown or inconsistent architecture."""


class CheckpointError(RvdeployError):
    """A checkpoint that cannot be read, is not RepVGG, or does not match its architecture."""


class FoldError(RvdeployError):
    """The folded network does not compute what the multi-branch network computes."""

    exit_code = FOLD_FAILED_EXIT


class OutputError(RvdeployError):
    """An output that cannot be written where it was asked for."""


class OnnxError(RvdeployError):
    """A file that is not a valid ONNX graph, or one that a runtime cannot load."""


class RegressionError(RvdeployError):
    """A latency slower than the baseline allows."""

    exit_code = REGRESSION_EXIT


class QuantizeError(RvdeployError):
    """A graph or option the precision stage cannot work with."""


class RvdeployWarning(UserWarning):
    """Something that runs but not as well as it could (the CLI prints it as one line on stderr)."""
