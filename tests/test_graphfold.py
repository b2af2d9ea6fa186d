"""Graph-level re-parameterization: torch-built families exported by both torch exporters, folded,
and compared with the torch module in float64; near misses left alone with their reasons."""

from __future__ import annotations

import copy
import io
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from rvdeploy.compare import compare_outputs
from rvdeploy.graphfold import CONV_BN, PARALLEL, find_foldable, fold_graph, fold_onnx_file, prove_graph_fold
from rvdeploy.onnx_io import ort_session


def conv_bn(cin, cout, kernel, stride=1, groups=1):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    return nn.Sequential(nn.Conv2d(cin, cout, (kh, kw), stride, (kh // 2, kw // 2), groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


class Branches(nn.Module):
    """``act(sum of branches(x))``: each branch a module, or None for a BN of the input."""

    def __init__(self, branches, channels=None, identity=False, act=True):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.identity = nn.BatchNorm2d(channels) if identity else None
        self.act = act

    def forward(self, x):
        y = sum(b(x) for b in self.branches) + (self.identity(x) if self.identity is not None else 0)
        return torch.relu(y) if self.act else y


def repvgg_style(c=8):  # 5x5, 3x3, 1x1 conv-BN and identity BN, twice
    return nn.Sequential(*[Branches([conv_bn(c, c, 5), conv_bn(c, c, 3), conv_bn(c, c, 1)], c, identity=True)
                           for _ in range(2)])


def grouped_style(c=8):  # groups differing between branches, stride 2, depthwise
    return nn.Sequential(Branches([conv_bn(c, 2 * c, 3, 2, groups=2), conv_bn(c, 2 * c, 1, 2)]),
                         Branches([conv_bn(2 * c, 2 * c, 3, groups=4), conv_bn(2 * c, 2 * c, 1, groups=2)], 2 * c, True),
                         Branches([conv_bn(2 * c, 2 * c, 3, groups=2 * c), conv_bn(2 * c, 2 * c, 1)], 2 * c, True))


def mobileone_style(c=8, k=3):  # k-way depthwise conv-BN + 1x1 scale branch + identity BN, then k-way pointwise
    return nn.Sequential(Branches([conv_bn(c, c, 3, groups=c) for _ in range(k)] + [conv_bn(c, c, 1, groups=c)], c, True),
                         Branches([conv_bn(c, c, 1) for _ in range(k)], c, True))


def acnet_style(c=8):  # 3x3 + 1x3 + 3x1
    return nn.Sequential(*[Branches([conv_bn(c, c, 3), conv_bn(c, c, (1, 3)), conv_bn(c, c, (3, 1))]) for _ in range(2)])


class Nested(nn.Module):
    """``BN(3x3(x) + 1x1(x) + x) + 1x1(x)`` (RepViT's legacy block inside a larger sum): the inner sum
    folds first; the outer sum's branch is then BN(Conv(x)), a chain."""

    def __init__(self, c=8):
        super().__init__()
        self.inner = Branches([conv_bn(c, c, 3), conv_bn(c, c, 1)], act=False)
        self.bn, self.outer = nn.BatchNorm2d(c), conv_bn(c, c, 1)

    def forward(self, x):
        return torch.relu(self.bn(self.inner(x) + x) + self.outer(x))


FAMILIES = {"repvgg": repvgg_style, "grouped": grouped_style, "mobileone": mobileone_style, "acnet": acnet_style,
            "nested": Nested}
# The families' convs after folding (the nets have no stem: each block is one conv).
FOLDED_CONVS = {"repvgg": 2, "grouped": 3, "mobileone": 2, "acnet": 2, "nested": 1}


def randomised(net: nn.Module, seed=0) -> nn.Module:
    """Eval mode with random BN statistics and affine parameters, so every fold is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for t, (lo, hi) in ((m.running_mean, (-0.5, 0.5)), (m.running_var, (0.5, 2.0)),
                                (m.weight.data, (0.5, 1.5)), (m.bias.data, (-0.5, 0.5))):
                t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    return net.eval()


def export(net, x, constant_folding=True, dynamo=False, **kwargs) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            path = kwargs.pop("path")
            torch.onnx.export(net, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"], **kwargs)
            return onnx.load(str(path))
        torch.onnx.export(net, x, buffer, dynamo=False, do_constant_folding=constant_folding, opset_version=17,
                          input_names=["x"], output_names=["y"], **kwargs)
    return onnx.load_from_string(buffer.getvalue())


def ort_run(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    return ort_session(model.SerializeToString()).run(None, {"x": x.numpy()})[0]


def assert_equal_function(net, model, folded, x):
    """The folded graph is as close to the float64 module as the input graph's float32 allows."""
    with torch.no_grad():
        reference = copy.deepcopy(net).double()(x.double()).numpy()
    comparison = compare_outputs(ort_run(folded, x), reference, reference32=ort_run(model, x))
    assert comparison.passed, comparison


def ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("constant_folding", [True, False])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_fold_to_one_conv_per_block(family, constant_folding):
    net = randomised(FAMILIES[family]())
    x = torch.randn(2, 8, 16, 16)
    model = export(net, x, constant_folding)
    folded, report = fold_graph(model)
    counts = ops(folded)
    assert counts["Conv"] == FOLDED_CONVS[family]
    assert counts["Add"] == counts["BatchNormalization"] == counts["Identity"] == 0
    if family == "nested":  # a fold of folds: the inner sum, then the outer one, the BN between them a chain in its branch
        assert report.folded[PARALLEL] == 2
    else:
        assert report.folded[PARALLEL] == FOLDED_CONVS[family]
        assert (CONV_BN in report.folded) == (not constant_folding)  # the TorchScript exporter folds Conv+BN itself
    assert report.left_alone == [] and not report.nothing_to_fold
    assert find_foldable(model) == (report.groups, [])  # what verify's lint counts
    onnx.checker.check_model(folded, full_check=True)
    assert_equal_function(net, model, folded, x)


def test_dynamo_export_folds_and_proves(tmp_path):
    net = randomised(mobileone_style())
    x = torch.randn(2, 8, 16, 16)
    model = export(net, x, dynamo=True, path=tmp_path / "dynamo.onnx", dynamic_shapes=({0: torch.export.Dim("n")},))
    report = fold_onnx_file(tmp_path / "dynamo.onnx", tmp_path / "plain.onnx")
    folded = onnx.load(str(tmp_path / "plain.onnx"))
    assert ops(folded) == Counter({"Conv": 2, "Relu": 2})
    assert report.proof.passed and len(report.proof.groups) == 2
    assert report.proof.end_to_end.max_rel_error < 1e-5
    assert_equal_function(net, model, folded, x)


class Residual(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.a, self.b = conv_bn(c, c, 3), conv_bn(c, c, 3)

    def forward(self, x):
        return torch.relu(self.b(torch.relu(self.a(x))) + x)


class SigmoidBranch(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.a, self.b = conv_bn(c, c, 3), conv_bn(c, c, 1)

    def forward(self, x):
        return self.a(x) + torch.sigmoid(self.b(x))


class ReadTwice(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.a, self.b = conv_bn(c, c, 3), conv_bn(c, c, 1)

    def forward(self, x):
        a = self.a(x)
        return (a + self.b(x)) * torch.sigmoid(a)


class MismatchedStrides(nn.Module):  # on a 1-pixel-high input both give the same shape
    def __init__(self, c=8):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, (1, 3), (1, 1), (0, 1), bias=False), nn.BatchNorm2d(c))
        self.b = nn.Sequential(nn.Conv2d(c, c, (1, 3), (2, 1), (0, 1), bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.parametrize("module, shape, reason", [
    (Residual, (2, 8, 16, 16), "residual path"),
    (SigmoidBranch, (2, 8, 16, 16), "Sigmoid"),
    (ReadTwice, (2, 8, 16, 16), "also read by"),
    (MismatchedStrides, (2, 8, 1, 16), "different strides"),
])
def test_near_misses_are_left_alone_with_their_reason(module, shape, reason):
    net = randomised(module())
    x = torch.randn(*shape)
    model = export(net, x)
    folded, report = fold_graph(model)
    assert ops(folded)["Add"] == 1 and ops(folded)["Conv"] == 2
    assert PARALLEL not in report.folded
    assert len(report.left_alone) == 1 and reason in report.left_alone[0].reason, report.left_alone
    assert find_foldable(model) == ([], report.left_alone)
    assert report.left_alone[0].node in {n.name for n in folded.graph.node}  # findable in Netron
    assert_equal_function(net, model, folded, x)


# -- a graph from another framework, built by hand ---------------------------------------------
def _foreign_graph(pads=(1, 1, 1, 1), weight_input=False) -> tuple[onnx.ModelProto, dict]:
    """Sum(Conv3x3(x), Conv1x1(x), BN(x), constant): the 3x3 weight a Constant node, the 1x1 weight
    through an Identity, a per-channel constant term, opset 13, a dynamic batch, metadata."""
    rng = np.random.default_rng(3)
    c = 4
    w3, w1 = rng.standard_normal((c, c, 3, 3)).astype(np.float32), rng.standard_normal((c, c, 1, 1)).astype(np.float32)
    bias3 = rng.standard_normal(c).astype(np.float32)
    gamma, beta, mean = (rng.standard_normal(c).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.5, 2, c).astype(np.float32)
    term = rng.standard_normal((1, c, 1, 1)).astype(np.float32)
    h = onnx.helper
    t = onnx.numpy_helper.from_array
    nodes = [h.make_node("Constant", [], ["w3"], value=t(w3, "w3_value")) if not weight_input else None,
             h.make_node("Identity", ["w1_init"], ["w1"], name="alias"),
             h.make_node("Conv", ["x", "w3", "b3"], ["c3"], name="conv3", pads=list(pads)),
             h.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             h.make_node("BatchNormalization", ["x", "g", "beta", "mean", "var"], ["bn"], name="bn"),
             h.make_node("Constant", [], ["term"], value=t(term, "term_value")),
             h.make_node("Sum", ["c3", "c1", "bn", "term"], ["s"], name="sum"),
             h.make_node("Relu", ["s"], ["y"], name="relu")]
    inputs = [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", c, 8, 8])]
    if weight_input:
        inputs.append(h.make_tensor_value_info("w3", onnx.TensorProto.FLOAT, [c, c, 3, 3]))
    graph = h.make_graph([n for n in nodes if n is not None], "foreign", inputs,
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", c, 8, 8])],
                         [t(w1, "w1_init"), t(bias3, "b3"), t(gamma, "g"), t(beta, "beta"), t(mean, "mean"), t(var, "var")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], producer_name="elsewhere")
    model.ir_version = 7
    h.set_model_props(model, {"author": "someone", "rvdeploy.arch": "custom"})
    arrays = dict(w3=w3, w1=w1, bias3=bias3, gamma=gamma, beta=beta, mean=mean, var=var, term=term)
    return model, arrays


def _foreign_reference(x: np.ndarray, a: dict) -> np.ndarray:
    import torch.nn.functional as F

    d = {k: torch.from_numpy(v).double() for k, v in a.items()}
    x = torch.from_numpy(x).double()
    bn = F.batch_norm(x, d["mean"], d["var"], d["gamma"], d["beta"], False, 0.0, 1e-5)
    return torch.relu(F.conv2d(x, d["w3"], d["bias3"], padding=1) + F.conv2d(x, d["w1"]) + bn + d["term"]).numpy()


def test_foreign_graph_sum_with_constant_nodes_identity_and_constant_term():
    model, arrays = _foreign_graph()
    folded, report = fold_graph(model)
    assert ops(folded) == Counter({"Conv": 1, "Relu": 1}) and report.folded == {PARALLEL: 1}
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert conv.name == "conv3"  # named after its first branch
    onnx.checker.check_model(folded, full_check=True)
    x = np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)
    reference = _foreign_reference(x, arrays)
    run = lambda m: ort_session(m.SerializeToString()).run(None, {"x": x})[0]  # noqa: E731
    assert compare_outputs(run(folded), reference, reference32=run(model)).passed
    # what makes a graph usable elsewhere is kept
    assert folded.ir_version == 7 and list(folded.opset_import) == list(model.opset_import)
    assert folded.metadata_props == model.metadata_props and folded.producer_name == "elsewhere"
    assert folded.graph.input == model.graph.input and folded.graph.output == model.graph.output


@pytest.mark.parametrize("variant, reason", [
    (dict(pads=(0, 0, 2, 2)), "not centred"),
    (dict(weight_input=True), "computed at run time"),
])
def test_foreign_graph_near_misses(variant, reason):
    model, _ = _foreign_graph(**variant)
    folded, report = fold_graph(model)
    assert ops(folded)["Sum"] == 1 and PARALLEL not in report.folded
    assert [a.node for a in report.left_alone] == ["sum"] and reason in report.left_alone[0].reason


def test_fold_is_deterministic_and_the_proof_catches_a_wrong_weight(tmp_path):
    net = randomised(repvgg_style())
    model = export(net, torch.randn(1, 8, 16, 16), dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    onnx.save(model, str(tmp_path / "in.onnx"))
    fold_onnx_file(tmp_path / "in.onnx", tmp_path / "a.onnx")
    fold_onnx_file(tmp_path / "in.onnx", tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    folded = onnx.load(str(tmp_path / "a.onnx"))
    assert folded.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert prove_graph_fold(model, folded).passed
    # a wrong fold: one weight of the second folded conv off by 1% of the kernel's largest
    conv = [n for n in folded.graph.node if n.op_type == "Conv"][1]
    init = next(i for i in folded.graph.initializer if i.name == conv.input[1])
    weight = onnx.numpy_helper.to_array(init).copy()
    weight[3, 2, 1, 1] += 0.01 * np.abs(weight).max()
    init.CopyFrom(onnx.numpy_helper.from_array(weight, init.name))
    proof = prove_graph_fold(model, folded)
    assert not proof.passed and proof.worst_group == conv.name and proof.worst_ratio > 1
    assert [g.passed for g in proof.groups] == [True, False]


# -- files -------------------------------------------------------------------------------------
@pytest.fixture()
def foreign_file(tmp_path):
    model, _ = _foreign_graph()
    onnx.save(model, str(tmp_path / "in.onnx"))
    return tmp_path / "in.onnx"


def test_bad_inputs_write_nothing(foreign_file, tmp_path):
    from rvdeploy.errors import OnnxError, OutputError

    out = tmp_path / "out.onnx"
    (tmp_path / "junk.onnx").write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    (tmp_path / "cut.onnx").write_bytes(foreign_file.read_bytes()[:300])
    for bad in ("junk.onnx", "cut.onnx"):
        with pytest.raises(OnnxError, match="is not"):
            fold_onnx_file(tmp_path / bad, out)
    before = foreign_file.read_bytes()
    with pytest.raises(OutputError, match="is the input file"):
        fold_onnx_file(foreign_file, tmp_path / "." / "in.onnx")
    assert foreign_file.read_bytes() == before and not out.exists()


def test_nothing_to_fold_writes_an_unchanged_copy(tmp_path):
    net = randomised(Residual())
    model = export(net, torch.randn(1, 8, 16, 16))
    onnx.save(model, str(tmp_path / "in.onnx"))
    report = fold_onnx_file(tmp_path / "in.onnx", tmp_path / "out.onnx")
    assert report.nothing_to_fold and report.proof is None and report.folded == {}
    assert report.ops_after == report.ops_before and report.left_alone
    assert onnx.load(str(tmp_path / "out.onnx")).graph == model.graph


def test_external_data_in_and_out(foreign_file, tmp_path, monkeypatch):
    from rvdeploy import onnx_io
    from rvdeploy.errors import OnnxError

    model = onnx.load(str(foreign_file))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=0)
    report = fold_onnx_file(tmp_path / "ext.onnx", tmp_path / "out.onnx")
    assert report.proof.passed and report.folded == {PARALLEL: 1}
    # the writer used above 2 GB, tried on a small graph: a model file and its data, loadable, checked
    folded, _ = fold_graph(export(randomised(repvgg_style()), torch.randn(1, 8, 16, 16)))
    monkeypatch.setattr(onnx_io, "_PROTO_LIMIT", 1000)
    onnx_io.save_onnx(folded, tmp_path / "big.onnx", full_check=True)
    assert (tmp_path / "big.onnx.data").stat().st_size > (tmp_path / "big.onnx").stat().st_size
    loaded = onnx.load(str(tmp_path / "big.onnx")).graph
    assert loaded.node == folded.graph.node
    arrays = lambda g: {i.name: onnx.numpy_helper.to_array(i).tolist() for i in g.initializer}  # noqa: E731
    assert arrays(loaded) == arrays(folded.graph)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(OnnxError, match="external data"):
        fold_onnx_file(tmp_path / "ext.onnx", tmp_path / "never.onnx")
    assert not (tmp_path / "never.onnx").exists()
