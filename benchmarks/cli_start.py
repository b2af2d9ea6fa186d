"""How fast the command line answers: whole processes, as a shell or CI loop runs them.

Times `rvdeploy --help`, `rvdeploy fuse --help`, `rvdeploy quantize --help` and `rvdeploy --version`
(median of --repeat runs each, after one warm-up run that fills the OS file cache), and lists the
heavy libraries a `--help` imports. Goal: ≤ 0.5 s each. Run:
    .venv/bin/python benchmarks/cli_start.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from results_io import time_command, write_results

RVDEPLOY = Path(sys.executable).with_name("rvdeploy")
COMMANDS = (["--help"], ["fuse", "--help"], ["quantize", "--help"], ["bench", "--help"], ["--version"])
HEAVY = ("torch", "onnx", "onnxruntime", "tensorrt_rtx", "matplotlib", "onnx_graphsurgeon")
GOAL_S = 0.5


def heavy_imports(args: list[str]) -> list[str]:
    """The heavy libraries loaded by the time ``rvdeploy ARGS`` exits."""
    probe = ("import sys\nfrom rvdeploy.cli import main\nsys.argv[0] = 'rvdeploy'\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             f"print('loaded:', *(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe, *args], check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1].split()[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for command in COMMANDS:
        full = [str(RVDEPLOY), *command]
        time_command(full, 1)  # warm the file cache
        seconds = statistics.median(time_command(full, args.repeat))
        rows.append({"command": "rvdeploy " + " ".join(command), "median_s": seconds,
                     "goal": "met" if seconds <= GOAL_S else "missed", "heavy_imports": " ".join(heavy_imports(command)) or "none"})
        print(rows[-1], flush=True)
    columns = [("command", "command"), ("median_s", f"median s (of {args.repeat})"), ("goal", f"goal ≤ {GOAL_S} s"),
               ("heavy_imports", "heavy libraries imported")]
    print(write_results("cli_start", rows, columns,
                        "Whole processes (Python start-up included), after one warm-up run each. Commands import their "
                        "stage only when they run: rvdeploy.cli builds its options from light modules alone."))


if __name__ == "__main__":
    main()
