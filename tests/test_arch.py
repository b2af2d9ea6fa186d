import pytest
import torch

from rvdeploy.arch import ZOO_NAMES, ArchSpec, custom_spec, identify, zoo_spec
from rvdeploy.errors import ArchError
from rvdeploy.model import RepVGG, expected_shapes

# Ding et al. 2021, Table 2/3: parameters (millions) in training and deploy form, and FLOPs
# (billions of multiply-adds at 224). The paper's A0-A2/B0 FLOPs count the training form,
# its B1-B3 FLOPs the deploy form; both are checked as printed.
PAPER = {
    "RepVGG-A0": (9.11, 8.30, 1.52, "train"),
    "RepVGG-A1": (14.09, 12.79, 2.64, "train"),
    "RepVGG-A2": (28.21, 25.49, 5.70, "train"),
    "RepVGG-B0": (15.82, 14.34, 3.42, "train"),
    "RepVGG-B1": (57.42, 51.82, 11.82, "deploy"),
    "RepVGG-B1g2": (45.78, 41.36, 8.82, "deploy"),
    "RepVGG-B1g4": (39.97, 36.12, 7.31, "deploy"),
    "RepVGG-B2": (89.02, 80.32, 18.38, "deploy"),
    "RepVGG-B2g4": (61.76, 55.77, 11.34, "deploy"),
    "RepVGG-B3": (123.09, 110.96, 26.21, "deploy"),
    "RepVGG-B3g4": (83.83, 75.63, 16.06, "deploy"),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_zoo_matches_paper(name):
    spec = zoo_spec(name)
    train_m, deploy_m, gflops, form = PAPER[name]
    assert spec.param_count(deploy=False) / 1e6 == pytest.approx(train_m, abs=0.011)
    assert spec.param_count(deploy=True) / 1e6 == pytest.approx(deploy_m, abs=0.011)
    # Our count is convolutions, SE and classifier; the paper adds small extras (BN, adds) to some rows.
    assert spec.macs(224, deploy=form == "deploy") / 1e9 == pytest.approx(gflops, rel=1e-2)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_param_count_matches_torch_modules(name):
    spec = zoo_spec(name, num_classes=10)
    for deploy in (False, True):
        with torch.device("meta"):
            model = RepVGG(spec, deploy=deploy)
        assert spec.param_count(deploy) == sum(p.numel() for p in model.parameters())


def test_official_definitions():
    a0 = zoo_spec("RepVGG-A0")
    assert (a0.stem_width, a0.widths, a0.depths) == (48, (48, 96, 192, 1280), (2, 4, 14, 1))
    b3 = zoo_spec("B3")
    assert (b3.stem_width, b3.widths, b3.depths) == (64, (192, 384, 768, 2560), (4, 6, 16, 1))
    d2 = zoo_spec("repvgg_d2se")
    assert d2.depths == (8, 14, 24, 1) and d2.se
    # SE with C/16 hidden channels in every block, the stem included (as the official repo).
    assert all(b.se_channels == b.out_channels // 16 for b in d2.blocks)


def test_groups_on_even_layers_counted_from_first_body_block():
    spec = zoo_spec("B2g4")
    body = spec.blocks[1:]
    assert [b.groups for b in body] == [4 if layer % 2 == 0 and layer <= 26 else 1 for layer in range(1, 28)]
    assert spec.blocks[0].groups == 1
    assert (body[1].name, body[1].groups) == ("stage1.1", 4)
    assert (body[26].name, body[26].groups) == ("stage4.0", 1)  # layer 27 stays dense


def test_blocks_strides_identity_and_shapes():
    spec = zoo_spec("A0")
    assert [b.stride for b in spec.blocks[:4]] == [2, 2, 1, 2]
    assert [b.has_identity for b in spec.blocks[:4]] == [False, False, True, False]
    shapes = expected_shapes(spec, deploy=True)
    assert shapes["stage0.rbr_reparam.weight"] == (48, 3, 3, 3)
    assert shapes["stage4.0.rbr_reparam.weight"] == (1280, 192, 3, 3)
    assert shapes["linear.weight"] == (1000, 1280)


def test_official_deploy_state_dict_names():
    """The deploy form loads into the official repository's deploy model: same names, same shapes."""
    spec = zoo_spec("A0")
    names = ["stage0.rbr_reparam.weight", "stage0.rbr_reparam.bias"]
    for stage, depth in enumerate((2, 4, 14, 1), start=1):
        for i in range(depth):
            names += [f"stage{stage}.{i}.rbr_reparam.weight", f"stage{stage}.{i}.rbr_reparam.bias"]
    names += ["linear.weight", "linear.bias"]
    assert list(expected_shapes(spec, deploy=True)) == names


@pytest.mark.parametrize("alias", ["RepVGG-B1g2", "B1g2", "b1g2", "repvgg_b1g2", "RepVGG_B1G2"])
def test_name_aliases(alias):
    assert zoo_spec(alias).name == "RepVGG-B1g2"


def test_unknown_name_lists_known_ones():
    with pytest.raises(ArchError, match="unknown architecture 'RepVGG-Z9'.*RepVGG-A0"):
        zoo_spec("RepVGG-Z9")


def test_any_class_count():
    spec = zoo_spec("A1", num_classes=37)
    assert expected_shapes(spec, deploy=False)["linear.weight"] == (37, 1280)


def test_custom_specs_and_validation():
    spec = custom_spec(depths=(1, 2), widths=(8, 16), num_classes=3)
    assert [b.name for b in spec.blocks] == ["stage0", "stage1.0", "stage2.0", "stage2.1"]
    assert ArchSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ArchError, match="not divisible into 4 groups"):
        custom_spec(depths=(2,), widths=(6,), groups=4)
    with pytest.raises(ArchError, match="squeeze-excitation needs every width >= 16"):
        custom_spec(depths=(1,), widths=(8,), se=True)
    with pytest.raises(ArchError, match="equal length"):
        custom_spec(depths=(1, 1), widths=(8,))
    with pytest.raises(ArchError, match="malformed"):
        ArchSpec.from_dict({"name": "x"})


def test_identify_names_zoo_networks_only():
    a2 = zoo_spec("A2", num_classes=10)
    assert identify(a2.with_name("custom")).name == "RepVGG-A2"
    assert identify(custom_spec(depths=(1,), widths=(8,))).name == "custom"
