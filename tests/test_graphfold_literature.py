"""Graph-level fold of blocks from the re-parameterization literature (issue 17).

Each block is a small torch module written after its paper's / official repository's training-time
definition, in eval mode with random BN statistics; each is exported by the TorchScript exporter
(with and without its constant folding, opset 17) and by torch.export (``dynamo=True``), folded,
counted and compared with the float64 module. Near misses must stay exact.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rvdeploy.graphfold import fold_graph, fold_onnx_file

# The tests directory is on sys.path (rootdir import mode, no tests/__init__.py): the other test
# modules import each other the same way.
from test_graphfold import assert_equal_function, conv_bn, export, ops, randomised

C = 8
SHAPE = (2, C, 16, 16)


# -- 1. YOLOv6 QARepVGGBlockV2 (yolov6/layers/common.py) ----------------------------------------
class QARepVGGBlockV2(nn.Module):
    """``relu(bn(rbr_dense(x) + rbr_1x1(x) + rbr_identity(x) + rbr_avg(x)))``.

    As in YOLOv6: rbr_dense is conv_bn (3x3, bias-free conv + BN), rbr_1x1 a bias-free 1x1 conv
    with no BN, rbr_identity an nn.Identity and rbr_avg ``nn.AvgPool2d(kernel_size, stride, padding)``
    (both only when in == out channels and stride 1), and one BN after the sum (kept in the deploy
    form too). Unsure: the AvgPool's arguments are from memory (kernel_size=3, stride=1, padding=1,
    count_include_pad left at its default True); use_se is False (SE is an Identity)."""

    def __init__(self, c=C, kernel_size=3, stride=1, padding=1):
        super().__init__()
        self.rbr_dense = conv_bn(c, c, kernel_size, stride)
        self.rbr_1x1 = nn.Conv2d(c, c, 1, stride, bias=False)
        self.rbr_identity = nn.Identity()
        self.rbr_avg = nn.AvgPool2d(kernel_size=kernel_size, stride=stride, padding=padding)
        self.bn = nn.BatchNorm2d(c)
        self.se = nn.Identity()
        self.nonlinearity = nn.ReLU()

    def forward(self, inputs):
        id_out = self.rbr_identity(inputs)
        avg_out = self.rbr_avg(inputs)
        return self.nonlinearity(self.bn(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out + avg_out)))


# -- 2. DiverseBranchBlock (DingXiaoH/DiverseBranchBlock, diversebranchblock.py) -----------------
class DiverseBranchBlock(nn.Module):
    """``relu(dbb_origin(x) + dbb_1x1(x) + dbb_avg(x) + dbb_1x1_kxk(x))``.

    Simplified where the repo's BNAndPadLayer (a BN whose output is padded with the BN's bias, so the
    padding is exact) sits between a 1x1 conv and the kxk op: here the 1x1 convs are bias-free and
    feed the zero-padded kxk op directly (exact too), with the BN after it. The repo's
    ``internal_channels_1x1_3x3 == in_channels`` case uses IdentityBasedConv1x1 (a 1x1 conv
    initialised to the identity): a plain bias-free 1x1 conv here."""

    def __init__(self, c=C, kernel_size=3, stride=1):
        super().__init__()
        k, pad = kernel_size, kernel_size // 2
        self.dbb_origin = conv_bn(c, c, k, stride)
        self.dbb_1x1 = conv_bn(c, c, 1, stride)
        self.dbb_avg = nn.Sequential()
        self.dbb_avg.add_module("conv", nn.Conv2d(c, c, 1, bias=False))
        self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, pad, count_include_pad=True))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(c))
        self.dbb_1x1_kxk = nn.Sequential()
        self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(c, c, 1, bias=False))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(c, c, k, stride, pad, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(c))
        self.nonlinear = nn.ReLU()

    def forward(self, inputs):
        out = self.dbb_origin(inputs)
        out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


# -- 3. UniRepLKNet DilatedReparamBlock (AILab-CVC/UniRepLKNet, unireplknet.py) -------------------
# The repo's tables: kernel 7 → dilated branches (k, r) = (5, 1), (3, 2), (3, 3); kernel 13 → ... .
DILATED = {7: ((5, 1), (3, 2), (3, 3)), 5: ((3, 1), (3, 2))}


class DilatedReparamBlock(nn.Module):
    """``origin_bn(lk_origin(x)) + sum_r bn_r(dilconv_r(x))``, all depthwise, each branch padded
    ``(r * (k - 1) + 1) // 2`` (centred) as in the repo. ``off_centre``: the last branch shifted by one
    pixel (zero pads of one more on the top/left, one fewer on the bottom/right) — a near miss."""

    def __init__(self, c=C, kernel_size=7, off_centre=False):
        super().__init__()
        self.kernel_sizes, self.dilates = zip(*DILATED[kernel_size])
        self.off_centre = off_centre
        self.lk_origin = nn.Conv2d(c, c, kernel_size, 1, kernel_size // 2, groups=c, bias=False)
        self.origin_bn = nn.BatchNorm2d(c)
        for k, r in zip(self.kernel_sizes, self.dilates):
            setattr(self, f"dil_conv_k{k}_{r}", nn.Conv2d(c, c, k, 1, (r * (k - 1) + 1) // 2, dilation=r, groups=c,
                                                         bias=False))
            setattr(self, f"dil_bn_k{k}_{r}", nn.BatchNorm2d(c))

    def forward(self, x):
        out = self.origin_bn(self.lk_origin(x))
        last = len(self.kernel_sizes) - 1
        for i, (k, r) in enumerate(zip(self.kernel_sizes, self.dilates)):
            conv, bn = getattr(self, f"dil_conv_k{k}_{r}"), getattr(self, f"dil_bn_k{k}_{r}")
            if self.off_centre and i == last:
                p = r * (k - 1) // 2
                out = out + bn(F.conv2d(F.pad(x, (p + 1, p - 1, p + 1, p - 1)), conv.weight, None, 1, 0, r, conv.groups))
            else:
                out = out + bn(conv(x))
        return out


# -- 4. pre-BN: RepLKNet (BN → 1x1 conv), NextViT (BN2d → tokens → Linear), LeViT (Linear → BN1d) -
class PreBNConv(nn.Module):
    """RepLKNet's ``prelkb_bn`` / ``preffn_bn`` then ``pw1 = conv_bn_relu(..., 1, 1, 0, groups)``."""

    def __init__(self, c=C, out=2 * C, groups=1):
        super().__init__()
        self.prelkb_bn = nn.BatchNorm2d(c)
        self.pw1 = nn.Sequential(nn.Conv2d(c, out, 1, 1, 0, groups=groups, bias=False), nn.BatchNorm2d(out), nn.ReLU())

    def forward(self, x):
        return self.pw1(self.prelkb_bn(x))


