"""Seeded fuzzing of every command that reads a file, and hand-made hostile inputs.

Mutants of the shipped checkpoint, its fused checkpoint, its ONNX export, its FP16 graph, a bench
baseline, a calibration cache and an engine sidecar go through the CLI. Whatever the bytes, a
command either succeeds or says in one ``error: ...`` line on stderr what is wrong, with a user
error's exit status: never a traceback, never "internal error" (exit 70, a bug). An output that
existed before is either untouched (failure) or replaced by a complete file (success), and no
temporary file is left behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from rvdeploy.cli import main

from conftest import DIGITS_CKPT, ROOT

SEED = 20250601
CALIB = ROOT / "calib" / "digits"
HELDOUT = ROOT / "models" / "digits" / "heldout"
USER_EXITS = {1, 3, 4, 5}  # bad input, failed fold self-check, graph rejected by verify, latency regression
SENTINEL = b"rvdeploy fuzz: this output existed before the command ran\n"
HOT_BYTES = 4096  # headers, pickles, graph nodes, metadata and zip directories live at the ends of a file
FAST_BENCH = ("--batch", "1", "--warmup-s", "0", "--min-s", "0.01", "--iters", "2")


# -- running commands and checking what they leave ---------------------------------------------
def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def complete(path: Path) -> bool:
    """``path`` holds a whole output of its kind (not a partial write, not the sentinel)."""
    data = path.read_bytes()
    if data == SENTINEL or not data:
        return False
    if path.suffix == ".onnx":
        onnx.checker.check_model(onnx.load_from_string(data))
    elif path.suffix == ".pth":
        torch.load(path, weights_only=True)
    elif path.suffix == ".json":
        json.loads(data)
    return True


def assert_user_outcome(result, outputs: dict[Path, bytes] = {}, folders: tuple[Path, ...] = ()) -> None:
    """Exit 0 or a user error in one line; outputs untouched on failure, complete on success; no temp files."""
    text = result.stdout + result.stderr
    assert "Traceback" not in text and "internal error" not in text, text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 0 or result.exit_code in USER_EXITS, f"exit {result.exit_code}: {text}"
    if result.exit_code != 0 and not (result.exit_code == 4 and not result.stderr):
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    elif result.exit_code == 4:  # verify's verdict: its report on stdout, the violations listed
        assert not json.loads(result.stdout)["ok"]
    for path, before in outputs.items():
        if result.exit_code != 0:
            assert path.read_bytes() == before, f"{path.name} was changed by a failed command"
        else:
            assert complete(path), f"{path.name} is not a complete output"
    for folder in folders:
        leftovers = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
        assert not leftovers, f"temporary files left in {folder}: {leftovers}"


# -- the inputs -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """The shipped checkpoint and everything the pipeline makes from it."""
    root = tmp_path_factory.mktemp("fuzz-artifacts")
    paths = {
        "train": DIGITS_CKPT,
        "fused": root / "fused.pth",
        "onnx": root / "digits.onnx",
        "fp16": root / "fp16.onnx",
        "baseline": root / "bench.json",
        "cache": root / "cache.json",
        "engine": root / "digits.engine",
    }
    steps = [
        ("fuse", DIGITS_CKPT, "-o", paths["fused"]),
        ("export", DIGITS_CKPT, "--onnx", paths["onnx"]),
        ("quantize", paths["onnx"], "--fp16", "-o", paths["fp16"]),
        ("quantize", paths["onnx"], "--int8", "--calib", CALIB, "--num-images", 16, "--calib-cache", paths["cache"],
         "-o", root / "int8.onnx", "--json"),
        ("bench", paths["onnx"], *FAST_BENCH, "--json", paths["baseline"]),
        ("build-engine", paths["onnx"], "-o", paths["engine"], "--json"),
    ]
    for step in steps:
        result = invoke(*step)
        assert result.exit_code == 0, result.output
    paths["sidecar"] = Path(f"{paths['engine']}.json")
    return paths


# -- the mutator ------------------------------------------------------------------------------
MUTATIONS = ("flip", "truncate", "zero", "dup-overwrite", "dup-insert")


def _offset(rng: np.random.Generator, size: int) -> int:
    """Half the time in the structural ends of the file, else anywhere."""
    if rng.random() < 0.5 and size > 2 * HOT_BYTES:
        start = int(rng.integers(HOT_BYTES))
        return start if rng.random() < 0.5 else size - 1 - start
    return int(rng.integers(size))


def mutate(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    """``data`` with a few bytes flipped, cut short, a span zeroed, or a span copied over or into another place."""
    buf = bytearray(data)
    size = len(buf)
    if kind == "flip":
        for _ in range(int(rng.integers(1, 5))):
            buf[_offset(rng, size)] ^= int(rng.integers(1, 256))
    elif kind == "truncate":
        del buf[_offset(rng, size):]
    elif kind == "zero":
        at, length = _offset(rng, size), int(rng.integers(1, 513))
        buf[at:at + length] = bytes(len(buf[at:at + length]))
    elif kind in ("dup-overwrite", "dup-insert"):
        source, target, length = _offset(rng, size), _offset(rng, size), int(rng.integers(1, 513))
        span = buf[source:source + length]
        if kind == "dup-insert":
            buf[target:target] = span
        else:
            buf[target:target + len(span)] = span
            del buf[size:]
    else:
        raise ValueError(kind)
    return bytes(buf)


HOSTILE_VALUES = (None, -1, 0, 1e308, "x", [], {}, True, [1, "a"], {"a": None}, 2**70)


def mutate_json(data: bytes, rng: np.random.Generator) -> bytes:
    """Well-formed JSON with one value, picked at random anywhere in the tree, replaced by a hostile one."""
    doc = json.loads(data)
    slots = []

    def collect(node):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            slots.append((node, key))
            collect(value)

    collect(doc)
    node, key = slots[int(rng.integers(len(slots)))]
    node[key] = HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))]
    return json.dumps(doc).encode()


# -- the commands -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    source: str  # which artifact is mutated
    command: str
    kind: str  # a MUTATIONS entry, or "json" (a hostile value in well-formed JSON)
    index: int

    @property
    def id(self) -> str:
        return f"{self.source}-{self.command}-{self.kind}-{self.index}"


SUFFIX = {"train": ".pth", "fused": ".pth", "onnx": ".onnx", "fp16": ".onnx", "baseline": ".json", "cache": ".json",
          "sidecar": ".json"}


def command_line(case: Case, bad: Path, art: dict[str, Path], out: Path) -> tuple[list, list[Path]]:
    """The command's arguments with the mutant ``bad`` in place, and the outputs it may write."""
    c = case.command
    if c == "fuse":
        return ["fuse", bad, "-o", out / "fused.pth", "--json"], [out / "fused.pth"]
    if c == "info":
        return ["info", bad, "--json"], []
    if c == "export":
        return ["export", bad, "--onnx", out / "out.onnx"], [out / "out.onnx"]
    if c == "verify":
        return ["verify", bad, "--json"], []
    if c == "verify-ckpt":  # the mutant is the checkpoint, the graph is good
        return ["verify", art["onnx"], "--checkpoint", bad, "--json"], []
    if c == "verify-with-ckpt":  # the mutant is the graph, the checkpoint is good
        return ["verify", bad, "--checkpoint", art["train"], "--json"], []
    if c == "quantize-fp16":
        return ["quantize", bad, "--fp16", "-o", out / "q.onnx", "--json"], [out / "q.onnx"]
    if c == "quantize-int8":
        return (["quantize", bad, "--int8", "--calib", CALIB, "--num-images", 16, "-o", out / "q.onnx", "--json"],
                [out / "q.onnx"])
    if c == "quantize-cache":  # the mutant is the calibration cache (read, and rewritten on success)
        return (["quantize", art["onnx"], "--int8", "--calib", CALIB, "--num-images", 16, "--calib-cache", bad,
                 "-o", out / "q.onnx", "--json"], [out / "q.onnx", bad])
    if c == "eval":
        return ["eval", bad, "--data", HELDOUT, "--json"], []
    if c == "bench":
        return ["bench", bad, *FAST_BENCH, "--json", out / "bench.json"], [out / "bench.json"]
    if c == "bench-baseline":
        return ["bench", art["onnx"], *FAST_BENCH, "--baseline", bad, "--json", out / "bench.json"], [out / "bench.json"]
    if c == "build-engine":
        return ["build-engine", bad, "-o", out / "e.engine", "--json"], [out / "e.engine"]
    if c == "eval-engine":  # the mutant is the sidecar of a good engine
        return ["eval", bad.with_suffix(""), "--data", HELDOUT, "--json"], []
    raise ValueError(c)


