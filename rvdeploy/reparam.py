"""Structural re-parameterization: every multi-branch block folds into one 3x3 conv with bias.

The fold is done in float64 and cast to float32 once. Every fuse proves itself block by block:
each folded conv (with its SE and ReLU) runs against that block's own branches, in float64, on the
corner of the block's real input that fixes its conv (one receptive field plus one stride less
one wide) and on a Gaussian probe of the same scale, and must agree within a rounding bound that
depends on that block alone. Blocks are folded, proven and cast one at a time, the float64 nets run
alongside block by block, so no float64 copy of a whole net is held. A whole deep net can be
chaotic on a probe (its float32 and float64 outputs differ by O(1)), so the end-to-end difference
is reported, never judged.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

from rvdeploy.arch import BlockSpec
from rvdeploy.compare import EXTRA_TERMS, SAFETY, U64, compare_outputs, json_safe, relative_error
from rvdeploy.errors import FoldError
from rvdeploy.model import RepVGGBlock, SqueezeExcite, build_block, build_model
from rvdeploy.probes import corner, full_window, one_thread
from rvdeploy.weights import DeployWeights, TrainWeights

# The probe batch's height and width: each block is checked on a window of its captured input, so the
# probe need only be large enough that deep stages see realistic activations (B3's last at 1x1).
PROBE_SIZE = 32


def _bn_scale(bn: dict[str, torch.Tensor], eps: float, name: str) -> torch.Tensor:
    var_eps = bn["running_var"].double() + eps
    if (var_eps <= 0).any():
        raise FoldError(f"{name}.running_var + eps is not positive for {int((var_eps <= 0).sum())} channels")
    return bn["weight"].double() / var_eps.sqrt()


def fold_bn(kernel: torch.Tensor, bn: dict[str, torch.Tensor], eps: float, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``W' = W * gamma / sqrt(var + eps)`` per output channel, ``b' = beta - mean * gamma / sqrt(var + eps)``."""
    scale = _bn_scale(bn, eps, name)
    folded = kernel.to(torch.float64, copy=True).mul_(scale.reshape(-1, 1, 1, 1))  # one float64 array, not two
    return folded, bn["bias"].double() - bn["running_mean"].double() * scale