class PreBNFlattenLinear(nn.Module):
    """A BN2d head: ``Linear(flatten(BN(x)))`` over C*H*W features (each BN channel's scale and shift
    repeat over its H*W features: still one Gemm); ``hw=1``: a pooled [B, C, 1, 1] input, the flatten
    keeping the channels."""

    def __init__(self, c=C, hw=16 * 16, out=10):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm2d(c), nn.Linear(c * hw, out)

    def forward(self, x):
        return self.fc(torch.flatten(self.bn(x), 1))


class PreBNTokensLinear(nn.Module):
    """NextViT's NTB: ``norm1`` (BN2d), then ``b c h w -> b (h w) c``, then the attention's Linear."""

    def __init__(self, c=C, out=12):
        super().__init__()
        self.norm1, self.q = nn.BatchNorm2d(c), nn.Linear(c, out)

    def forward(self, x):
        b, c, _, _ = x.shape
        return self.q(self.norm1(x).reshape(b, c, -1).transpose(1, 2))


class LinearNorm(nn.Module):
    """LeViT's Linear_BN / timm's LinearNorm: ``bn(linear(x).flatten(0, 1)).reshape_as(...)``, tokens [B, N, C]."""

    def __init__(self, c=C, out=12):
        super().__init__()
        self.linear, self.bn = nn.Linear(c, out, bias=False), nn.BatchNorm1d(out)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class PreBNPaddedConv(nn.Module):
    """Near miss: a BN into a zero-padded 3x3 conv (the padding is zeros, not the BN's shift)."""

    def __init__(self, c=C):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(self.bn(x))


