"""Writes mobileone_tiny.onnx: a small MobileOne-style net, exported as many projects ship theirs,
with the training branches still in the graph (for `make demo` and the graph-fold tests).

Each block is k-way over-parameterized: k depthwise 3x3 conv-BN branches, a depthwise 1x1 "scale"
branch and an identity BN, summed, ReLU; then k pointwise 1x1 conv-BN branches and an identity BN.
Weights are random, BN statistics random (so every fold is non-trivial); exported by the TorchScript
exporter with constant folding off, which keeps every BatchNormalization and aliases equal
parameters through Identity nodes. Run: .venv/bin/python models/foreign/make_mobileone_tiny.py
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class Branches(nn.Module):
    """ReLU(sum of the branches + BN(x) when the shapes allow an identity branch)."""

    def __init__(self, branches: list[nn.Module], identity_channels: int | None):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.identity = nn.BatchNorm2d(identity_channels) if identity_channels else None

    def forward(self, x):
        y = sum(branch(x) for branch in self.branches)
        return torch.relu(y + self.identity(x) if self.identity is not None else y)


def mobileone_block(cin: int, cout: int, stride: int, k: int = 3) -> nn.Sequential:
    same = cin if stride == 1 else None
    depthwise = Branches([conv_bn(cin, cin, 3, stride, cin) for _ in range(k)] + [conv_bn(cin, cin, 1, stride, cin)], same)
    pointwise = Branches([conv_bn(cin, cout, 1) for _ in range(k)], cout if cin == cout else None)
    return nn.Sequential(depthwise, pointwise)


def mobileone_tiny(num_classes: int = 10) -> nn.Module:
    widths = [16, 32, 32, 64]
    layers = [Branches([conv_bn(3, widths[0], 3, 2), conv_bn(3, widths[0], 1, 2)], None)]
    for cin, cout in zip(widths, widths[1:] + widths[-1:]):
        layers.append(mobileone_block(cin, cout, 2 if cout != cin else 1))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes))


def main() -> None:
    torch.manual_seed(0)
    net = mobileone_tiny()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    out = Path(__file__).with_name("mobileone_tiny.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), torch.randn(1, 3, 64, 64), str(out), dynamo=False, do_constant_folding=False,
                          opset_version=17, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
