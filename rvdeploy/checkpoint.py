"""Reading and writing RepVGG checkpoints.

Reading goes: safe load (``weights_only=True`` or safetensors) → unwrap (``state_dict`` / ``model``
/ ``ema`` entries, ``module.`` prefixes) → detect the layout → rename to the official names →
infer (or check) the architecture → validate every tensor's presence, shape and finiteness.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from rvdeploy import __version__
from rvdeploy.arch import ArchSpec, identify, zoo_spec
from rvdeploy.errors import ArchError, CheckpointError, RvdeployError, first_line
from rvdeploy.files import FileDigest, atomic_output
from rvdeploy.layouts import Layout, detect_layout, select_prefix
from rvdeploy.model import DEFAULT_BN_EPS, expected_shapes
from rvdeploy.preprocess import Preprocess
from rvdeploy.weights import DeployWeights, Source, TrainWeights

WRAPPER_KEYS = ("state_dict", "model", "ema", "model_ema", "state_dict_ema", "module")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile
_SAFETENSORS_META_KEY = "rvdeploy"


# -- reading ---------------------------------------------------------------------------------
@dataclass
class RawCheckpoint:
    """The tensors of a checkpoint file under their original names, and what came with them."""

    tensors: dict[str, torch.Tensor]
    extras: dict  # non-tensor entries next to the tensors: "meta", "preprocess"
    wrapper: str | None
    path: Path
    digest: FileDigest


ZIP_MAGIC = b"PK\x03\x04"  # the start of torch.save's (zip) format


def _describe_load_failure(path: Path, exc: Exception) -> str:
    text = str(exc)
    global_ = re.search(r"(unsupported GLOBAL|Unsupported global:?) (GLOBAL )?([\w.]+)", text)
    if global_:
        return (
            f"refusing {path}: it is a pickle that would run code when loaded (it calls {global_.group(3)}); "
            "rvdeploy loads tensors only"
        )
    first = first_line(exc)
    with open(path, "rb") as f:
        zip_archive = f.read(4) == ZIP_MAGIC  # torch.save's format: a readable start, a broken rest
    if zip_archive or isinstance(exc, (EOFError, zipfile.BadZipFile)) or "central directory" in text:
        return f"{path} is truncated or corrupt ({first})"
    return f"{path} is not a readable PyTorch or safetensors checkpoint ({first})"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    extras = {}
    if _SAFETENSORS_META_KEY in header:
        try:
            extras["meta"] = json.loads(header[_SAFETENSORS_META_KEY])
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: the rvdeploy metadata in its header is not JSON") from None
        if not isinstance(extras["meta"], dict):  # later stages read it as a mapping
            raise CheckpointError(f"{path}: the rvdeploy metadata in its header is not a JSON object")
    return tensors, extras


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _unwrap(obj: object, path: Path, key: str | None) -> tuple[dict[str, torch.Tensor], dict, str | None]:
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            have = ", ".join(map(str, obj.keys())) if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{path} has no entry {key!r} (it has: {have})")
        if not _is_state_dict(obj[key]):
            raise CheckpointError(f"{path}: entry {key!r} is not a dict of tensors")
        return dict(obj[key]), dict(obj), key
    if _is_state_dict(obj):
        return dict(obj), {}, None
    if isinstance(obj, Mapping):
        for candidate in WRAPPER_KEYS:
            if _is_state_dict(obj.get(candidate)):
                return dict(obj[candidate]), dict(obj), candidate
        have = ", ".join(map(str, list(obj.keys())[:8]))
        raise CheckpointError(
            f"{path} holds no state dict: expected tensors at the top level or under one of "
            f"{', '.join(WRAPPER_KEYS)}; its entries are: {have or 'none'}"
        )
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")


def read_checkpoint(path: str | os.PathLike, key: str | None = None, prefix: str | None = None) -> RawCheckpoint:
    """Load a ``.pth``/``.pt`` (tensors only, never code) or ``.safetensors`` file and unwrap it;
    ``prefix`` (``backbone.``) keeps only the tensors under it, the prefix stripped."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty")
    if path.suffix == ".safetensors":
        tensors, extras = _read_safetensors(path)
        wrapper = None
    else:
        with open(path, "rb") as f:
            zip_archive = f.read(4) == ZIP_MAGIC
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols; the error says enough
                warnings.simplefilter("ignore")
                # torch.save's zip format is mapped, not copied: the tensors are pages of the file.
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zip_archive)
        except Exception as exc:  # untrusted bytes: any failure is a bad file, reported in one line
            raise CheckpointError(_describe_load_failure(path, exc)) from None
        tensors, wrapper_dict, wrapper = _unwrap(obj, path, key)
        extras = {k: wrapper_dict[k] for k in ("meta", "preprocess") if isinstance(wrapper_dict.get(k), dict)}
    for wrapper_prefix in _WRAPPER_PREFIXES:
        tensors = {k.removeprefix(wrapper_prefix): v for k, v in tensors.items()}
    if prefix:
        tensors = select_prefix(tensors, prefix, path)
    return RawCheckpoint(tensors, extras, wrapper, path, FileDigest(path))