# How many mutants each (input, command) gets: fuse, verify and quantize most, the rest fewer.
PLAN = {
    "train": {"fuse": 18, "verify-ckpt": 6, "info": 3, "export": 3, "eval": 2, "bench": 2},
    "fused": {"verify-ckpt": 6, "export": 3, "info": 2, "eval": 2, "fuse": 2},
    "onnx": {"verify": 10, "verify-with-ckpt": 3, "quantize-fp16": 8, "quantize-int8": 6, "eval": 2, "bench": 2,
             "build-engine": 4},
    "fp16": {"verify": 3, "quantize-fp16": 3, "eval": 2, "build-engine": 2},
    "baseline": {"bench-baseline": 6},
    "cache": {"quantize-cache": 6},
    "sidecar": {"eval-engine": 6},
}
JSON_SOURCES = ("baseline", "cache", "sidecar")


def _cases() -> list[Case]:
    cases = []
    for source, commands in PLAN.items():
        for command, count in commands.items():
            for i in range(count):
                if source in JSON_SOURCES:  # half byte-level, half hostile values in well-formed JSON
                    kind = "json" if i % 2 else MUTATIONS[(i // 2) % len(MUTATIONS)]
                else:
                    kind = MUTATIONS[i % len(MUTATIONS)]
                cases.append(Case(source, command, kind, i))
    return cases


CASES = _cases()


def _rng(case: Case) -> np.random.Generator:
    # Stable across runs and independent of which cases run: seeded by the case's id.
    return np.random.default_rng([SEED, int.from_bytes(hashlib.sha256(case.id.encode()).digest()[:8], "little")])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_mutant(case, artifacts, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    original = artifacts[case.source].read_bytes()
    rng = _rng(case)
    data = mutate_json(original, rng) if case.kind == "json" else mutate(original, case.kind, rng)
    bad = src / (case.source + SUFFIX[case.source])
    if case.source == "sidecar":  # a good engine next to its mutated sidecar
        bad = src / (artifacts["engine"].name + ".json")
        shutil.copy(artifacts["engine"], bad.with_suffix(""))
    bad.write_bytes(data)
    args, outputs = command_line(case, bad, artifacts, out)
    for path in outputs:
        if not path.exists():
            path.write_bytes(SENTINEL)
    before = {path: path.read_bytes() for path in outputs}
    assert_user_outcome(invoke(*args), before, (src, out))


# -- hand-made hostile inputs -----------------------------------------------------------------
def _digits_graph(artifacts) -> onnx.ModelProto:
    return onnx.load(str(artifacts["onnx"]))


def _save_unchecked(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture()
def dangling_graph(artifacts, tmp_path) -> Path:
    """Well-formed ONNX whose first Conv reads a tensor that no node, input or initializer produces."""
    model = _digits_graph(artifacts)
    model.graph.node[0].input[0] = "nothing_produces_this"
    return _save_unchecked(model, tmp_path / "dangling.onnx")


def test_quantize_refuses_graph_reading_a_tensor_nothing_produces(dangling_graph, tmp_path):
    out = tmp_path / "q.onnx"
    out.write_bytes(SENTINEL)
    for precision in (("--fp16",), ("--int8", "--calib", CALIB, "--num-images", 16)):
        result = invoke("quantize", dangling_graph, *precision, "-o", out)
        assert_user_outcome(result, {out: SENTINEL}, (tmp_path,))
        assert result.exit_code == 1 and "dangling.onnx is not a valid ONNX graph" in result.stderr
        assert "nothing_produces_this" in result.stderr


@pytest.mark.parametrize("command", ["verify", "eval", "bench", "build-engine"])
def test_dangling_tensor_graph_is_refused_by_every_reader(dangling_graph, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    args = {
        "verify": ["verify", dangling_graph],
        "eval": ["eval", dangling_graph, "--data", HELDOUT],
        "bench": ["bench", dangling_graph, *FAST_BENCH],
        "build-engine": ["build-engine", dangling_graph, "-o", out / "e.engine"],
    }[command]
    result = invoke(*args)
    assert_user_outcome(result, folders=(tmp_path, out))
    assert result.exit_code == 1 and "dangling.onnx" in result.stderr


def _relu_graph(path: Path, inputs: bool = True) -> Path:
    """A valid ONNX graph that is not RepVGG at all: one Relu (or, without inputs, one Constant)."""
    if inputs:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 32, 32])
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "relu", [x], [y])
    else:
        value = helper.make_tensor("v", TensorProto.FLOAT, [1, 10], np.zeros(10, np.float32))
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])
        graph = helper.make_graph([helper.make_node("Constant", [], ["y"], name="const", value=value)], "noinput", [], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _save_unchecked(model, path)


RECIPE = ("--mean", "0.3,0.3,0.3", "--std", "0.3,0.3,0.3", "--input-size", "32", "--allow-upscale")


@pytest.mark.parametrize("graph", ["no-inputs", "single-relu"])
@pytest.mark.parametrize("command", ["verify", "quantize-fp16", "quantize-int8", "eval", "bench", "build-engine"])
def test_graphs_that_are_not_repvgg(tmp_path, graph, command):
    path = _relu_graph(tmp_path / f"{graph}.onnx", inputs=graph == "single-relu")
    out = tmp_path / "out"
    out.mkdir()
    q = out / "q.onnx"
    q.write_bytes(SENTINEL)
    args = {
        "verify": ["verify", path, "--json"],
        "quantize-fp16": ["quantize", path, "--fp16", "-o", q, *RECIPE, "--json"],
        "quantize-int8": ["quantize", path, "--int8", "--calib", CALIB, "--num-images", 16, "-o", q, *RECIPE, "--json"],
        "eval": ["eval", path, "--data", HELDOUT, *RECIPE, "--json"],
        "bench": ["bench", path, *FAST_BENCH],
        "build-engine": ["build-engine", path, "-o", out / "e.engine"],
    }[command]
    result = invoke(*args)
    assert_user_outcome(result, {q: SENTINEL} if command.startswith("quantize") else {}, (tmp_path, out))
    if graph == "no-inputs":
        assert result.exit_code == 1 and "no inputs" in result.stderr
    elif command == "verify":
        assert result.exit_code == 4


def _train_state() -> dict[str, torch.Tensor]:
    return torch.load(DIGITS_CKPT, weights_only=True)["state_dict"]


@pytest.mark.parametrize("how", ["int64", "0-d", "bool", "complex"])
@pytest.mark.parametrize("command", ["fuse", "info", "export", "verify-ckpt", "eval", "bench"])
def test_checkpoint_with_right_names_but_wrong_tensors(artifacts, tmp_path, how, command):
    state = _train_state()
    convert = {
        "int64": lambda t: t.to(torch.int64),
        "0-d": lambda t: t.flatten()[0].clone(),
        "bool": lambda t: t > 0,
        "complex": lambda t: t.to(torch.complex64),
    }[how]
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {k: convert(v) if v.is_floating_point() else v for k, v in state.items()}}, bad)
    out = tmp_path / "out.pth"
    out.write_bytes(SENTINEL)
    args = {
        "fuse": ["fuse", bad, "-o", out],
        "info": ["info", bad],
        "export": ["export", bad, "--onnx", tmp_path / "x.onnx"],
        "verify-ckpt": ["verify", artifacts["onnx"], "--checkpoint", bad],
        "eval": ["eval", bad, "--data", HELDOUT],
        "bench": ["bench", bad, *FAST_BENCH],
    }[command]
    result = invoke(*args)
    assert_user_outcome(result, {out: SENTINEL}, (tmp_path,))
    assert result.exit_code == 1, result.stderr
    assert not (tmp_path / "x.onnx").exists()


