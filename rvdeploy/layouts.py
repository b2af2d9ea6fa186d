"""Checkpoint layouts: the naming schemes of the official repository, timm and mmpretrain.

Each layout maps its keys to the official names (``stage0``, ``stageN.i``, ``rbr_dense`` /
``rbr_1x1`` / ``rbr_identity``, ``se.down`` / ``se.up``, ``linear``); a marker key identifies it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rvdeploy.errors import CheckpointError


@dataclass(frozen=True)
class Layout:
    """A naming scheme: how its keys map to the official names."""

    name: str
    marker: re.Pattern  # a key matching this identifies the layout
    prefix_rules: tuple[tuple[re.Pattern, str], ...]  # module path → official module path
    part_rules: tuple[tuple[str, str], ...] = ()  # branch names inside a block

    def to_official(self, key: str) -> str | None:
        for pattern, replacement in self.prefix_rules:
            match = pattern.match(key)
            if match:
                official = pattern.sub(replacement, key, count=1)
                for old, new in self.part_rules:
                    official = official.replace(old, new)
                return official
        return None


def _stage_plus_one(match: re.Match) -> str:
    return f"stage{int(match.group(1)) + 1}.{match.group(2)}."


_OFFICIAL_RULES = ((re.compile(r"^(stage\d+\.|linear\.)"), r"\1"),)
LAYOUTS = (
    Layout("official", re.compile(r"(^|\.)rbr_(dense|1x1)\."), _OFFICIAL_RULES),
    Layout("official-deploy", re.compile(r"(^|\.)rbr_reparam\."), _OFFICIAL_RULES),
    Layout(
        "timm",
        re.compile(r"^(stem|stages\.\d+\.\d+)\.conv_kxk\."),
        (
            (re.compile(r"^stem\."), "stage0."),
            (re.compile(r"^stages\.(\d+)\.(\d+)\."), _stage_plus_one),
            (re.compile(r"^head\.fc\."), "linear."),
        ),
        (
            ("conv_kxk.conv.", "rbr_dense.conv."),
            ("conv_kxk.bn.", "rbr_dense.bn."),
            ("conv_1x1.conv.", "rbr_1x1.conv."),
            ("conv_1x1.bn.", "rbr_1x1.bn."),
            ("identity.", "rbr_identity."),
            ("attn.fc1.", "se.down."),
            ("attn.fc2.", "se.up."),
        ),
    ),
    Layout(
        "mmpretrain",
        re.compile(r"(^|\.)(stem|stage_\d+\.\d+)\.branch_(3x3|1x1)\."),
        (
            (re.compile(r"^(backbone\.)?stem\."), "stage0."),
            (re.compile(r"^(backbone\.)?stage_(\d+)\.(\d+)\."), r"stage\2.\3."),
            (re.compile(r"^head\.fc\."), "linear."),
        ),
        (
            ("branch_3x3.conv.", "rbr_dense.conv."),
            ("branch_3x3.norm.", "rbr_dense.bn."),
            ("branch_1x1.conv.", "rbr_1x1.conv."),
            ("branch_1x1.norm.", "rbr_1x1.bn."),
            ("branch_norm.", "rbr_identity."),
            ("se_layer.conv1.conv.", "se.down."),
            ("se_layer.conv2.conv.", "se.up."),
        ),
    ),
)


def select_prefix(tensors: dict, prefix: str, where: object) -> dict:
    """The entries under ``prefix`` (a detector's ``backbone.``), with the prefix stripped.

    A user error names the prefix and the top-level prefixes the checkpoint does have.
    """
    selected = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix) and k != prefix}
    if not selected:
        tops = sorted({k.split(".", 1)[0] + ("." if "." in k else "") for k in tensors})
        shown = ", ".join(tops[:8]) + (f" and {len(tops) - 8} more" if len(tops) > 8 else "")
        raise CheckpointError(f"{where} has no tensors under the prefix {prefix!r}; its top-level prefixes are: {shown or 'none'}")
    return selected


def detect_layout(keys: list[str]) -> Layout:
    found = [layout for layout in LAYOUTS if any(layout.marker.search(k) for k in keys)]
    if not found:
        sample = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        raise CheckpointError(
            f"not a RepVGG checkpoint: none of its {len(keys)} tensors has RepVGG names "
            f"(official rbr_dense/rbr_reparam, timm conv_kxk, mmpretrain branch_3x3); it has {sample}"
        )
    if len(found) > 1:
        names = " and ".join(layout.name for layout in found)
        raise CheckpointError(f"checkpoint mixes the {names} layouts; it must be one of them")
    return found[0]
