"""Results files for the benchmark scripts: JSON for machines, markdown for people.

Each file records the date, the machine and the command that produced it.
"""

from __future__ import annotations

import datetime
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rvdeploy.machine import describe_machine

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(name: str, rows: list[dict], columns: list[tuple[str, str]], notes: str = "") -> Path:
    """Write ``results/<name>.json`` and ``results/<name>.md``; ``columns`` are (key, heading)."""
    RESULTS.mkdir(exist_ok=True)
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "machine": describe_machine(),
    }
    (RESULTS / f"{name}.json").write_text(json.dumps({**header, "results": rows}, indent=2) + "\n")
    machine = header["machine"]
    lines = [
        f"# {name}",
        "",
        f"- date: {header['date']}",
        f"- command: `{header['command']}`",
        f"- machine: {machine['cpu']}, {machine['cpu_cores']} cores, torch {machine['versions'].get('torch')} "
        f"({machine['torch_threads']} threads)" + (f", GPU {machine['gpu']}" if "gpu" in machine else ""),
        "",
        "| " + " | ".join(h for _, h in columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k)) for k, _ in columns) + " |")
    if notes:
        lines += ["", notes.strip()]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def time_command(command: list[str], repeat: int) -> list[float]:
    """Wall seconds of ``command`` (Python start-up included, as a user runs it), ``repeat`` times."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)