def _safetensors_bytes(artifacts) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in _train_state().items()})


def _corrupt_header(data: bytes, how: str) -> bytes:
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    body = data[8 + length:]
    name = next(k for k in header if k != "__metadata__")
    if how == "huge-length":
        return struct.pack("<Q", 2**62) + data[8:]
    if how == "length-past-end":
        return struct.pack("<Q", len(data)) + data[8:]
    if how == "not-json":
        return data[:8] + b"{" * length + body
    if how == "offsets-past-end":
        header[name]["data_offsets"] = [0, len(body) * 4]
    elif how == "bad-dtype":
        header[name]["dtype"] = "F99"
    elif how == "shape-mismatch":
        header[name]["shape"] = [7, 7, 7]
    elif how == "meta-not-json":
        header["__metadata__"] = {"rvdeploy": "{not json"}
    elif how == "meta-a-list":
        header["__metadata__"] = {"rvdeploy": "[1, 2]"}
    elif how == "meta-bad-spec":
        header["__metadata__"] = {"rvdeploy": json.dumps({"arch_spec": {"depths": "x"}, "preprocess": 7})}
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@pytest.mark.parametrize("how", ["huge-length", "length-past-end", "not-json", "offsets-past-end", "bad-dtype",
                                 "shape-mismatch", "meta-not-json", "meta-a-list", "meta-bad-spec"])
