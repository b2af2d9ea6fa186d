"""The house rules that keep the package extensible: no import cycle, no oversized module."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rvdeploy"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every rvdeploy module → the rvdeploy modules it imports, at module level or inside functions."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # "from pkg import sub" imports the submodule sub when there is one.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_detector_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    graph = import_graph()
    assert "rvdeploy.runners.base" in graph["rvdeploy.runners.tensorrt_runner"]  # the graph sees real edges
    assert cycles(graph) == []


def test_no_module_over_the_size_limit():
    sizes = {_module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_help_loads_no_stage_library():
    """`rvdeploy --help` and a command's --help answer without torch, onnx, ONNX Runtime, TensorRT-RTX or
    matplotlib: commands import their stage when they run (benchmarks/cli_start.py times it)."""
    import subprocess
    import sys

    heavy = ("torch", "onnx", "onnxruntime", "tensorrt_rtx", "matplotlib", "onnx_graphsurgeon")
    for args in ([], ["fuse"], ["quantize"], ["bench"], ["build-engine"], ["eval"]):
        probe = ("import sys\nfrom rvdeploy.cli import main\nsys.argv[0] = 'rvdeploy'\n"
                 "try:\n    main()\nexcept SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
                 f"print('loaded:', *(m for m in {heavy!r} if m in sys.modules))")
        result = subprocess.run([sys.executable, "-c", probe, *args, "--help"], capture_output=True, text=True, check=True)
        assert "Usage:" in result.stdout
        assert result.stdout.strip().splitlines()[-1] == "loaded:", (args, result.stdout.strip().splitlines()[-1])


def test_a_graph_fold_loads_no_torch(tmp_path):
    """`rvdeploy fuse MODEL.onnx` folds, proves and writes without importing torch (its proof runs in
    numpy): a user with only the ONNX file does not pay torch's start-up."""
    import subprocess
    import sys

    source = Path(__file__).resolve().parents[1] / "models" / "foreign" / "mobileone_tiny.onnx"
    probe = ("import sys\nfrom rvdeploy.cli import main\nsys.argv[0] = 'rvdeploy'\n"
             "try:\n    main()\nexcept SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
             "print('torch loaded:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe, "fuse", str(source), "-o", str(tmp_path / "plain.onnx")],
                            capture_output=True, text=True, check=True)
    assert "self-check" in result.stdout and "passed" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "torch loaded: False"
