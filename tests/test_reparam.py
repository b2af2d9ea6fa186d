import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rvdeploy.arch import ZOO_NAMES, BlockSpec, zoo_spec
from rvdeploy.errors import FoldError
from rvdeploy.model import RepVGGBlock, build_model
from rvdeploy.reparam import check_fold, fold, fold_block, fuse, identity_kernel
from rvdeploy.weights import TrainWeights

from conftest import trained_like_state_dict


@st.composite
def blocks_with_stats(draw):
    groups = draw(st.sampled_from([1, 2, 4]))
    in_ch = groups * draw(st.integers(1, 6))
    same = draw(st.booleans())
    out_ch = in_ch if same else groups * draw(st.integers(1, 6))
    stride = draw(st.sampled_from([1, 2]))
    se = draw(st.sampled_from([0, 1, 3]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    block = BlockSpec("b", in_ch, out_ch, stride, groups, se)
    seed = draw(st.integers(0, 2**31 - 1))
    # BN statistics over wide ranges, including near-zero variances and negative gammas.
    var_low = draw(st.sampled_from([1e-4, 0.1, 1.0]))
    gamma_scale = draw(st.sampled_from([0.01, 1.0, 10.0]))
    return block, eps, seed, var_low, gamma_scale


def _randomize(module: torch.nn.Module, seed: int, var_low: float, gamma_scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.randn(m.num_features, generator=g, dtype=torch.float64) * gamma_scale
            m.bias.data = torch.randn(m.num_features, generator=g, dtype=torch.float64)
            m.running_mean = torch.randn(m.num_features, generator=g, dtype=torch.float64) * 2
            m.running_var = var_low + torch.rand(m.num_features, generator=g, dtype=torch.float64) * 3
        elif isinstance(m, torch.nn.Conv2d):
            m.weight.data = torch.randn(m.weight.shape, generator=g, dtype=torch.float64)
            if m.bias is not None:
                m.bias.data = torch.randn(m.bias.shape, generator=g, dtype=torch.float64)


@settings(max_examples=150, deadline=None)
@given(blocks_with_stats())
def test_block_fold_is_exact(case):
    block, eps, seed, var_low, gamma_scale = case
    train = RepVGGBlock(block, deploy=False, bn_eps=eps).double().eval()
    _randomize(train, seed, var_low, gamma_scale)
    tensors = {k: v for k, v in train.state_dict().items() if not k.endswith("num_batches_tracked")}
    prefixed = {f"b.{k}": v for k, v in tensors.items()}
    kernel, bias = fold_block(prefixed, block, eps)
    deploy = RepVGGBlock(block, deploy=True).double().eval()
    deploy.rbr_reparam.weight.data, deploy.rbr_reparam.bias.data = kernel, bias
    if block.se_channels:
        deploy.se.load_state_dict(train.se.state_dict())
    x = torch.randn(3, block.in_channels, 9, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        expected, got = train(x), deploy(x)
    assert got.shape == expected.shape
    scale = expected.abs().max().item() or 1.0
    assert (got - expected).abs().max().item() <= 1e-11 * max(scale, 1.0)


def test_identity_kernel_layout():
    k = identity_kernel(6, 2)  # 3 input channels per group
    assert k.shape == (6, 3, 3, 3)
    assert k.sum() == 6
    for i in range(6):
        assert k[i, i % 3, 1, 1] == 1
    # As a grouped conv it copies its input.
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    assert torch.equal(torch.nn.functional.conv2d(x, k, padding=1, groups=2), x)


def test_fold_uses_the_given_eps(small_spec):
    tensors = trained_like_state_dict(small_spec, bn_eps=0.1)
    weights = TrainWeights(small_spec, tensors, bn_eps=0.1)
    deploy, report = fuse(weights)
    assert report.passed and report.float64_rel_error < 1e-12
    wrong_eps = fold(TrainWeights(small_spec, tensors, bn_eps=1e-5))
    assert not torch.allclose(wrong_eps["stage0.rbr_reparam.bias"].float(), deploy.tensors["stage0.rbr_reparam.bias"])


def test_fused_net_matches_multi_branch_net(small_spec, small_state):
    weights = TrainWeights(small_spec, small_state)
    deploy, report = fuse(weights, probe_size=40)
    assert all(t.dtype == torch.float32 for t in deploy.tensors.values())
    x = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = build_model(small_spec, False, small_state)(x)
        got = build_model(small_spec, True, deploy.tensors)(x)
    assert torch.allclose(got, expected, rtol=0, atol=2e-5 * expected.abs().max().item())
    assert report.max_rel_error <= report.tolerance_rel
    assert report.float64_rel_error < 1e-12
    assert report.probe_shape == (2, 3, 40, 40)


def test_self_check_catches_a_wrong_fold(small_spec, small_state):
    weights = TrainWeights(small_spec, small_state)
    folded = fold(weights)
    folded["stage2.1.rbr_reparam.bias"] = folded["stage2.1.rbr_reparam.bias"] + 1e-3
    report = check_fold(weights, folded, {k: v.float() for k, v in folded.items()})
    assert not report.passed
    assert report.float64_rel_error > 1e-6


def test_negative_variance_is_refused(small_spec, small_state):
    small_state["stage1.1.rbr_identity.running_var"][3] = -1.0
    with pytest.raises(FoldError, match=r"stage1\.1\.rbr_identity\.running_var \+ eps is not positive for 1 channels"):
        fuse(TrainWeights(small_spec, small_state))


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_every_zoo_variant_folds_at_small_input(name):
    spec = zoo_spec(name, num_classes=10)
    weights = TrainWeights(spec, trained_like_state_dict(spec, seed=3))
    deploy, report = fuse(weights, probe_size=32, probe_batch=1)
    assert report.passed
    assert report.float64_rel_error < 1e-12
    assert report.max_rel_error < 1e-4
    assert len([k for k in deploy.tensors if k.endswith("rbr_reparam.weight")]) == len(spec.blocks)