@pytest.mark.parametrize("command", ["fuse", "info", "export"])
def test_safetensors_with_corrupt_header(artifacts, tmp_path, how, command):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_corrupt_header(_safetensors_bytes(artifacts), how))
    out = tmp_path / "out.onnx"
    out.write_bytes(SENTINEL)
    args = {
        "fuse": ["fuse", bad, "-o", tmp_path / "fused.safetensors"],
        "info": ["info", bad, "--json"],
        "export": ["export", bad, "--onnx", out],
    }[command]
    result = invoke(*args)
    assert_user_outcome(result, {out: SENTINEL}, (tmp_path,))


def _fused_safetensors_with_meta(artifacts, tmp_path, meta) -> Path:
    """A fused safetensors checkpoint whose rvdeploy header metadata is ``meta`` (JSON)."""
    from safetensors.torch import save_file

    state = torch.load(artifacts["fused"], weights_only=True)["state_dict"]
    path = tmp_path / "fused.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"rvdeploy": json.dumps(meta)})
    return path


@pytest.mark.parametrize("meta", [[1, 2], "text", {"arch_spec": "x"}, {"preprocess": {"input_size": 32, "resize": 1e400,
                                                                                     "mean": [0] * 3, "std": [1] * 3}}],
                         ids=["list", "string", "spec-a-string", "resize-infinite"])
