"""Option types and the option groups several commands share, with one name and meaning each."""

from __future__ import annotations

import click

from rvdeploy.backends import ALIASES, canonical_backend
from rvdeploy.errors import RvdeployError
from rvdeploy.arch import DEFAULT_BN_EPS
from rvdeploy.preprocess import given_recipe, parse_size


class SizeType(click.ParamType):
    """S, HxW, H,W or 'H W'."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return parse_size(value)
        except RvdeployError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeType()


class BatchType(click.ParamType):
    """``dynamic`` or a positive integer."""

    name = "dynamic|N"

    def convert(self, value, param, ctx):
        if value is None or value == "dynamic" or isinstance(value, int):
            return None if value == "dynamic" else value
        try:
            batch = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither 'dynamic' nor a number", param, ctx)
        if batch < 1:
            self.fail(f"{batch} must be positive", param, ctx)
        return batch


def batch_list(ctx, param, value):
    try:
        batches = tuple(int(b) for b in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of batch sizes") from None
    if not batches or min(batches) < 1:
        raise click.BadParameter(f"{value!r}: batch sizes must be positive")
    return batches


def feature_list(ctx, param, value):
    """``--features 1,2,3,4``: distinct stage numbers (0 is the stem); checked against the net on export."""
    if value is None:
        return None
    try:
        stages = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of stage numbers, e.g. 1,2,3,4") from None
    if len(set(stages)) != len(stages):
        raise click.BadParameter(f"{value!r} names a stage twice")
    if min(stages) < 0:
        raise click.BadParameter(f"{value!r}: stages are numbered from 0 (the stem), e.g. 1,2,3,4")
    return stages


def prefix_option(command):
    """``--prefix``: the backbone inside a detector's or segmenter's state dict."""
    return click.option(
        "--prefix", help="Take only the tensors under this prefix (e.g. backbone.), stripped: a headless backbone.",
    )(command)


def backend_choice(names: tuple[str, ...]) -> click.Choice:
    """The canonical backend names, and their short aliases, that a command accepts."""
    return click.Choice([*names, *(alias for alias, target in ALIASES.items() if target in names)])


def to_backend(ctx, param, value):
    return None if value in (None, "auto") else canonical_backend(value)



def _floats3(ctx, param, value):
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not three numbers") from None
    if len(numbers) != 3:
        raise click.BadParameter(f"{value!r} must be three numbers (one per channel)")
    return numbers


def bn_eps_option(command):
    """``--bn-eps``: every command that reads a training checkpoint takes it."""
    return click.option(
        "--bn-eps", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_BN_EPS, show_default=True,
        help="BatchNorm epsilon the network was trained with (training checkpoints).",
    )(command)


def recipe_options(command):
    """The preprocessing recipe, for graphs without rvdeploy metadata (or to override theirs):
    the same on every command that reads images. Passed on as one ``recipe`` argument."""
    options = [
        click.option("--mean", callback=_floats3, help="Per-channel mean, e.g. 0.485,0.456,0.406 (with --std, --input-size)."),
        click.option("--std", callback=_floats3, help="Per-channel std, e.g. 0.229,0.224,0.225."),
        click.option("--input-size", "recipe_size", type=SIZE, help="The model's input size S or HxW."),
        click.option("--resize", type=click.IntRange(min=1), help="Shorter side before the centre crop (default: size / 0.875)."),
        click.option("--allow-upscale", is_flag=True, help="Accept images smaller than the model input."),
    ]
    for decorator in reversed(options):
        command = decorator(command)
    return command


def recipe_from(kwargs: dict):
    """Pop the recipe options from a command's keyword arguments: (recipe or None, allow_upscale)."""
    recipe = given_recipe(kwargs.pop("mean"), kwargs.pop("std"), kwargs.pop("recipe_size"), kwargs.pop("resize"))
    return recipe, kwargs.pop("allow_upscale")