# -- architecture ----------------------------------------------------------------------------
def _conv_key(deploy: bool) -> str:
    return "rbr_reparam.weight" if deploy else "rbr_dense.conv.weight"


def infer_spec(tensors: Mapping[str, torch.Tensor], deploy: bool) -> ArchSpec:
    """The architecture the tensor shapes describe, named after the zoo variant it matches.

    Without any ``linear.*`` tensor it is a headless backbone (``num_classes`` None), as a
    detector's or segmenter's state dict holds it under ``backbone.``.
    """
    conv = _conv_key(deploy)
    stem = tensors.get(f"stage0.{conv}")
    head = tensors.get("linear.weight")
    if stem is None or stem.dim() != 4:
        raise CheckpointError(f"cannot infer the architecture: no 4-d stem kernel stage0.{conv}")
    headless = not any(k.startswith("linear.") for k in tensors)
    if not headless and (head is None or head.dim() != 2):
        raise CheckpointError("cannot infer the architecture: no 2-d classifier weight linear.weight")
    found: dict[int, dict[int, torch.Size]] = {}
    pattern = re.compile(rf"^stage(\d+)\.(\d+)\.{re.escape(conv)}$")
    for name, tensor in tensors.items():
        match = pattern.match(name)
        if match and match.group(1) != "0":
            found.setdefault(int(match.group(1)), {})[int(match.group(2))] = tensor.shape
    if sorted(found) != list(range(1, len(found) + 1)) or not found:
        raise CheckpointError(f"cannot infer the architecture: body stages {sorted(found)} are not 1..N")
    depths, widths, groups = [], [], []
    in_channels = stem.shape[0]
    for stage in sorted(found):
        blocks = found[stage]
        if sorted(blocks) != list(range(len(blocks))):
            raise CheckpointError(f"cannot infer the architecture: stage{stage} has blocks {sorted(blocks)}")
        depths.append(len(blocks))
        widths.append(blocks[0][0])
        for i in sorted(blocks):
            shape = blocks[i]
            if len(shape) != 4 or shape[1] == 0 or in_channels % shape[1]:
                raise CheckpointError(f"stage{stage}.{i}.{conv} has shape {tuple(shape)}, not a 3x3 kernel over {in_channels} channels")
            groups.append(in_channels // shape[1])
            in_channels = shape[0]
    spec = ArchSpec(
        name="custom",
        depths=tuple(depths),
        widths=tuple(widths),
        stem_width=stem.shape[0],
        block_groups=tuple(groups),
        se="stage0.se.down.weight" in tensors,
        num_classes=None if headless else head.shape[0],
        in_channels=stem.shape[1],
    )
    return identify(spec)


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def validate(tensors: Mapping[str, torch.Tensor], spec: ArchSpec, deploy: bool, original_names: Mapping[str, str]) -> None:
    """Every expected tensor present with its shape, nothing unexpected, every value finite."""
    expected = expected_shapes(spec, deploy)
    missing = [k for k in expected if k not in tensors]
    unexpected = [original_names.get(k, k) for k in tensors if k not in expected]
    mis_shaped = [
        f"{k} {tuple(tensors[k].shape)} (expected {expected[k]})"
        for k in expected
        if k in tensors and tuple(tensors[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} mis-shaped: {_listing(mis_shaped, 4)}")
    if problems:
        raise CheckpointError(f"checkpoint does not match {spec.name}: " + "; ".join(problems))
    # A finite sum means every value is finite (NaN and Inf propagate); only a non-finite sum (or a
    # finite tensor whose sum overflows) needs the element-wise count. One pass, no mask, per tensor.
    non_finite = [
        f"{k} ({int((~torch.isfinite(t)).sum())} values)"
        for k, t in tensors.items()
        if t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all()
    ]
    if non_finite:
        raise CheckpointError(f"non-finite values (NaN or Inf) in {len(non_finite)} tensors: {_listing(non_finite)}")


def _resolve_spec(tensors: Mapping[str, torch.Tensor], deploy: bool, arch: str | None, num_classes: int | None) -> ArchSpec:
    inferred = infer_spec(tensors, deploy)
    if num_classes is not None and inferred.headless:
        raise CheckpointError(f"--num-classes {num_classes}: the checkpoint has no classifier (a headless backbone)")
    if num_classes is not None and num_classes != inferred.num_classes:
        raise CheckpointError(
            f"--num-classes {num_classes} does not match the checkpoint's classifier, which has {inferred.num_classes} classes"
        )
    if arch is None:
        return inferred
    requested = zoo_spec(arch, inferred.num_classes)
    if not requested.same_network(inferred.with_name(requested.name)):
        hint = f"the tensors describe {inferred.name}" if inferred.is_zoo else "the tensors describe a custom RepVGG"
        try:
            validate(tensors, requested, deploy, {})
        except CheckpointError as exc:
            raise CheckpointError(f"--arch {arch}: {exc}; {hint}") from None
    return requested


def _canonical(raw: RawCheckpoint) -> tuple[dict[str, torch.Tensor], dict[str, str], Layout]:
    tensors = {k: v for k, v in raw.tensors.items() if not k.endswith("num_batches_tracked")}
    layout = detect_layout(list(tensors))
    # Right names and shapes are not enough: an integer, bool or complex tensor cannot be folded or run.
    not_float = [f"{k} ({str(t.dtype).removeprefix('torch.')})" for k, t in tensors.items() if not t.is_floating_point()]
    if not_float:
        raise CheckpointError(f"{raw.path}: {len(not_float)} tensors are not floating point: {_listing(not_float)}")
    renamed: dict[str, torch.Tensor] = {}
    original: dict[str, str] = {}
    for key, tensor in tensors.items():
        official = layout.to_official(key) or key  # unmapped keys surface as "unexpected"
        renamed[official] = tensor
        original[official] = key
    return renamed, original, layout


def _preprocess_from(raw: RawCheckpoint) -> Preprocess | None:
    recipe = raw.extras.get("preprocess") or raw.extras.get("meta", {}).get("preprocess")
    try:
        return Preprocess.from_dict(recipe) if recipe else None
    except RvdeployError as exc:
        raise CheckpointError(f"{raw.path}: {exc}") from None


def _train_weights(raw: RawCheckpoint, arch: str | None, num_classes: int | None, bn_eps: float) -> TrainWeights:
    tensors, original, layout = _canonical(raw)
    if layout.name == "official-deploy":
        raise CheckpointError(f"{raw.path} is already fused (deploy form): there is nothing to fold")
    spec = _resolve_spec(tensors, False, arch, num_classes)
    validate(tensors, spec, False, original)
    return TrainWeights(
        spec=spec,
        tensors=tensors,
        source=Source(str(raw.path), raw.digest, layout.name, raw.wrapper),
        preprocess=_preprocess_from(raw),
        bn_eps=bn_eps,
    )


def _deploy_weights(raw: RawCheckpoint) -> DeployWeights:
    tensors, original, layout = _canonical(raw)
    if layout.name != "official-deploy":
        raise CheckpointError(f"{raw.path} is a training-form ({layout.name}) checkpoint, not a fused one")
    meta = dict(raw.extras.get("meta", {}))
    try:
        spec = ArchSpec.from_dict(meta["arch_spec"]) if "arch_spec" in meta else infer_spec(tensors, True)
    except ArchError as exc:
        raise CheckpointError(f"{raw.path}: {exc}") from None
    validate(tensors, spec, True, original)
    source = Source(str(raw.path), raw.digest, "rvdeploy" if "fold_error" in meta else "official-deploy", raw.wrapper)
    return DeployWeights(spec=spec, tensors=tensors, meta=meta, preprocess=_preprocess_from(raw), source=source)


def load_train_weights(
    path: str | os.PathLike,
    arch: str | None = None,
    num_classes: int | None = None,
    key: str | None = None,
    bn_eps: float = DEFAULT_BN_EPS,
    prefix: str | None = None,
) -> TrainWeights:
    """A multi-branch checkpoint in any supported layout, validated against its architecture."""
    return _train_weights(read_checkpoint(path, key, prefix), arch, num_classes, bn_eps)


def load_deploy_weights(path: str | os.PathLike, key: str | None = None, prefix: str | None = None) -> DeployWeights:
    """A fused checkpoint: one written by ``rvdeploy fuse`` or an official deploy-form state dict."""
    return _deploy_weights(read_checkpoint(path, key, prefix))


def load_weights(
    path: str | os.PathLike,
    arch: str | None = None,
    num_classes: int | None = None,
    key: str | None = None,
    bn_eps: float = DEFAULT_BN_EPS,
    prefix: str | None = None,
) -> TrainWeights | DeployWeights:
    """Either form, whichever the file holds (``arch`` and the rest apply to training form;
    ``prefix`` selects a backbone inside a larger state dict)."""
    raw = read_checkpoint(path, key, prefix)
    if detect_layout(list(raw.tensors)).name == "official-deploy":
        return _deploy_weights(raw)
    return _train_weights(raw, arch, num_classes, bn_eps)


# -- writing ---------------------------------------------------------------------------------
def deploy_meta(weights: DeployWeights) -> dict:
    meta = dict(weights.meta)
    meta.update(
        arch=weights.spec.name,
        arch_spec=weights.spec.to_dict(),
        num_classes=weights.spec.num_classes,
        rvdeploy_version=__version__,
    )
    if weights.preprocess is not None:
        meta["preprocess"] = weights.preprocess.to_dict()
    return meta


def save_deploy_weights(weights: DeployWeights, path: str | os.PathLike) -> Path:
    """Write ``{"state_dict": ..., "meta": ...}`` (torch) or safetensors with the meta in its header.

    The write is atomic: on any failure an existing file at ``path`` is left as it was.
    """
    path = Path(path)
    meta = deploy_meta(weights)
    tensors = {k: v.detach().contiguous() for k, v in weights.tensors.items()}
    with atomic_output(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={_SAFETENSORS_META_KEY: json.dumps(meta, sort_keys=True)})
        else:
            torch.save({"state_dict": tensors, "meta": meta}, tmp)
    return path