@pytest.mark.parametrize("command", ["info", "export", "eval"])
def test_fused_safetensors_with_hostile_metadata(artifacts, tmp_path, meta, command):
    path = _fused_safetensors_with_meta(artifacts, tmp_path, meta)
    args = {
        "info": ["info", path, "--json"],
        "export": ["export", path, "--onnx", tmp_path / "x.onnx"],
        "eval": ["eval", path, "--data", HELDOUT, *RECIPE],
    }[command]
    assert_user_outcome(invoke(*args), folders=(tmp_path,))


# -- image folders with broken images ----------------------------------------------------------
def _png(path: Path, source: Path, how: str) -> None:
    data = source.read_bytes()
    path.write_bytes({"good": data, "truncated": data[: len(data) // 2], "zero-byte": b""}[how])


@pytest.fixture()
def broken_folders(tmp_path) -> dict[str, Path]:
    """Calibration and labelled folders with a truncated and a zero-byte PNG among good ones, and
    ones where every image is broken."""
    good = sorted(CALIB.glob("*.png"))
    folders = {name: tmp_path / name for name in ("calib-mixed", "calib-broken", "val-mixed", "val-broken")}
    for folder in folders.values():
        folder.mkdir()
    for i, image in enumerate(good[:6]):
        _png(folders["calib-mixed"] / f"{i}.png", image, "good")
    _png(folders["calib-mixed"] / "truncated.png", good[0], "truncated")
    _png(folders["calib-mixed"] / "zero.png", good[0], "zero-byte")
    _png(folders["calib-broken"] / "truncated.png", good[0], "truncated")
    _png(folders["calib-broken"] / "zero.png", good[0], "zero-byte")
    for label in sorted(p.name for p in HELDOUT.iterdir()):
        for name in ("val-mixed", "val-broken"):
            (folders[name] / label).mkdir()
        first = sorted((HELDOUT / label).glob("*.png"))[0]
        _png(folders["val-mixed"] / label / "good.png", first, "good")
        _png(folders["val-broken"] / label / "truncated.png", first, "truncated")
    _png(folders["val-mixed"] / "0" / "truncated.png", good[0], "truncated")
    _png(folders["val-mixed"] / "0" / "zero.png", good[0], "zero-byte")
    _png(folders["val-broken"] / "0" / "zero.png", good[0], "zero-byte")
    return folders


@pytest.mark.parametrize("folder", ["mixed", "broken"])
@pytest.mark.parametrize("command", ["quantize-fp16", "quantize-int8", "quantize-int8-guard", "eval", "eval-ckpt"])
def test_image_folders_with_truncated_and_empty_pngs(artifacts, broken_folders, tmp_path, folder, command):
    calib, val = broken_folders[f"calib-{folder}"], broken_folders[f"val-{folder}"]
    out = tmp_path / "q.onnx"
    out.write_bytes(SENTINEL)
    args = {
        "quantize-fp16": ["quantize", artifacts["onnx"], "--fp16", "--calib", calib, "-o", out, "--json"],
        "quantize-int8": ["quantize", artifacts["onnx"], "--int8", "--calib", calib, "-o", out, "--json"],
        "quantize-int8-guard": ["quantize", artifacts["onnx"], "--int8", "--calib", CALIB, "--num-images", 16,
                                "--val", val, "--max-top1-drop", 1, "-o", out, "--json"],
        "eval": ["eval", artifacts["onnx"], "--data", val, "--json"],
        "eval-ckpt": ["eval", artifacts["train"], "--data", val, "--json"],
    }[command]
    result = invoke(*args)
    assert_user_outcome(result, {out: SENTINEL}, (tmp_path,))
    if folder == "mixed":
        assert result.exit_code == 0, result.stderr
    else:
        assert result.exit_code == 1, result.stderr
