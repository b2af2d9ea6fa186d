"""The paper's speed comparison on whatever hardware is here: RepVGG-A0/A1/B0 (fused and
multi-branch) against ResNet-18/34/50, same backend, batch and input size; a table and a plot of
throughput against FLOPs.

ResNets are written out below (torchvision's definitions, in a few lines) so nothing beyond torch
is needed. All models use synthetic weights: speed does not depend on what the weights learned.
Run:
    .venv/bin/python benchmarks/paper_comparison.py [--backend ort|torch] [--batch 8] [--size 224]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from rvdeploy.arch import zoo_spec
from rvdeploy.bench import BenchSettings, bench_target
from rvdeploy.export import ExportOptions, export_onnx
from rvdeploy.synthetic import trained_like_state_dict

from results_io import RESULTS, write_results


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))
        self.short = _shortcut(cin, width, stride)

    def forward(self, x):
        return torch.relu(self.body(x) + self.short(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out))
        self.short = _shortcut(cin, out, stride)

    def forward(self, x):
        return torch.relu(self.body(x) + self.short(x))


def _shortcut(cin: int, out: int, stride: int) -> nn.Module:
    if stride == 1 and cin == out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))


def resnet(block, depths) -> nn.Module:
    layers, cin = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)], 64
    for stage, depth in enumerate(depths):
        for i in range(depth):
            layers.append(block(cin, 64 * 2 ** stage, 2 if i == 0 and stage > 0 else 1))
            cin = 64 * 2 ** stage * block.expansion
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000))


RESNETS = {"ResNet-18": (Basic, (2, 2, 2, 2)), "ResNet-34": (Basic, (3, 4, 6, 3)), "ResNet-50": (Bottleneck, (3, 4, 6, 3))}


def macs(model: nn.Module, size: int) -> int:
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=["ort", "torch"], default="ort")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    settings = BenchSettings(batches=(args.batch,), warmup_s=2.0, min_s=args.seconds, iters=10, input_size=(args.size, args.size))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in ("RepVGG-A0", "RepVGG-A1", "RepVGG-B0"):
            spec = zoo_spec(name)
            ckpt = tmp / f"{name}.pth"
            torch.save(trained_like_state_dict(spec), ckpt)
            params = {"multi-branch": spec.param_count(False), "fused": spec.param_count(True)}
            flops = {"multi-branch": spec.macs(args.size, False), "fused": spec.macs(args.size, True)}
            if args.backend == "torch":
                results = bench_target(ckpt, "torch", settings)["results"]
            else:
                from rvdeploy.checkpoint import load_train_weights
                from rvdeploy.reparam import fuse

                train = load_train_weights(ckpt)
                results = []
                for form, weights in (("multi-branch", train), ("fused", fuse(train)[0])):
                    path = export_onnx(weights, tmp / f"{name}-{form}.onnx", ExportOptions(input_size=(args.size, args.size)))
                    results += bench_target(path, "onnxruntime", settings)["results"]
            for r in results:
                form = r["variant"].split("@")[0]
                rows.append({"model": name, "form": form, "params_m": params[form] / 1e6, "gmacs": flops[form] / 1e9,
                             "p50_ms": r["latency_ms"]["p50"], "throughput_ips": r["throughput_ips"]})
                print(rows[-1])
        for name, (block, depths) in RESNETS.items():
            model = resnet(block, depths).eval()
            params, gmacs = sum(p.numel() for p in model.parameters()) / 1e6, macs(model, args.size) / 1e9
            if args.backend == "torch":
                x = torch.randn(args.batch, 3, args.size, args.size)
                from rvdeploy.timing import measure

                with torch.inference_mode():
                    lat = measure(lambda: model(x), args.batch, settings.warmup_s, settings.min_s, settings.iters)
                p50, ips = lat.p50, lat.throughput_ips
            else:
                path = tmp / f"{name}.onnx"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(model, (torch.zeros(1, 3, args.size, args.size),), str(path), input_names=["input"],
                                      output_names=["logits"], dynamic_axes={"input": {0: "b"}, "logits": {0: "b"}},
                                      opset_version=17, dynamo=False)
                r = bench_target(path, "onnxruntime", settings)["results"][0]
                p50, ips = r["latency_ms"]["p50"], r["throughput_ips"]
            rows.append({"model": name, "form": "-", "params_m": params, "gmacs": gmacs, "p50_ms": p50, "throughput_ips": ips})
            print(rows[-1])
    resnet18 = next(r for r in rows if r["model"] == "ResNet-18")["throughput_ips"]
    for r in rows:
        r["vs_resnet18"] = r["throughput_ips"] / resnet18
    plot(rows, args)
    columns = [("model", "model"), ("form", "form"), ("params_m", "params (M)"), ("gmacs", "GMACs"),
               ("p50_ms", "p50 ms"), ("throughput_ips", "img/s"), ("vs_resnet18", "× ResNet-18")]
    name = f"paper_comparison_{args.backend}"
    print(write_results(name, rows, columns,
                        f"{args.backend} CPU, batch {args.batch}, {args.size}x{args.size}, float32, default threads. "
                        f"Plot: {name}.png. The paper (1080Ti, PyTorch) reports A0 1.33x ResNet-18's speed."))


def plot(rows: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        colour = "#c44e52" if r["model"].startswith("ResNet") else ("#4c72b0" if r["form"] == "fused" else "#8fa8d0")
        axis.scatter(r["gmacs"], r["throughput_ips"], color=colour, s=40)
        label = r["model"] if r["form"] in ("-", "fused") else f"{r['model']} (multi-branch)"
        axis.annotate(label, (r["gmacs"], r["throughput_ips"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    axis.set_xlabel(f"GMACs at {args.size}x{args.size}")
    axis.set_ylabel(f"images / s ({args.backend} CPU, batch {args.batch})")
    axis.set_title("RepVGG vs. ResNet: speed against compute")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(RESULTS / f"paper_comparison_{args.backend}.png", dpi=120)


if __name__ == "__main__":
    main()