def _bn_tensors(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: tensors[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}


def identity_taps(channels: int, groups: int) -> torch.Tensor:
    """Where the identity's 1 sits in each output channel's 3x3 grouped kernel: its input channel
    within the group, ``i mod (C/groups)`` (at the centre tap)."""
    return torch.arange(channels) % (channels // groups)


def fold_block(tensors: dict[str, torch.Tensor], block: BlockSpec, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 3x3 kernel and bias equivalent to ``block``'s three branches. The identity's BN
    scale is added at its taps, not as a dense kernel that is all zeros but one tap per channel."""
    p = block.name
    dense_bn, one_bn = f"{p}.rbr_dense.bn", f"{p}.rbr_1x1.bn"
    kernel, bias = fold_bn(tensors[f"{p}.rbr_dense.conv.weight"], _bn_tensors(tensors, dense_bn), eps, dense_bn)
    centre, centre_bias = fold_bn(tensors[f"{p}.rbr_1x1.conv.weight"], _bn_tensors(tensors, one_bn), eps, one_bn)
    kernel[:, :, 1:2, 1:2] += centre  # the 1x1 kernel is the centre of a 3x3 one (kernel: a fresh tensor)
    bias = bias + centre_bias
    if block.has_identity:
        name = f"{p}.rbr_identity"
        bn = _bn_tensors(tensors, name)
        scale = _bn_scale(bn, eps, name)
        kernel[torch.arange(block.in_channels), identity_taps(block.in_channels, block.groups), 1, 1] += scale
        bias = bias + bn["bias"].double() - bn["running_mean"].double() * scale
    return kernel, bias


def _magnitudes(tensors: dict[str, torch.Tensor], block: BlockSpec, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel, over all branches: the absolute row sum of the folded kernels and the
    size of the bias terms before they cancel, ``|beta| + |mean * scale|``. Rounding errors scale
    with these: a conv output's terms add up to at most ``max|x| * rows + biases``."""
    p = block.name
    branches = [(tensors[f"{p}.rbr_dense.conv.weight"], f"{p}.rbr_dense.bn"),
                (tensors[f"{p}.rbr_1x1.conv.weight"], f"{p}.rbr_1x1.bn")]
    if block.has_identity:
        branches.append((None, f"{p}.rbr_identity"))
    rows, biases = 0, 0
    for conv, bn in branches:
        stats = _bn_tensors(tensors, bn)
        scale = _bn_scale(stats, eps, bn).abs()
        # identity: 1 per row. A float32 sum of absolute values is a budget's magnitude, not a result:
        # its relative rounding (~1e-4) is far inside SAFETY.
        rows = rows + scale * (1.0 if conv is None else conv.flatten(1).abs().sum(1).double())
        biases = biases + stats["bias"].double().abs() + stats["running_mean"].double().abs() * scale
    return rows, biases


def _folded_block(weights: TrainWeights, block: BlockSpec) -> dict[str, torch.Tensor]:
    """``block`` folded, in float64, under the official deploy names (its SE copied)."""
    kernel, bias = fold_block(weights.tensors, block, weights.bn_eps)
    folded = {f"{block.name}.rbr_reparam.weight": kernel, f"{block.name}.rbr_reparam.bias": bias}
    if block.se_channels:
        for part in ("down", "up"):
            for kind in ("weight", "bias"):
                key = f"{block.name}.se.{part}.{kind}"
                folded[key] = weights.tensors[key].double()
    return folded


def _head(weights: TrainWeights) -> dict[str, torch.Tensor]:
    """The classifier, copied (a backbone has none)."""
    return {} if weights.spec.headless else {f"linear.{k}": weights.tensors[f"linear.{k}"] for k in ("weight", "bias")}


def fold(weights: TrainWeights) -> dict[str, torch.Tensor]:
    """Every block folded, in float64, under the official deploy names (SE and classifier copied)."""
    folded: dict[str, torch.Tensor] = {}
    for block in weights.spec.blocks:
        folded.update(_folded_block(weights, block))
    return folded | {k: v.double() for k, v in _head(weights).items()}


@dataclass(frozen=True)
class BlockCheck:
    """One folded block against its own branches, in float64: the check that binds (largest ratio)."""

    name: str
    max_error: float  # max |folded - branches|
    budget: float  # what float64 rounding can explain for this block
    ratio: float  # max_error / budget; above 1 the fold is wrong
    rel_error: float  # max |folded - branches| / max |branches|, the largest over the checks

    @property
    def passed(self) -> bool:
        return self.ratio <= 1


@dataclass(frozen=True)
class FoldReport:
    """The block-wise proof of a fold, and (reported only) how the whole nets compare on the probe."""

    probe_shape: tuple[int, ...]
    max_abs_error: float  # folded float32 vs. multi-branch float32: what a user sees
    max_rel_error: float  # the same, relative to the largest multi-branch float32 output
    float32_rel_error: float  # folded float32 vs. multi-branch float64
    float64_rel_error: float  # folded float64 vs. multi-branch float64
    float32_noise_rel: float  # multi-branch float32 vs. float64: how much the net itself amplifies rounding
    passed: bool  # every block within its budget
    seconds: float
    blocks: tuple[BlockCheck, ...]  # in execution order

    @property
    def worst(self) -> BlockCheck:
        return max(self.blocks, key=lambda b: b.ratio)

    @property
    def worst_block(self) -> str:
        return self.worst.name

    @property
    def worst_block_ratio(self) -> float:
        return self.worst.ratio

    @property
    def worst_block_rel_error(self) -> float:
        return self.worst.rel_error

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(worst_block=self.worst_block, worst_block_ratio=self.worst_block_ratio,
                    worst_block_rel_error=self.worst_block_rel_error)
        return json_safe(data)


def _conv_and_output(block: RepVGGBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's conv output (before SE and ReLU) and its output."""
    seen = []
    handle = block.se.register_forward_hook(lambda _module, args, _out: seen.append(args[0]))
    out = block(x)
    handle.remove()
    return seen[0], out


def _inf_norm(weight: torch.Tensor) -> float:
    return weight.flatten(1).abs().sum(1).max().item()


def _se_budget(se: SqueezeExcite, conv_out: torch.Tensor, budget: float) -> float:
    """A bound on how far the SE outputs differ when their inputs differ by at most ``budget``: the
    gate is 0.25 ||W_up|| ||W_down||-Lipschitz in its input, plus each step's own float64 rounding."""
    top = conv_out.abs().max().item()
    down, up = _inf_norm(se.down.weight), _inf_norm(se.up.weight)
    hidden_top = down * top + se.down.bias.abs().max().item()
    pooled = budget + SAFETY * U64 * conv_out[0, 0].numel() * top
    hidden = down * pooled + SAFETY * U64 * se.down.weight[0].numel() * hidden_top
    logits_top = up * hidden_top + se.up.bias.abs().max().item()
    logits = up * hidden + SAFETY * U64 * se.up.weight[0].numel() * logits_top
    gate = 0.25 * logits + SAFETY * U64
    return budget + (top + budget) * gate + SAFETY * U64 * top


def _check_block(spec: BlockSpec, multi: RepVGGBlock, folded: RepVGGBlock,
                 magnitudes: tuple[torch.Tensor, torch.Tensor], probes: list[torch.Tensor]) -> BlockCheck:
    """``folded`` against ``multi`` on each probe: the conv outputs within the worst-case rounding of
    a dot product as long as the 3x3 fan-in (relative to the sum of the absolute terms), the block
    outputs within that bound carried through SE (ReLU only shrinks differences)."""
    terms = spec.in_channels // spec.groups * 9 + EXTRA_TERMS
    rows, biases = magnitudes
    checks = []  # (error, budget, reference magnitude)
    with torch.inference_mode():
        for x in probes:
            (conv_b, out_b), (conv_f, out_f) = _conv_and_output(multi, x), _conv_and_output(folded, x)
            budget = SAFETY * terms * U64 * (x.abs().max() * rows + biases).max().item()
            out_budget = _se_budget(multi.se, conv_b, budget) if spec.se_channels else budget
            checks += [((conv_f - conv_b).abs().max().item(), budget, conv_b.abs().max().item()),
                       ((out_f - out_b).abs().max().item(), out_budget, out_b.abs().max().item())]
    ratios = [error / budget if budget > 0 else (0.0 if error == 0 else math.inf) for error, budget, _ in checks]
    ratios = [r if not math.isnan(r) else math.inf for r in ratios]  # NaN outputs fail
    error, budget, _ = checks[max(range(len(checks)), key=ratios.__getitem__)]
    return BlockCheck(spec.name, error, budget, max(ratios), max(e / (m or 1.0) for e, _, m in checks))


def _block_probes(x: torch.Tensor, seed: int, stride: int) -> list[torch.Tensor]:
    """The corner of the block's real input that fixes its 3x3 conv (:func:`rvdeploy.probes.window_size`),
    when finite, and a seeded Gaussian one of its scale, so a block whose real input is dead or
    overflows is tested all the same."""
    x = corner(x[:1], (3, 3), (stride, stride))  # one image's corner
    finite = bool(torch.isfinite(x).all())
    scale = x.std().item() if finite and x.numel() > 1 else math.nan
    # The Gaussian probe is a whole window even where the real input is smaller (a deep stage of a small
    # probe), so every tap of the kernel, at every border and stride phase, is tested.
    side = full_window(3, stride)
    gaussian = torch.randn((1, x.shape[1], side, side), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ([x] if finite else []) + [gaussian * (scale if 0 < scale < math.inf else 1.0)]


def _logits(weights: TrainWeights, x: torch.Tensor) -> torch.Tensor:
    """What the net makes of its last block's output ``x``, in ``x``'s dtype: the classifier's logits,
    or ``x`` itself for a headless backbone."""
    if weights.spec.headless:
        return x
    head = {k: v.to(x.dtype) for k, v in _head(weights).items()}
    return torch.nn.functional.linear(x.mean((2, 3)), head["linear.weight"], head["linear.bias"])


def _prove_blocks(weights: TrainWeights, folded64_of, probe_size: int, batch: int, seed: int
                  ) -> tuple[dict[str, torch.Tensor], list[BlockCheck], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block by block, in execution order: the block's float64 fold (``folded64_of(block)``) checked
    against its branches on its input, then cast to float32. Both float64 nets run alongside, one
    block at a time, so no whole float64 copy of either net is ever held. Returns the float32 folded
    tensors, the checks, the probe and both float64 nets' outputs on it.

    The next block's fold (its float64 block and float32 weights) and magnitudes are made on a
    second thread while this one's multi-branch block is built and checked: torch leaves the GIL, so
    on two cores the two halves of the work, about equal, overlap."""
    spec, f64 = weights.spec, torch.float64
    x = torch.randn(batch, spec.in_channels, probe_size, probe_size, generator=torch.Generator().manual_seed(seed))
    multi_x, fused_x = x.double(), x.double()
    folded32: dict[str, torch.Tensor] = {}
    checks = []

    def prepared(block: BlockSpec):
        folded64 = folded64_of(block)
        return (build_block(block, True, folded64, dtype=f64), _magnitudes(weights.tensors, block, weights.bn_eps),
                {k: v.float() for k, v in folded64.items()})

    with one_thread(), torch.no_grad(), ThreadPoolExecutor(1) as pool:  # small convs: one thread each, which no
        # busy core can stall. no_grad, not inference_mode: the float32 tensors made here are the deployed weights,
        # used later under autograd too
        ahead = pool.submit(prepared, spec.blocks[0]) if spec.blocks else None
        for index, block in enumerate(spec.blocks):
            fused, magnitudes, block32 = ahead.result()
            if index + 1 < len(spec.blocks):
                ahead = pool.submit(prepared, spec.blocks[index + 1])
            multi = build_block(block, False, weights.tensors, weights.bn_eps, f64)
            checks.append(_check_block(block, multi, fused, magnitudes, _block_probes(multi_x, seed + 1 + index, block.stride)))
            multi_x, fused_x = multi(multi_x), fused(fused_x)
            folded32.update(block32)
        head = {k: v.float() for k, v in _head(weights).items()}
        return folded32 | head, checks, x, _logits(weights, multi_x), _logits(weights, fused_x)


def _report(weights: TrainWeights, folded32: dict[str, torch.Tensor], checks: list[BlockCheck], x: torch.Tensor,
            reference: torch.Tensor, fused64_out: torch.Tensor, start: float) -> FoldReport:
    """The proof's verdict (the blocks), and how the whole nets compare on the probe (reported)."""
    with one_thread(), torch.inference_mode():
        multi32 = weights.to_module()(x)
        fused32 = build_model(weights.spec, True, folded32)(x)
    end_to_end = compare_outputs(fused32, reference, reference32=multi32)
    return FoldReport(
        probe_shape=tuple(x.shape),
        max_abs_error=end_to_end.max_abs_error,
        max_rel_error=relative_error(fused32, multi32),
        float32_rel_error=end_to_end.max_rel_error,
        float64_rel_error=relative_error(fused64_out, reference),
        float32_noise_rel=end_to_end.noise_rel,
        passed=all(b.passed for b in checks),
        seconds=time.perf_counter() - start,
        blocks=tuple(checks),
    )


def check_fold(
    weights: TrainWeights,
    folded64: dict[str, torch.Tensor],
    folded32: dict[str, torch.Tensor],
    probe_size: int = PROBE_SIZE,
    batch: int = 2,
    seed: int = 0,
) -> FoldReport:
    """Prove ``folded64`` block by block on a seeded probe batch; compare the whole nets (``folded32``
    for the folded one) for the record."""
    start = time.perf_counter()

    def of_block(block: BlockSpec) -> dict[str, torch.Tensor]:
        return {k: v for k, v in folded64.items() if k.startswith(f"{block.name}.")}

    _, checks, x, reference, fused64_out = _prove_blocks(weights, of_block, probe_size, batch, seed)
    return _report(weights, folded32, checks, x, reference, fused64_out, start)


def fuse(weights: TrainWeights, probe_size: int = PROBE_SIZE, probe_batch: int = 1) -> tuple[DeployWeights, FoldReport]:
    """Fold ``weights`` and prove it; raise :class:`FoldError` when the proof fails. Each block is
    folded in float64, proven and cast to float32 in turn (a whole float64 fold is never held). The
    blocks are checked on one image's corner and a Gaussian window, so one probe image
    (``probe_batch``) is all they need; more only widen the end-to-end record."""
    start = time.perf_counter()
    folded32, checks, x, reference, fused64_out = _prove_blocks(
        weights, lambda block: _folded_block(weights, block), probe_size, probe_batch, 0)
    overflow = [k for k, v in folded32.items() if not all(torch.isfinite(m) for m in torch.aminmax(v))]  # NaN included
    if overflow:
        raise FoldError(f"fold of {weights.spec.name} does not fit float32: {overflow[0]} has non-finite values "
                        f"({len(overflow)} tensors in all); check its BN statistics")
    report = _report(weights, folded32, checks, x, reference, fused64_out, start)
    if not report.passed:
        worst = report.worst
        failing = sum(not b.passed for b in report.blocks)
        raise FoldError(
            f"fold self-check failed for {weights.spec.name}: block {worst.name} differs from its own branches "
            f"by {worst.max_error:.3g} in float64, {worst.ratio:.3g}x its rounding budget {worst.budget:.3g} "
            f"({failing} of {len(report.blocks)} blocks fail)"
        )
    source = weights.source
    meta = {
        "source_layout": source.layout if source else None,
        "source_sha256": source.sha256 if source else None,
        "source_file": source and source.path.rsplit("/", 1)[-1],
        "bn_eps": weights.bn_eps,
        "fold_error": report.to_dict(),
    }
    return DeployWeights(spec=weights.spec, tensors=folded32, meta=meta, preprocess=weights.preprocess), report