# -- 5. OREPA (JUGGHM/OREPA_CVPR2022, blocks.py): the kernel generated in the forward ------------
class OREPA(nn.Module):
    """``bn(conv2d(x, weight_gen()))``, ``weight_gen`` as in the repo (fewer branches): per-branch
    kernels scaled per output channel by ``vector`` with einsum, the 1x1 branch zero-padded to kxk,
    the avg branch a 1x1 kernel times a fixed kxk averaging buffer, the prior branch a 1x1 kernel
    times a fixed per-output-channel kxk prior (random here; a DCT-like basis in the repo).
    ``pad_1x1=False``: the 1x1 kernel placed at the centre by an einsum with a one-hot buffer."""

    def __init__(self, c=C, k=3, pad_1x1=True):
        super().__init__()
        self.k, self.pad_1x1 = k, pad_1x1
        g = torch.Generator().manual_seed(1)
        self.weight_orepa_origin = nn.Parameter(torch.randn(c, c, k, k, generator=g) * 0.3)
        self.weight_orepa_avg_conv = nn.Parameter(torch.randn(c, c, 1, 1, generator=g) * 0.3)
        self.register_buffer("weight_orepa_avg_avg", torch.ones(k, k).mul(1.0 / k / k))
        self.weight_orepa_pfir_conv = nn.Parameter(torch.randn(c, c, 1, 1, generator=g) * 0.3)
        self.register_buffer("weight_orepa_prior", torch.randn(c, k, k, generator=g))
        self.weight_orepa_1x1 = nn.Parameter(torch.randn(c, c, 1, 1, generator=g) * 0.3)
        self.vector = nn.Parameter(torch.rand(4, c, generator=g) + 0.5)
        centre = torch.zeros(k, k)
        centre[k // 2, k // 2] = 1
        self.register_buffer("centre", centre)
        self.bn = nn.BatchNorm2d(c)

    def weight_gen(self):
        origin = torch.einsum("oihw,o->oihw", self.weight_orepa_origin, self.vector[0, :])
        avg = torch.einsum("oihw,o->oihw", torch.einsum("oi,hw->oihw", self.weight_orepa_avg_conv.squeeze(3).squeeze(2),
                                                        self.weight_orepa_avg_avg), self.vector[1, :])
        pfir = torch.einsum("oihw,o->oihw", torch.einsum("oi,ohw->oihw", self.weight_orepa_pfir_conv.squeeze(3).squeeze(2),
                                                         self.weight_orepa_prior), self.vector[2, :])
        if self.pad_1x1:  # the repo's transVI_multiscale: F.pad of the 1x1 kernel to kxk
            pad = self.k // 2
            one = F.pad(self.weight_orepa_1x1, [pad, pad, pad, pad])
        else:  # the same kernel without F.pad (which the TorchScript exporter cannot take, see EXPORT_SKIPS)
            one = torch.einsum("oi,hw->oihw", self.weight_orepa_1x1.squeeze(3).squeeze(2), self.centre)
        one = torch.einsum("oihw,o->oihw", one, self.vector[3, :])
        return origin + avg + pfir + one

    def forward(self, inputs):
        return self.bn(F.conv2d(inputs, self.weight_gen(), None, 1, self.k // 2))


class ProductKernel(nn.Module):
    """A generated kernel without einsum: ``w = (a * b).sum(0) + base``, then conv2d and BN."""

    def __init__(self, c=C, k=3, terms=3):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.a = nn.Parameter(torch.randn(terms, c, c, k, k, generator=g) * 0.3)
        self.b = nn.Parameter(torch.rand(terms, c, 1, 1, 1, generator=g) + 0.5)
        self.base = nn.Parameter(torch.randn(c, c, k, k, generator=g) * 0.1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(F.conv2d(x, (self.a * self.b).sum(0) + self.base, padding=1))


# -- 6. PP-YOLOE RepVggBlock (ppdet/modeling/backbones/cspresnet.py) -----------------------------
class PPYoloeRepVgg(nn.Module):
    """``act(conv1(x) + alpha * conv2(x))``, conv1 3x3 conv-BN, conv2 1x1 conv-BN, alpha a
    1-element parameter (the repo initialises it to 1; 0.7 here so that it matters). ``alpha_fn``:
    alpha computed from its parameter in the graph (sigmoid, exp)."""

    def __init__(self, c=C, alpha_fn=None):
        super().__init__()
        self.conv1, self.conv2 = conv_bn(c, c, 3), conv_bn(c, c, 1)
        self.alpha = nn.Parameter(torch.tensor([0.7]))
        self.alpha_fn = alpha_fn
        self.act = nn.ReLU()

    def forward(self, x):
        alpha = self.alpha if self.alpha_fn is None else getattr(torch, self.alpha_fn)(self.alpha)
        return self.act(self.conv1(x) + alpha * self.conv2(x))


# -- 7. ResRep compactor: conv_bn then a bias-free 1x1 conv ----------------------------------------
class Compactor(nn.Module):
    def __init__(self, c=C, k=3):
        super().__init__()
        self.conv = conv_bn(c, c, k)
        self.compactor = nn.Conv2d(c, c, 1, 1, 0, bias=False)

    def forward(self, x):
        return self.compactor(self.conv(x))


# -- 8. EfficientViM-style gate: a sigmoid of a parameter, picked per stage, mixing x and dwconv(x) -
class SigmoidGate(nn.Module):
    """``x + a * (dwconv(x) - x)``, ``a = sigmoid(alpha)[0]`` per channel (``form="mix"``:
    ``(1 - a) * x + a * dwconv(x)``, the same function); dwconv a depthwise 3x3 conv-BN."""

    def __init__(self, c=C, form="residual"):
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(3, c, generator=torch.Generator().manual_seed(3)))
        self.dwconv = conv_bn(c, c, 3, groups=c)
        self.form = form

    def forward(self, x):
        a = torch.sigmoid(self.alpha)[0].view(1, -1, 1, 1)
        if self.form == "mix":
            return (1 - a) * x + a * self.dwconv(x)
        return x + a * (self.dwconv(x) - x)


# -- 9. a sequential 1x1 → 3x3 chain outside any sum ---------------------------------------------
class OneByOneThenKxK(nn.Module):
    def __init__(self, c=C, bias=False):
        super().__init__()
        self.pw, self.conv = nn.Conv2d(c, c, 1, bias=bias), conv_bn(c, c, 3)

    def forward(self, x):
        return self.conv(self.pw(x))


# -- near misses ---------------------------------------------------------------------------------
class NonlinearBranch(nn.Module):
    """``conv3x3_bn(x) + relu(conv1x1_bn(x))``: the ReLU keeps the 1x1 branch out of the sum."""

    def __init__(self, c=C):
        super().__init__()
        self.a, self.b = conv_bn(c, c, 3), conv_bn(c, c, 1)

    def forward(self, x):
        return self.a(x) + torch.relu(self.b(x))


# Each block: (module factory, input shape, the folded graph's expected op counts, checked exactly).
# Besides: every FORBIDDEN op gone and no op more frequent than before. Conv blocks fold to one Conv;
# the linear blocks (BN → Linear, Linear → BN) lose their BN and keep their one Gemm / MatMul
# ("Gemm|MatMul" counts both), with at most one Add (the bias; LeViT's bias-free Linear gains one
# from the BN's shift unless the fold makes a Gemm) and their Reshape / Transpose / Constant shapes
# (NextViT's one Transpose is the tokens': TorchScript without constant folding also transposes the
# Linear's weight, a constant subgraph that must become an initializer).
BLOCKS = {
    "qarepvgg_v2": (QARepVGGBlockV2, SHAPE, {"Conv": 1, "Relu": 1}),
    "dbb": (DiverseBranchBlock, SHAPE, {"Conv": 1, "Relu": 1}),
    "dilated_reparam_k7": (lambda: DilatedReparamBlock(kernel_size=7), SHAPE, {"Conv": 1}),
    "dilated_reparam_k5": (lambda: DilatedReparamBlock(kernel_size=5), SHAPE, {"Conv": 1}),
    "prebn_conv1x1": (PreBNConv, SHAPE, {"Conv": 1, "Relu": 1}),
    "prebn_conv1x1_groups2": (lambda: PreBNConv(groups=2), SHAPE, {"Conv": 1, "Relu": 1}),
    "prebn_flatten_linear": (PreBNFlattenLinear, SHAPE, {"Conv": 0, "Gemm|MatMul": 1, "Gemm": 1}),
    "prebn_flatten_linear_1x1": (lambda: PreBNFlattenLinear(hw=1), (2, C, 1, 1), {"Conv": 0, "Gemm|MatMul": 1, "Gemm": 1}),
    "prebn_tokens_linear": (PreBNTokensLinear, SHAPE, {"Conv": 0, "Gemm|MatMul": 1, "Transpose": 1}),
    "linear_norm": (LinearNorm, (2, 5, C), {"Conv": 0, "Gemm|MatMul": 1}),
    "orepa": (OREPA, SHAPE, {"Conv": 1}),
    "orepa_einsum_only": (lambda: OREPA(pad_1x1=False), SHAPE, {"Conv": 1}),
    "product_kernel": (ProductKernel, SHAPE, {"Conv": 1}),
    "ppyoloe_repvgg": (PPYoloeRepVgg, SHAPE, {"Conv": 1, "Relu": 1}),
    "ppyoloe_repvgg_sigmoid": (lambda: PPYoloeRepVgg(alpha_fn="sigmoid"), SHAPE, {"Conv": 1, "Relu": 1}),
    "ppyoloe_repvgg_exp": (lambda: PPYoloeRepVgg(alpha_fn="exp"), SHAPE, {"Conv": 1, "Relu": 1}),
    "resrep_compactor": (Compactor, SHAPE, {"Conv": 1}),
    "efficientvim_gate": (SigmoidGate, SHAPE, {"Conv": 1}),
    "efficientvim_gate_mix": (lambda: SigmoidGate(form="mix"), SHAPE, {"Conv": 1}),
    "conv1x1_then_3x3": (OneByOneThenKxK, SHAPE, {"Conv": 1}),
}
LINEAR_BLOCKS = {"prebn_flatten_linear", "prebn_flatten_linear_1x1", "prebn_tokens_linear", "linear_norm"}
# Gone after every fold: the BNs, pools and sums inside the blocks, the gates' arithmetic and the
# generated kernels' arithmetic (a constant subgraph: its only use is the kernel).
FORBIDDEN = ("BatchNormalization", "AveragePool", "Add", "Sub", "Sum", "Mul", "Div", "Sigmoid", "Exp", "Einsum",
             "ReduceSum", "Pad", "Gather", "Squeeze", "Unsqueeze", "Reshape", "Concat", "Shape", "Identity",
             "Constant", "ConstantOfShape", "Expand", "CastLike", "Cast")
# In the linear blocks the token reshapes stay (and the bias Add: at most one).
KEPT_IN_LINEAR = ("Add", "Reshape", "Flatten", "Transpose", "Shape", "Constant", "Gather", "Unsqueeze", "Concat")

VARIANTS = ("torchscript-cf", "torchscript-nocf", "dynamo")
# torch.export's ONNX optimizer (on by default) already evaluates the constant subgraphs and folds
# Conv+BN; with ``optimize=False`` the graph keeps them, and every bias-free conv gets a zero bias
# built as Expand(CastLike(0, x), Shape(weight)) — reading x for its type. The blocks whose point is a
# computation on constants are folded from that graph too.
RAW_DYNAMO_BLOCKS = ("orepa", "orepa_einsum_only", "product_kernel", "efficientvim_gate", "efficientvim_gate_mix",
                     "ppyoloe_repvgg_sigmoid", "qarepvgg_v2", "dbb", "linear_norm")

# Exports that fail (module, variant → the exporter's error): skipped.
_KERNEL_OF_UNKNOWN_SHAPE = ("TorchScript exporter: 'Unsupported: ONNX export of convolution for kernel of unknown "
                            "shape' (F.pad of the 1x1 kernel, as OREPA's transVI_multiscale does)")
EXPORT_SKIPS = {("orepa", "torchscript-cf"): _KERNEL_OF_UNKNOWN_SHAPE,
                ("orepa", "torchscript-nocf"): _KERNEL_OF_UNKNOWN_SHAPE}


def _export(net, x, variant, tmp_path) -> onnx.ModelProto:
    if variant.startswith("dynamo"):
        return export(net, x, dynamo=True, path=tmp_path / "dynamo.onnx", optimize=variant == "dynamo")
    return export(net, x, constant_folding=variant == "torchscript-cf")


def _counted(counts: Counter, op: str) -> int:
    return sum(counts[o] for o in op.split("|"))


_EXPORTED: dict[tuple[str, str], tuple] = {}  # (block, variant) → (net, x, model): each exported once


def _block(block, variant, tmp_path):
    if (block, variant) in EXPORT_SKIPS:
        pytest.skip(EXPORT_SKIPS[block, variant])
    factory, shape, expected = BLOCKS[block]
    if (block, variant) not in _EXPORTED:
        torch.manual_seed(0)
        net = randomised(factory())
        x = torch.randn(*shape)
        _EXPORTED[block, variant] = net, x, _export(net, x, variant, tmp_path)
    return *_EXPORTED[block, variant], expected


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_literature_block_folds(block, variant, tmp_path):
    _assert_block_folds(block, variant, tmp_path)


@pytest.mark.parametrize("block", RAW_DYNAMO_BLOCKS)
def test_literature_block_folds_unoptimised_dynamo(block, tmp_path):
    _assert_block_folds(block, "dynamo-noopt", tmp_path)


def _assert_block_folds(block, variant, tmp_path):
    net, x, model, expected = _block(block, variant, tmp_path)
    folded, report = fold_graph(model)
    before, after = ops(model), ops(folded)
    forbidden = [op for op in FORBIDDEN if block not in LINEAR_BLOCKS or op not in KEPT_IN_LINEAR]
    wrong = {op: (_counted(after, op), n) for op, n in expected.items() if _counted(after, op) != n}
    left = {op: after[op] for op in forbidden if after[op]}
    grown = {op: (before[op], after[op]) for op in after if after[op] > before[op] and op != "Add"}
    if block in LINEAR_BLOCKS and after["Add"] > 1:
        wrong["Add"] = (after["Add"], "<= 1")
    assert not wrong and not left and not grown, (f"{block} {variant}: (found, expected) {wrong}, left {left}, "
                                                  f"grown {grown}; left alone {report.left_alone}")
    assert report.left_alone == [], report.left_alone
    onnx.checker.check_model(folded, full_check=True)
    assert_equal_function(net, model, folded, x)


# Through the file API, so that the proof runs on the new patterns too.
@pytest.mark.parametrize("block, variant", [("dbb", "dynamo"), ("orepa_einsum_only", "torchscript-nocf"),
                                            ("product_kernel", "torchscript-cf"), ("prebn_tokens_linear", "dynamo"),
                                            ("efficientvim_gate", "torchscript-cf")])
def test_literature_block_folds_and_proves(block, variant, tmp_path):
    net, x, model, expected = _block(block, variant, tmp_path)
    onnx.save(model, str(tmp_path / "in.onnx"))
    report = fold_onnx_file(tmp_path / "in.onnx", tmp_path / "plain.onnx")
    folded = ops(onnx.load(str(tmp_path / "plain.onnx")))
    assert folded["Conv"] == expected["Conv"] and _counted(folded, "Gemm|MatMul") == expected.get("Gemm|MatMul", 0)
    assert not any(folded[op] for op in ("BatchNormalization", "AveragePool", "Sub", "Sum", "Einsum", "Sigmoid")), folded
    assert report.proof is not None and report.proof.passed, report.proof
    assert report.proof.end_to_end.max_rel_error < 1e-5
    assert_equal_function(net, model, onnx.load(str(tmp_path / "plain.onnx")), x)


# Near misses: each stays exact and is left alone with one of the reason substrings given here (by
# exporter: TorchScript renders the off-centre F.pad as a Pad node the branch's Conv reads,
# torch.export folds it into the Conv's pads as [4, 4, 2, 2]).
NEAR_MISSES = {
    "prebn_padded_conv3x3": (PreBNPaddedConv, ("zero-padded border",)),
    "dilated_off_centre": (lambda: DilatedReparamBlock(kernel_size=7, off_centre=True), ("not centred", "Pad")),
    "nonlinear_branch": (NonlinearBranch, ("Relu",)),
    "conv1x1_bias_then_padded_3x3": (lambda: OneByOneThenKxK(bias=True), ("zero-padded border",)),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("block", sorted(NEAR_MISSES))
def test_literature_near_misses_stay_exact(block, variant, tmp_path):
    factory, reasons = NEAR_MISSES[block]
    torch.manual_seed(0)
    net = randomised(factory())
    x = torch.randn(*SHAPE)
    model = _export(net, x, variant, tmp_path)
    folded, report = fold_graph(model)
    onnx.checker.check_model(folded, full_check=True)
    assert_equal_function(net, model, folded, x)
    assert any(r in a.reason for a in report.left_alone for r in reasons), report.left_alone


# -- the proof of the new patterns catches a wrong fold -----------------------------------------
def _initializer(model: onnx.ModelProto, name: str):
    return next(i for i in model.graph.initializer if i.name == name)


def _folded_pair(block, variant, tmp_path):
    net, x, model, _ = _block(block, variant, tmp_path)
    onnx.save(model, str(tmp_path / "in.onnx"))
    report = fold_onnx_file(tmp_path / "in.onnx", tmp_path / "plain.onnx")
    assert report.proof.passed
    return model, onnx.load(str(tmp_path / "plain.onnx"))


@pytest.mark.parametrize("block, op", [("dbb", "Conv"), ("dilated_reparam_k7", "Conv"),
                                       ("prebn_tokens_linear", "MatMul"), ("linear_norm", "MatMul")])
def test_the_proof_catches_a_wrong_weight_in_a_new_pattern(block, op, tmp_path):
    from rvdeploy.graphfold import prove_graph_fold

    model, folded = _folded_pair(block, "torchscript-cf", tmp_path)
    node = next(n for n in folded.graph.node if n.op_type == op)
    init = _initializer(folded, node.input[1])
    weight = onnx.numpy_helper.to_array(init).copy()
    weight.flat[weight.size // 3] += 0.01 * np.abs(weight).max()
    init.CopyFrom(onnx.numpy_helper.from_array(weight, init.name))
    proof = prove_graph_fold(model, folded)
    assert not proof.passed and proof.worst_ratio > 1, proof


class SquareTokens(nn.Module):
    """BN → tokens → Linear on as many tokens as channels, so a wrong transpose keeps every shape."""

    def __init__(self, c=C):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm2d(c), nn.Linear(c, c)

    def forward(self, x):
        b, c, h, w = x.shape
        return self.fc(self.bn(x).reshape(b, c, h * w).transpose(1, 2))


def test_the_proof_checks_where_a_channel_went_through_the_reshapes(tmp_path):
    """A folded graph whose token transpose was dropped: the folded MatMul alone matches its
    reference on the tensor it reads, but that tensor no longer holds the channels on its last axis;
    the relation to the input graph's tensor of the same name fails."""
    from rvdeploy.graphfold import prove_graph_fold

    torch.manual_seed(0)
    net = randomised(SquareTokens())
    x = torch.randn(2, C, 2, 4)  # 8 tokens of 8 channels
    model = export(net, x)
    folded, report = fold_graph(model)
    assert ops(folded)["BatchNormalization"] == 0 and prove_graph_fold(model, folded).passed
    transpose = next(n for n in folded.graph.node if n.op_type == "Transpose")
    transpose.op_type = "Identity"
    del transpose.attribute[:]
    proof = prove_graph_fold(model, folded)
    assert not proof.passed
    failing = [g for g in proof.groups if not g.passed]
    assert failing and all("as the input graph's" in g.name for g in failing), proof.groups


class DepthwiseThenPointwise(nn.Module):
    def __init__(self, c=C):
        super().__init__()
        self.dw, self.pw = conv_bn(c, c, 3, groups=c), nn.Conv2d(c, 2 * c, 1)

    def forward(self, x):
        return torch.relu(self.pw(self.dw(x)))


def test_a_chain_that_would_cost_more_as_one_conv_stays_two():
    torch.manual_seed(0)
    net = randomised(DepthwiseThenPointwise())
    x = torch.randn(*SHAPE)
    model = export(net, x)
    folded, report = fold_graph(model)
    assert ops(folded)["Conv"] == 2 and "conv+conv" not in report.folded
    assert_equal_function(net, model, folded, x)


@pytest.mark.parametrize("value, reason", [(np.nan, "NaN or infinite"), (-4.0, "not positive")])
def test_a_hostile_pre_norm_is_left_alone_with_its_reason(value, reason):
    torch.manual_seed(0)
    net = randomised(PreBNConv())
    x = torch.randn(*SHAPE)
    model = export(net, x)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    init = _initializer(model, bn.input[4])
    var = onnx.numpy_helper.to_array(init).copy()
    var[1] = value
    init.CopyFrom(onnx.numpy_helper.from_array(var, init.name))
    folded, report = fold_graph(model)
    assert ops(folded)["BatchNormalization"] == 1
    assert any(reason in a.reason for a in report.left_alone), report.left_alone


@pytest.mark.parametrize("block", ["dbb", "dilated_reparam_k7", "prebn_tokens_linear", "linear_norm",
                                   "efficientvim_gate", "orepa_einsum_only"])
def test_new_patterns_keep_a_dynamic_batch_the_metadata_and_are_deterministic(block, tmp_path):
    factory, shape, _ = BLOCKS[block]
    torch.manual_seed(0)
    net = randomised(factory())
    model = export(net, torch.randn(*shape), dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    onnx.helper.set_model_props(model, {"author": "someone"})
    onnx.save(model, str(tmp_path / "in.onnx"))
    report = fold_onnx_file(tmp_path / "in.onnx", tmp_path / "a.onnx")
    fold_onnx_file(tmp_path / "in.onnx", tmp_path / "b.onnx")
    assert report.proof.passed and (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    folded = onnx.load(str(tmp_path / "a.onnx"))
    assert folded.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert {p.key: p.value for p in folded.metadata_props} == {"author": "someone"}
    assert ops(folded)["BatchNormalization"] == 0
    assert_equal_function(net, model, folded, torch.randn(3, *shape[1:]))
