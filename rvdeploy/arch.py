"""RepVGG architectures as data.

An architecture is an :class:`ArchSpec`: stage depths and widths, the groups of every body block,
whether blocks carry squeeze-excitation, and the class count. Everything else (the block list,
tensor shapes, parameter and FLOP counts) is derived from it, so every other module agrees.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

from rvdeploy.errors import ArchError

# Official definitions (Ding et al. 2021 and the official repository): depths per stage, width
# multipliers a (stages 1-3) and b (stage 4), the group count applied on layers 2, 4, ..., 26.
_A_DEPTHS = (2, 4, 14, 1)
_B_DEPTHS = (4, 6, 16, 1)
_GROUPWISE_LAYERS = tuple(range(2, 27, 2))
_ZOO_TABLE: dict[str, tuple[tuple[int, ...], tuple[float, ...], int, bool]] = {
    # name: (depths, width multipliers, groups on the groupwise layers, SE)
    "A0": (_A_DEPTHS, (0.75, 0.75, 0.75, 2.5), 1, False),
    "A1": (_A_DEPTHS, (1, 1, 1, 2.5), 1, False),
    "A2": (_A_DEPTHS, (1.5, 1.5, 1.5, 2.75), 1, False),
    "B0": (_B_DEPTHS, (1, 1, 1, 2.5), 1, False),
    "B1": (_B_DEPTHS, (2, 2, 2, 4), 1, False),
    "B1g2": (_B_DEPTHS, (2, 2, 2, 4), 2, False),
    "B1g4": (_B_DEPTHS, (2, 2, 2, 4), 4, False),
    "B2": (_B_DEPTHS, (2.5, 2.5, 2.5, 5), 1, False),
    "B2g2": (_B_DEPTHS, (2.5, 2.5, 2.5, 5), 2, False),
    "B2g4": (_B_DEPTHS, (2.5, 2.5, 2.5, 5), 4, False),
    "B3": (_B_DEPTHS, (3, 3, 3, 5), 1, False),
    "B3g2": (_B_DEPTHS, (3, 3, 3, 5), 2, False),
    "B3g4": (_B_DEPTHS, (3, 3, 3, 5), 4, False),
    "D2se": ((8, 14, 24, 1), (2.5, 2.5, 2.5, 5), 1, True),
}
ZOO_NAMES = tuple(f"RepVGG-{short}" for short in _ZOO_TABLE)
SE_REDUCTION = 16
DEFAULT_BN_EPS = 1e-5  # the BatchNorm2d default in the official repo, timm and mmpretrain
BASE_WIDTHS = (64, 128, 256, 512)


@dataclass(frozen=True)
class BlockSpec:
    """One RepVGG block: the stem (``stage0``) or a body block (``stageN.i``)."""

    name: str
    in_channels: int
    out_channels: int
    stride: int
    groups: int
    se_channels: int  # hidden width of the squeeze-excitation, 0 when the block has none

    @property
    def has_identity(self) -> bool:
        return self.in_channels == self.out_channels and self.stride == 1

    def output_size(self, size: int) -> int:
        # 3x3 pad 1 and 1x1 pad 0 give the same size for the same stride.
        return (size - 1) // self.stride + 1


@dataclass(frozen=True)
class ArchSpec:
    """A RepVGG network. ``block_groups`` has one entry per body block, in order."""

    name: str
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    stem_width: int
    block_groups: tuple[int, ...]
    se: bool = False
    num_classes: int | None = 1000  # None: a headless backbone (no classifier), as detectors use it
    in_channels: int = 3
    _blocks: tuple[BlockSpec, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "block_groups", tuple(int(g) for g in self.block_groups))
        self._validate()
        object.__setattr__(self, "_blocks", tuple(self._make_blocks()))

    def _validate(self) -> None:
        where = f"architecture {self.name!r}"
        if not self.depths or len(self.depths) != len(self.widths):
            raise ArchError(f"{where}: depths and widths must be non-empty and of equal length")
        if any(d < 1 for d in self.depths) or any(w < 1 for w in self.widths):
            raise ArchError(f"{where}: depths and widths must be positive")
        if self.stem_width < 1 or self.in_channels < 1 or (self.num_classes is not None and self.num_classes < 1):
            raise ArchError(f"{where}: stem width, input channels and class count must be positive")
        if len(self.block_groups) != sum(self.depths):
            raise ArchError(
                f"{where}: {len(self.block_groups)} group entries for {sum(self.depths)} body blocks"
            )
        if any(g < 1 for g in self.block_groups):
            raise ArchError(f"{where}: group counts must be positive, got {list(self.block_groups)}")
        if self.se and min(self.stem_width, *self.widths) < SE_REDUCTION:
            raise ArchError(f"{where}: squeeze-excitation needs every width >= {SE_REDUCTION}")

    def _make_blocks(self) -> list[BlockSpec]:
        def se_channels(width: int) -> int:
            return width // SE_REDUCTION if self.se else 0

        blocks = [BlockSpec("stage0", self.in_channels, self.stem_width, 2, 1, se_channels(self.stem_width))]
        in_ch = self.stem_width
        layer = 0
        for stage, (depth, width) in enumerate(zip(self.depths, self.widths), start=1):
            for i in range(depth):
                groups = self.block_groups[layer]
                if in_ch % groups or width % groups:
                    raise ArchError(
                        f"architecture {self.name!r}: block stage{stage}.{i} has {in_ch}->{width} "
                        f"channels, not divisible into {groups} groups"
                    )
                blocks.append(
                    BlockSpec(f"stage{stage}.{i}", in_ch, width, 2 if i == 0 else 1, groups, se_channels(width))
                )
                in_ch = width
                layer += 1
        return blocks

    @property
    def blocks(self) -> tuple[BlockSpec, ...]:
        """Every block, stem first, in execution order."""
        return self._blocks

    @property
    def num_features(self) -> int:
        return self.widths[-1]

    @property
    def headless(self) -> bool:
        return self.num_classes is None

    @property
    def num_stages(self) -> int:
        """Stages counting the stem as stage 0: stage outputs are numbered 0..num_stages-1."""
        return len(self.depths) + 1

    def blocks_through(self, stage: int) -> int:
        """How many blocks run up to the end of ``stage`` (0: the stem)."""
        return 1 + sum(self.depths[:stage])

    def stage_channels(self, stage: int) -> int:
        return self.stem_width if stage == 0 else self.widths[stage - 1]

    @property
    def is_zoo(self) -> bool:
        return self.name in ZOO_NAMES

    def with_name(self, name: str) -> ArchSpec:
        return replace(self, name=name)

    def same_network(self, other: ArchSpec) -> bool:
        """True when both describe the same tensors, whatever their names."""
        return self.to_dict() | {"name": ""} == other.to_dict() | {"name": ""}

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("_blocks", None)
        for key in ("depths", "widths", "block_groups"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ArchSpec:
        try:
            return cls(
                name=str(data["name"]),
                depths=tuple(data["depths"]),
                widths=tuple(data["widths"]),
                stem_width=int(data["stem_width"]),
                block_groups=tuple(data["block_groups"]),
                se=bool(data.get("se", False)),
                num_classes=None if data.get("num_classes", 1000) is None else int(data.get("num_classes", 1000)),
                in_channels=int(data.get("in_channels", 3)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArchError(f"malformed architecture description: {exc}") from None

    # -- counts -----------------------------------------------------------------------------
    def param_count(self, deploy: bool) -> int:
        """Learnable parameters (BN running statistics excluded), as papers count them."""
        total = 0
        for b in self.blocks:
            k3 = b.out_channels * (b.in_channels // b.groups) * 9
            if deploy:
                total += k3 + b.out_channels
            else:
                k1 = b.out_channels * (b.in_channels // b.groups)
                total += k3 + k1 + 4 * b.out_channels  # two convs, two BN (gamma, beta)
                total += 2 * b.in_channels if b.has_identity else 0
            if b.se_channels:
                total += 2 * b.out_channels * b.se_channels + b.se_channels + b.out_channels
        return total + (self.num_features * self.num_classes + self.num_classes if self.num_classes else 0)

    def macs(self, input_size: int | tuple[int, int], deploy: bool) -> int:
        """Multiply-accumulates of convolutions, SE and the classifier (the paper's "FLOPs")."""
        h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
        total = 0
        for b in self.blocks:
            h, w = b.output_size(h), b.output_size(w)
            per_pixel = b.out_channels * (b.in_channels // b.groups)
            total += h * w * per_pixel * (9 if deploy else 10)
            if b.se_channels:
                total += 2 * b.out_channels * b.se_channels
        return total + self.num_features * (self.num_classes or 0)


def _groups_for_layers(total_layers: int, groups: int) -> tuple[int, ...]:
    # Layers are counted from 1 at the first block after the stem.
    return tuple(groups if layer in _GROUPWISE_LAYERS else 1 for layer in range(1, total_layers + 1))


def _canonical_zoo_name(name: str) -> str | None:
    key = re.sub(r"^(repvgg)?[-_ ]?", "", name.strip(), flags=re.IGNORECASE).lower()
    for short in _ZOO_TABLE:
        if short.lower() == key:
            return f"RepVGG-{short}"
    return None


def zoo_spec(name: str, num_classes: int | None = 1000) -> ArchSpec:
    """The official variant ``name`` ("RepVGG-A0", "A0", "repvgg_a0" all work)."""
    canonical = _canonical_zoo_name(name)
    if canonical is None:
        raise ArchError(f"unknown architecture {name!r}; known: {', '.join(ZOO_NAMES)}")
    depths, multipliers, groups, se = _ZOO_TABLE[canonical.removeprefix("RepVGG-")]
    widths = tuple(int(base * m) for base, m in zip(BASE_WIDTHS, multipliers))
    return ArchSpec(
        name=canonical,
        depths=depths,
        widths=widths,
        stem_width=min(64, int(64 * multipliers[0])),
        block_groups=_groups_for_layers(sum(depths), groups),
        se=se,
        num_classes=num_classes,
    )


def custom_spec(
    depths: tuple[int, ...],
    widths: tuple[int, ...],
    *,
    stem_width: int | None = None,
    groups: int = 1,
    se: bool = False,
    num_classes: int | None = 1000,
    in_channels: int = 3,
    name: str = "custom",
) -> ArchSpec:
    """A small RepVGG. ``groups`` applies on layers 2, 4, ..., 26 as in the official g2/g4 nets."""
    return ArchSpec(
        name=name,
        depths=tuple(depths),
        widths=tuple(widths),
        stem_width=stem_width if stem_width is not None else min(64, widths[0]),
        block_groups=_groups_for_layers(sum(depths), groups),
        se=se,
        num_classes=num_classes,
        in_channels=in_channels,
    )


def identify(spec: ArchSpec) -> ArchSpec:
    """Give ``spec`` its zoo name when its tensors are exactly those of an official variant."""
    for name in ZOO_NAMES:
        candidate = zoo_spec(name, spec.num_classes)
        if candidate.same_network(spec.with_name(candidate.name)):
            return candidate
    return spec
