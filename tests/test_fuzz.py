"""Seeded fuzzing of every command that reads a file, and hand-made hostile inputs.

Mutants of the shipped checkpoint, its fused checkpoint, its ONNX export, its FP16 graph, a bench
baseline, a calibration cache, an engine sidecar and the graphs' rvdeploy metadata go through the
CLI. Whatever the bytes, a command either succeeds or says in one ``error: ...`` line on stderr
what is wrong, with a user error's exit status: never a traceback, never "internal error" (exit
70, a bug). An output that existed before is either untouched (failure) or replaced by a complete
file (success), and no temporary file is left behind.

Two outcomes are verdicts rather than errors: ``verify`` exit 4 is its report on stdout, and
``bench`` exit 5 (a regression) has measured and written its results. bench's "timing ..."
progress lines on stderr are not part of an error line.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
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


def assert_user_outcome(result, outputs: dict[Path, bytes] | None = None, folders: tuple[Path, ...] = ()) -> None:
    """Exit 0 or a user error in one line; outputs untouched on failure, complete on success; no temp files."""
    outputs = outputs or {}
    text = result.stdout + result.stderr
    assert "Traceback" not in text and "internal error" not in text, text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 0 or result.exit_code in USER_EXITS, f"exit {result.exit_code}: {text}"
    # bench's "timing ..." progress lines go to stderr too; they are not part of an error
    errors = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("timing ")]
    if result.exit_code == 4 and not errors:  # verify's verdict: its report on stdout, the violations listed
        assert not json.loads(result.stdout)["ok"]
    elif result.exit_code != 0:
        assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    for path, before in outputs.items():
        if result.exit_code == 0 or (result.exit_code == 5 and path.read_bytes() != before):
            # success, or a latency regression: the bench ran and its results were written
            assert complete(path), f"{path.name} is not a complete output"
        else:
            assert path.read_bytes() == before, f"{path.name} was changed by a failed command"
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


def mutate_onnx_metadata(data: bytes, rng: np.random.Generator) -> bytes:
    """The graph with one value inside one of its rvdeploy metadata entries (or the whole entry) made hostile."""
    model = onnx.load_from_string(data)
    props = [p for p in model.metadata_props if p.key.startswith("rvdeploy.")]
    prop = props[int(rng.integers(len(props)))]
    holder = [json.loads(prop.value)]  # a slot for the whole value too
    prop.value = json.dumps(json.loads(mutate_json(json.dumps(holder).encode(), rng))[0])
    return model.SerializeToString()


# -- the commands -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    source: str  # which artifact is mutated
    command: str
    kind: str  # a MUTATIONS entry, "json" (a hostile value in well-formed JSON) or "meta" (the same in ONNX metadata)
    index: int

    @property
    def id(self) -> str:
        return f"{self.source}-{self.command}-{self.kind}-{self.index}"


SUFFIX = {"train": ".pth", "fused": ".pth", "onnx": ".onnx", "fp16": ".onnx", "baseline": ".json", "cache": ".json",
          "sidecar": ".json", "onnx-meta": ".onnx", "fp16-meta": ".onnx"}
META_SOURCES = {"onnx-meta": "onnx", "fp16-meta": "fp16"}  # the graph whose rvdeploy metadata is made hostile


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
    if c == "quantize-cache":  # the mutant is the calibration cache (read; rewritten when it lacks this entry)
        return (["quantize", art["onnx"], "--int8", "--calib", CALIB, "--num-images", 16, "--calib-cache", bad,
                 "-o", out / "q.onnx", "--json"], [out / "q.onnx", bad])
    if c == "eval":
        return ["eval", bad, "--data", HELDOUT, "--json"], []
    if c == "bench":
        return ["bench", bad, *FAST_BENCH, "--json", out / "bench.json"], [out / "bench.json"]
    if c == "bench-baseline":  # a generous limit: only a hostile baseline decides the exit status
        return (["bench", art["onnx"], *FAST_BENCH, "--baseline", bad, "--max-regression", 1e6, "--json", out / "bench.json"],
                [out / "bench.json"])
    if c == "build-engine":
        return ["build-engine", bad, "-o", out / "e.engine", "--json"], [out / "e.engine"]
    if c == "eval-engine":  # the mutant is the sidecar of a good engine
        return ["eval", bad.with_suffix(""), "--data", HELDOUT, "--json"], []
    if c == "rebuild-engine":  # the same, where build-engine decides whether the engine is up to date
        return ["build-engine", art["onnx"], "-o", bad.with_suffix(""), "--json"], [bad.with_suffix(""), bad]
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
    "sidecar": {"eval-engine": 6, "rebuild-engine": 4},
    # the export's rvdeploy metadata with a hostile value: later stages read their recipe from it
    "onnx-meta": {"verify": 4, "quantize-fp16": 3, "quantize-int8": 3, "eval": 3, "bench": 2, "build-engine": 2},
    "fp16-meta": {"verify": 2, "eval": 3, "bench": 2, "build-engine": 2},
}
JSON_SOURCES = ("baseline", "cache", "sidecar")


def _cases() -> list[Case]:
    cases = []
    for source, commands in PLAN.items():
        for command, count in commands.items():
            for i in range(count):
                if source in META_SOURCES:
                    kind = "meta"
                elif source in JSON_SOURCES:  # half byte-level, half hostile values in well-formed JSON
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
    original = artifacts[META_SOURCES.get(case.source, case.source)].read_bytes()
    rng = _rng(case)
    if case.kind == "json":
        data = mutate_json(original, rng)
    elif case.kind == "meta":
        data = mutate_onnx_metadata(original, rng)
    else:
        data = mutate(original, case.kind, rng)
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


def _graph_reader_args(command: str, graph, out_dir) -> list:
    """The arguments of a command that reads an ONNX graph (its outputs in ``out_dir``)."""
    return {
        "verify": ["verify", graph],
        "eval": ["eval", graph, "--data", HELDOUT],
        "bench": ["bench", graph, *FAST_BENCH],
        "build-engine": ["build-engine", graph, "-o", out_dir / "e.engine"],
    }[command]


@pytest.mark.parametrize("command", ["verify", "eval", "bench", "build-engine"])
def test_dangling_tensor_graph_is_refused_by_every_reader(dangling_graph, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    result = invoke(*_graph_reader_args(command, dangling_graph, out))
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
    """Was: internal error IndexError (eval, bench: no inputs), ValueError: operands could not be broadcast
    (eval: a Relu's 4-d output as logits), InvalidArgument (bench: 224x224 probes into a 32x32 graph)."""
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
        assert result.exit_code == 1 and "no-inputs.onnx" in result.stderr
    elif command == "verify":  # not an rvdeploy export: checker, ONNX Runtime load, and nothing to fold
        report = json.loads(result.stdout)
        assert result.exit_code == 0 and report["foreign"] and report["foldable_groups"] == 0


def _train_state() -> dict[str, torch.Tensor]:
    return torch.load(DIGITS_CKPT, weights_only=True)["state_dict"]


@pytest.mark.parametrize("how", ["int64", "0-d", "bool", "complex"])
@pytest.mark.parametrize("command", ["fuse", "info", "export", "verify-ckpt", "eval", "bench"])
def test_checkpoint_with_right_names_but_wrong_tensors(artifacts, tmp_path, how, command):
    """Was: internal error RuntimeError: Error(s) in loading state_dict (int64, bool) or expected scalar
    type Double but found ComplexFloat (complex), in every command that builds the net."""
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
    if how != "0-d":  # a 0-d tensor is mis-shaped; the others are refused by dtype, naming the file
        assert "bad.pth" in result.stderr and "not floating point" in result.stderr, result.stderr
    assert not (tmp_path / "x.onnx").exists()


def _safetensors_bytes() -> bytes:
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
def test_safetensors_with_corrupt_header(tmp_path, how, command):
    """Was (meta-a-list): internal error AttributeError: 'list' object has no attribute 'get'."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_corrupt_header(_safetensors_bytes(), how))
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
    """Was: internal error TypeError / ValueError (dict() of a list or a string), OverflowError (int(inf))."""
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
    """Broken images among good ones are skipped. Only broken ones was: internal error ValueError: need at
    least one array to concatenate (eval, the accuracy guard), No data is collected (INT8 calibration),
    and exit 0 with FP16 ranges "checked" on no image at all."""
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
    assert_user_outcome(result, {out: SENTINEL} if command.startswith("quantize") else {}, (tmp_path,))
    if folder == "mixed":
        assert result.exit_code == 0, result.stderr
    else:
        assert result.exit_code == 1, result.stderr


# -- the internal errors the fuzz found, each by name --------------------------------------------
def _with_metadata_bytes(artifacts, tmp_path, where: str) -> Path:
    """The export with one string that is not UTF-8 (protobuf reads such a field back as bytes)."""
    model = _digits_graph(artifacts)
    if where == "node-name":
        model.graph.node[0].name = "MARKERXX"
    elif where == "tensor-name":
        old = model.graph.initializer[0].name
        model.graph.initializer[0].name = "MARKERXX"
        for node in model.graph.node:
            node.input[:] = ["MARKERXX" if name == old else name for name in node.input]
    elif where == "metadata-key":
        model.metadata_props[0].key = "rvdeploy.MARKERXX"
    else:
        model.metadata_props[0].value = "MARKERXX"
    path = tmp_path / f"{where}.onnx"
    path.write_bytes(model.SerializeToString().replace(b"MARKERXX", b"MARKER\xff\xfe"))
    return path


@pytest.mark.parametrize("where", ["node-name", "tensor-name", "metadata-key", "metadata-value"])
@pytest.mark.parametrize("command", ["verify", "quantize-fp16", "quantize-int8", "eval", "build-engine"])
def test_onnx_strings_that_are_not_utf8(artifacts, tmp_path, where, command):
    """Was: internal error UnicodeDecodeError / TypeError (str vs. bytes) in quantize, verify, eval, build-engine."""
    path = _with_metadata_bytes(artifacts, tmp_path, where)
    out = tmp_path / "q.onnx"
    out.write_bytes(SENTINEL)
    args = {
        "verify": ["verify", path],
        "quantize-fp16": ["quantize", path, "--fp16", "-o", out],
        "quantize-int8": ["quantize", path, "--int8", "--calib", CALIB, "--num-images", 16, "-o", out, "--json"],
        "eval": ["eval", path, "--data", HELDOUT, "--json"],
        "build-engine": ["build-engine", path, "-o", tmp_path / "e.engine"],
    }[command]
    result = invoke(*args)
    assert_user_outcome(result, {out: SENTINEL} if command.startswith("quantize") else {}, (tmp_path,))
    if command != "eval" or where.startswith("metadata"):  # ONNX Runtime runs a graph whose names are bytes
        assert result.exit_code == 1 and "is not UTF-8 text" in result.stderr, result.stderr


@pytest.mark.parametrize("entry", ["fp32_nodes=1", 'precision=["fp16"]', "num_classes=\"10\"", "input_size=7"])
@pytest.mark.parametrize("command", ["verify", "eval", "bench", "build-engine"])
def test_onnx_metadata_of_the_wrong_type(artifacts, tmp_path, entry, command):
    """Was: internal error TypeError (len() of an int) in build-engine, an unrenderable table in bench,
    TypeError (* of an int) in verify."""
    key, value = entry.split("=")
    model = onnx.load(str(artifacts["fp16"]))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, f"rvdeploy.{key}": value})
    path = _save_unchecked(model, tmp_path / "typed.onnx")
    result = invoke(*_graph_reader_args(command, path, tmp_path))
    assert_user_outcome(result, folders=(tmp_path,))
    assert result.exit_code == 1 and f"rvdeploy.{key} is {value}, not a JSON" in result.stderr, result.stderr


def test_eval_with_an_input_size_the_graph_does_not_take(artifacts, tmp_path):
    """Was: internal error InvalidArgument (ONNX Runtime: Got invalid dimensions for input)."""
    result = invoke("eval", artifacts["onnx"], "--data", HELDOUT, "--mean", "0.3,0.3,0.3", "--std", "0.3,0.3,0.3",
                    "--input-size", 48, "--allow-upscale", "--json")
    assert_user_outcome(result)
    assert result.exit_code == 1 and "digits.onnx takes 3x32x32 (CxHxW) inputs, not 3x48x48" in result.stderr


@pytest.mark.parametrize("field, value, message", [
    # Was: internal error TypeError: unhashable type: 'dict' (the gate matches rows by these values).
    ("variant", {"a": None}, "baseline.json: result 0 has a variant that is not a string"),
    # Was: the results JSON written, then exit 1: a failed command that replaced an existing output.
    ("model", "another-model", "no result matches the baseline"),
], ids=["row-key-not-a-string", "matches-nothing"])
def test_bad_bench_baseline_leaves_the_results_json_untouched(artifacts, tmp_path, field, value, message):
    baseline = json.loads(artifacts["baseline"].read_text())
    baseline["results"][0][field] = value
    bad = tmp_path / "baseline.json"
    bad.write_text(json.dumps(baseline))
    out = tmp_path / "bench.json"
    out.write_bytes(SENTINEL)
    result = invoke("bench", artifacts["onnx"], *FAST_BENCH, "--baseline", bad, "--json", out)
    assert_user_outcome(result, {out: SENTINEL}, (tmp_path,))
    assert result.exit_code == 1 and message in result.stderr, result.stderr


@pytest.mark.parametrize("damage", ["range-a-dict", "range-infinite", "method-other", "no-data", "not-an-object",
                                    "tensor-missing"])
def test_calibration_cache_with_a_damaged_entry(artifacts, tmp_path, damage):
    """Was: internal error TypeError: float() argument must be ... 'dict', or KeyError (a tensor without a
    range, --target onnxruntime), inside onnxruntime's quantizer."""
    cache = json.loads(artifacts["cache"].read_text())
    key, entry = next(iter(cache["entries"].items()))  # one of the graphs calibrated (equalized or not: both are read)
    first = next(iter(entry["data"].values()))
    if damage == "range-a-dict":
        first["lowest"]["data"] = [{}]
    elif damage == "range-infinite":
        first["highest"]["data"] = [1e39]  # beyond float32
    elif damage == "method-other":
        entry["calibration_method"]["value"] = "CalibrationMethod.Entropy"
    elif damage == "no-data":
        del entry["data"]
    elif damage == "tensor-missing":
        del entry["data"][next(iter(entry["data"]))]
    else:
        cache["entries"][key] = [entry]
    bad = tmp_path / "cache.json"
    bad.write_text(json.dumps(cache))
    before = bad.read_bytes()
    out = tmp_path / "q.onnx"
    out.write_bytes(SENTINEL)
    result = invoke("quantize", artifacts["onnx"], "--int8", "--target", "onnxruntime", "--calib", CALIB, "--num-images", 16,
                    "--calib-cache", bad, "-o", out, "--json")
    assert_user_outcome(result, {out: SENTINEL, bad: before}, (tmp_path,))
    assert result.exit_code == 1 and "calibration cache" in result.stderr and "cache.json" in result.stderr


@pytest.mark.parametrize("field", ["gpu=\"x\"", "gpu={\"name\": 1}", "model_metadata=[]", "precision=3"])
def test_engine_sidecar_with_malformed_fields(artifacts, tmp_path, field):
    """The runner reads these after the sidecar check; on a GPU a string for ``gpu`` was an internal
    error (AttributeError: 'str' object has no attribute 'get'). Refused before the GPU is needed."""
    key, value = field.split("=", 1)
    engine = tmp_path / "e.engine"
    shutil.copy(artifacts["engine"], engine)
    sidecar = json.loads(artifacts["sidecar"].read_text())
    sidecar[key] = json.loads(value)
    Path(f"{engine}.json").write_text(json.dumps(sidecar))
    result = invoke("eval", engine, "--data", HELDOUT)
    assert_user_outcome(result, folders=(tmp_path,))
    assert result.exit_code == 1 and "e.engine.json is malformed" in result.stderr, result.stderr


@pytest.mark.parametrize("weights", ["nan", "overflowing"])
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_quantize_graph_whose_weights_or_activations_are_not_finite(artifacts, tmp_path, weights, precision):
    """Was: internal error AssertionError: scale issue (onnxruntime's quantizer), found by the fuzz: a span
    duplicated into the ONNX export's weights made one of them NaN."""
    model = _digits_graph(artifacts)
    init = next(i for i in model.graph.initializer if i.name == "linear.weight")
    values = onnx.numpy_helper.to_array(init).copy()
    if weights == "nan":
        values[0, 0] = np.nan
    else:  # finite weights whose activations overflow float32
        values = (values.astype(np.float64) * (3e38 / float(np.abs(values).max()))).astype(np.float32)
    init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    path = _save_unchecked(model, tmp_path / f"{weights}.onnx")
    out = tmp_path / "q.onnx"
    out.write_bytes(SENTINEL)
    args = ["--fp16"] if precision == "fp16" else ["--int8", "--calib", CALIB, "--num-images", 16]
    result = invoke("quantize", path, *args, "-o", out, "--json")
    assert_user_outcome(result, {out: SENTINEL}, (tmp_path,))
    if weights == "nan":
        assert result.exit_code == 1 and "weight linear.weight has 1 NaN or infinite values" in result.stderr
    elif precision == "int8":
        assert result.exit_code == 1 and "logits" in result.stderr and "take NaN or infinite values" in result.stderr, result.stderr


@pytest.fixture()
def unrunnable_graph(artifacts, tmp_path) -> Path:
    """A valid graph ONNX Runtime loads but cannot run: a Conv dilation that contradicts its shapes
    (found by the fuzz: a flipped byte in the FP16 graph's attributes)."""
    model = _digits_graph(artifacts)
    conv = next(n for n in model.graph.node if n.name == "/stage4/stage4.0/rbr_reparam/Conv")
    next(a for a in conv.attribute if a.name == "dilations").ints[1] = 84
    return _save_unchecked(model, tmp_path / "unrunnable.onnx")


@pytest.mark.parametrize("command", ["eval", "bench", "verify-with-ckpt", "quantize-fp16", "quantize-int8"])
def test_graph_onnx_runtime_loads_but_cannot_run(unrunnable_graph, tmp_path, command):
    """Was: internal error InvalidArgument (ONNX Runtime: Non-zero status code returned while running Conv node)."""
    out = tmp_path / "q.onnx"
    out.write_bytes(SENTINEL)
    args = {
        "eval": ["eval", unrunnable_graph, "--data", HELDOUT, "--json"],
        "bench": ["bench", unrunnable_graph, *FAST_BENCH],
        "verify-with-ckpt": ["verify", unrunnable_graph, "--checkpoint", DIGITS_CKPT, "--json"],
        "quantize-fp16": ["quantize", unrunnable_graph, "--fp16", "-o", out, "--json"],
        "quantize-int8": ["quantize", unrunnable_graph, "--int8", "--calib", CALIB, "--num-images", 16, "-o", out, "--json"],
    }[command]
    result = invoke(*args)
    assert_user_outcome(result, {out: SENTINEL}, (tmp_path,))
    assert result.exit_code == 1 and "ONNX Runtime cannot run" in result.stderr and "unrunnable.onnx" in result.stderr


def test_console_script_error_is_one_line_even_when_onnx_runtime_logs(unrunnable_graph, tmp_path):
    """ONNX Runtime logs its errors on the process's stderr by itself; only a real process shows that."""
    script = Path(sys.executable).with_name("rvdeploy")
    proc = subprocess.run([str(script), "quantize", str(unrunnable_graph), "--int8", "--calib", str(CALIB),
                           "--num-images", "16", "-o", str(tmp_path / "q.onnx"), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ONNX Runtime cannot run"), proc.stderr


def test_onnx_metadata_architecture_with_zero_groups(artifacts, tmp_path):
    """Was: internal error ZeroDivisionError: integer modulo by zero (verify building the architecture)."""
    model = _digits_graph(artifacts)
    prop = next(p for p in model.metadata_props if p.key == "rvdeploy.arch_spec")
    spec = json.loads(prop.value)
    spec["block_groups"][-1] = 0
    prop.value = json.dumps(spec)
    result = invoke("verify", _save_unchecked(model, tmp_path / "groups.onnx"))
    assert_user_outcome(result)
    assert result.exit_code == 1 and "groups.onnx: its rvdeploy metadata is malformed" in result.stderr, result.stderr
    assert "group counts must be positive" in result.stderr


@pytest.mark.parametrize("char", ["\n", "\f", "\x1c"])
def test_error_naming_a_key_with_a_line_break_is_one_line(tmp_path, char):
    """Found by the fuzz: a flipped byte made a tensor key 'stage0.\\fbr_1x1...'; the error naming it
    was two lines (str.splitlines breaks at form feeds and file separators too)."""
    state = _train_state()
    state[f"stage0.{char}br_1x1.bn.running_mean"] = state.pop("stage0.rbr_1x1.bn.running_mean")
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": state}, bad)
    result = invoke("fuse", bad, "-o", tmp_path / "out.pth")
    assert_user_outcome(result, folders=(tmp_path,))
    assert result.exit_code == 1 and repr(char)[1:-1] in result.stderr, result.stderr
