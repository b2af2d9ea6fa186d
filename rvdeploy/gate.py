"""The latency regression gate: compare a bench report with a baseline, normalised across machines.

Rows match by model, variant, backend, precision and batch; a p50 slower than the allowed percentage
is a regression. When the baseline comes from another machine (``auto``) or always, latencies are
divided by the reference workload's, timed in the same run (:mod:`rvdeploy.timing`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from rvdeploy.errors import RvdeployError

NORMALIZE_MODES = ("auto", "always", "never")


class BaselineError(RvdeployError):
    """A baseline that cannot be read or compared."""


MATCH_KEYS = ("model", "variant", "backend", "precision", "batch")


@dataclass
class Delta:
    key: tuple
    baseline_p50: float
    current_p50: float
    change_pct: float  # positive: slower
    normalized: bool

    @property
    def name(self) -> str:
        return " / ".join(str(k) for k in self.key)


@dataclass
class GateResult:
    deltas: list[Delta]
    normalized: bool
    max_regression_pct: float
    unmatched: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Delta]:
        return [d for d in self.deltas if d.change_pct > self.max_regression_pct]


def same_machine(a: dict, b: dict) -> bool:
    keys = ("cpu", "cpu_cores", "gpu")
    return all(a.get(k) == b.get(k) for k in keys)


def validate_report(data: object, where: str) -> dict:
    """A bench JSON (ours, or a baseline) with the documented schema, or a BaselineError naming what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("results"), list) or not isinstance(data.get("machine"), dict):
        raise BaselineError(f"{where} is not an rvdeploy bench result (needs 'results' and 'machine')")
    for i, row in enumerate(data["results"]):
        missing = [k for k in (*MATCH_KEYS, "latency_ms", "throughput_ips") if not isinstance(row, dict) or k not in row]
        if missing or not isinstance(row.get("latency_ms"), dict) or "p50" not in row["latency_ms"]:
            raise BaselineError(f"{where}: result {i} lacks {', '.join(missing) or 'latency_ms.p50'}")
        # rows are matched by these values: they must be what a bench writes (and hashable)
        mistyped = [k for k in MATCH_KEYS if not isinstance(row[k], int if k == "batch" else str) or isinstance(row[k], bool)]
        if mistyped:
            raise BaselineError(f"{where}: result {i} has a {mistyped[0]} that is not a {'number' if mistyped[0] == 'batch' else 'string'}")
        reference = row.get("reference_p50_ms")
        if not _positive(row["latency_ms"]["p50"]) or not (reference is None or _positive(reference)):
            raise BaselineError(f"{where}: result {i} has a p50 or reference timing that is not a positive number")
    return data


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_regression(current: dict, baseline: dict, max_regression_pct: float, normalize: str = "auto") -> GateResult:
    """Match rows by model, variant, backend, precision and batch, and compare their p50.

    ``normalize``: ``always`` compares p50 / reference p50, ``never`` raw p50, ``auto`` normalises
    only when the baseline's machine differs from the current one.
    """
    if normalize not in NORMALIZE_MODES:
        raise BaselineError(f"normalize must be auto, always or never, got {normalize!r}")
    use_normalized = normalize == "always" or (normalize == "auto" and not same_machine(current["machine"], baseline["machine"]))
    base_rows = {tuple(r[k] for k in MATCH_KEYS): r for r in baseline["results"]}
    deltas, unmatched = [], []
    for row in current["results"]:
        key = tuple(row[k] for k in MATCH_KEYS)
        if key not in base_rows:
            unmatched.append(" / ".join(map(str, key)))
            continue
        old = base_rows[key]
        if use_normalized:
            if not row.get("reference_p50_ms") or not old.get("reference_p50_ms"):
                raise BaselineError(f"cannot normalise {' / '.join(map(str, key))}: the baseline has no reference timing")
            before = old["latency_ms"]["p50"] / old["reference_p50_ms"]
            after = row["latency_ms"]["p50"] / row["reference_p50_ms"]
        else:
            before, after = old["latency_ms"]["p50"], row["latency_ms"]["p50"]
        deltas.append(Delta(key, before, after, (after / before - 1.0) * 100.0, use_normalized))
    if not deltas:
        raise BaselineError("no result matches the baseline (model, variant, backend, precision and batch must agree)")
    return GateResult(deltas, use_normalized, max_regression_pct, unmatched)


def load_baseline(path: str | os.PathLike) -> dict:
    """A baseline bench JSON, validated, or one line saying what is wrong with it."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BaselineError(f"baseline {path}: no such file") from None
    except IsADirectoryError:
        raise BaselineError(f"baseline {path} is a directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaselineError(f"baseline {path} is not JSON ({exc})") from None
    return validate_report(data, str(path))
