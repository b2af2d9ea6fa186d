"""Human-readable views of a ``rvdeploy bench`` report: a Markdown table and a latency figure.

Everything here is a pure function of the report dict (the documented JSON), so a report saved on
one machine can be rendered on another without the runtimes that produced it.
"""

from __future__ import annotations

import itertools
import os
import re

FUSED_HATCH, MULTI_BRANCH_HATCH = "", "////"
CAPTION_PARTS = ("bar = p50 latency", "whisker = p90 to p99",
                 "label = speed-up vs the first bar of its batch (first p50 / this p50)")
SLOT_IN = 0.34  # inches per bar: room for a "1.00x" label over it
GAP = 0.7  # empty slots between two clusters of bars
CHAR_SLOTS = 0.22  # slots one character of an 8-pt tick label needs
MIN_WIDTH_IN, MAX_ROW_WIDTH_IN = 6.0, 14.0  # wider than the maximum and the panels stack vertically


def markdown_table(report: dict) -> str:
    """One Markdown line per result row, under a header row."""
    lines = ["| model | variant | backend | precision | batch | p50 ms | p90 ms | p99 ms | img/s | GPU compute p50 ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        lat, gpu = r["latency_ms"], r.get("gpu_compute_ms")
        gpu_cell = f"{gpu['p50']:.3f}" if gpu else "-"
        lines.append(f"| {r['model']} | {r['variant']} | {r['backend']} | {r['precision']} | {r['batch']} | {lat['p50']:.3f} | "
                     f"{lat['p90']:.3f} | {lat['p99']:.3f} | {r['throughput_ips']:.1f} | {gpu_cell} |")
    return "\n".join(lines)


def format_speedup(speedup: float) -> str:
    """Three significant figures at most: ``0.45x``, ``1.00x``, ``3.41x``, ``34.1x``, ``341x``."""
    if not speedup == speedup or speedup <= 0:  # NaN or a zero-latency row: no meaningful ratio
        return "n/a"
    return f"{speedup:.2f}x" if speedup < 10 else f"{speedup:.1f}x" if speedup < 100 else f"{speedup:.0f}x"


def row_form(row: dict) -> str:
    """``fused`` or ``multi-branch``: the variant without its ``@HxW`` input size."""
    return row["variant"].split("@")[0]


def series_key(row: dict) -> tuple[str, str]:
    """What a bar's colour encodes: the backend and precision (the form is a hatch on top)."""
    return row["backend"], row["precision"]


def cluster_names(rows: list[dict]) -> list[str]:
    """Each row's group within a batch panel: its model, plus the input size when sizes differ."""
    if len({r["variant"].partition("@")[2] for r in rows}) == 1:
        return [r["model"] for r in rows]
    return [f"{r['model']} @{r['variant'].partition('@')[2] or '?'}" for r in rows]


def machine_line(machine: dict) -> str:
    """``NVIDIA H100 · 16 CPU cores`` for GPU runs, the CPU model with cores and threads otherwise."""
    cores = f"{machine['cpu_cores']} CPU cores" if machine.get("cpu_cores") else "CPU cores unknown"
    if machine.get("gpu") and machine.get("device", "cuda") == "cuda":
        return f"{machine['gpu']} · {cores}"
    threads = f", {machine['threads']} threads" if machine.get("threads") else ""
    return f"{machine.get('cpu', 'unknown CPU')} · {cores}{threads}"


def _wrap(name: str, width: int) -> str:
    """Break a long cluster name after ``_``, ``-`` or spaces, at most ``width`` characters a line where possible."""
    lines = [""]
    for piece in re.split(r"(?<=[_\- ])", name):
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
    return "\n".join(line.strip() for line in lines)


def _panel_clusters(batch_rows: list, clusters: list[str], labelled: bool) -> tuple[list, float]:
    """``[(name, members, centre, width)]`` for one panel and its total width, in bar slots.

    A cluster is at least as wide as its bars and, when labelled, as its longest unbreakable name piece.
    """
    layout, left = [], 0.0
    for name in dict.fromkeys(clusters[i] for i, _ in batch_rows):
        members = [(i, r) for i, r in batch_rows if clusters[i] == name]
        longest = max(len(piece) for piece in re.split(r"(?<=[_\- ])", name)) if labelled else 0
        width = max(len(members), CHAR_SLOTS * longest)
        layout.append((name, members, left + width / 2, width))
        left += width + GAP
    return layout, left - GAP


def build_latency_figure(report: dict):
    """The latency figure as a matplotlib Figure: one panel per batch size, each with its own y-scale.

    Bars are p50 latency coloured by backend + precision, hatched when multi-branch; whiskers run
    from p90 to p99; each bar carries its speed-up over the first row of its batch. Bars are tagged
    with ``gid`` ``bar:<i>`` and their labels ``speedup:<i>``, ``i`` indexing ``report["results"]``.
    """
    # a bare Figure on an Agg canvas: no pyplot global state, so nothing leaks or needs closing
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = report["results"]
    if not rows:
        raise ValueError("the report has no results to plot")
    batches = sorted({r["batch"] for r in rows})
    clusters = cluster_names(rows)
    labelled = len(set(clusters)) > 1  # a single cluster is named in the title instead
    keys = list(dict.fromkeys(series_key(r) for r in rows))
    cmap = colormaps["tab10" if len(keys) <= 10 else "tab20"]  # distinct colours before any repeat
    colours = {key: cmap(n % cmap.N) for n, key in enumerate(keys)}

    panels = [_panel_clusters([(i, r) for i, r in enumerate(rows) if r["batch"] == b], clusters, labelled)
              for b in batches]
    # a panel's width follows its slots so bars keep their size; too wide a row stacks the panels instead
    widths = [max(2.2, SLOT_IN * (total + 0.6) + 0.7) for _, total in panels]
    stacked = sum(widths) > MAX_ROW_WIDTH_IN
    if stacked:
        figure = Figure(figsize=(max(max(widths), 7.0) + 0.6, 1.6 + 3.2 * len(batches)), layout="constrained")
        axes = figure.subplots(len(batches), 1, squeeze=False)[:, 0]
    else:
        figure = Figure(figsize=(max(sum(widths) + 0.6, MIN_WIDTH_IN), 5.2), layout="constrained")
        axes = figure.subplots(1, len(batches), squeeze=False, gridspec_kw={"width_ratios": widths})[0]
    FigureCanvasAgg(figure)

    for axis, batch, (layout, total) in zip(axes, batches, panels):
        baseline = layout[0][1][0][1]["latency_ms"]["p50"]
        for _, members, centre, _ in layout:
            for x, (i, r) in zip(itertools.count(centre - (len(members) - 1) / 2), members):
                lat = r["latency_ms"]
                hatch = MULTI_BRANCH_HATCH if row_form(r) == "multi-branch" else FUSED_HATCH
                axis.bar(x, lat["p50"], width=0.8, color=colours[series_key(r)], edgecolor="#333333", linewidth=0.6,
                         hatch=hatch, zorder=2, gid=f"bar:{i}")
                axis.vlines(x, lat["p90"], lat["p99"], color="black", linewidth=1.0, zorder=3)
                axis.hlines([lat["p90"], lat["p99"]], x - 0.15, x + 0.15, color="black", linewidth=1.0, zorder=3)
                speedup = baseline / lat["p50"] if lat["p50"] > 0 else float("nan")
                axis.annotate(format_speedup(speedup), (x, max(lat["p99"], lat["p50"])), xytext=(0, 3),
                              textcoords="offset points", ha="center", va="bottom", fontsize=7.5, gid=f"speedup:{i}")
        axis.set_xlim(-0.3, total + 0.3)
        axis.set_title(f"batch {batch}", fontsize=10)
        axis.grid(axis="y", color="#dddddd", linewidth=0.6, zorder=0)
        axis.spines[["top", "right"]].set_visible(False)
        axis.tick_params(axis="y", labelsize=8)
        axis.tick_params(axis="x", length=0)
        # one short label under each cluster at most; which series a bar is lives in the legend
        axis.set_xticks([c for _, _, c, _ in layout] if labelled else [],
                        [_wrap(name, int(w / CHAR_SLOTS)) for name, _, _, w in layout] if labelled else [], fontsize=8)
    for axis in axes if stacked else axes[:1]:
        axis.set_ylabel("p50 latency per batch (ms)", fontsize=9)

    title = "Inference latency by batch size" + ("" if labelled else f": {clusters[0]}")
    figure.suptitle(f"{title}\n{machine_line(report.get('machine', {}))}", fontsize=11)

    series = [(Patch(facecolor=colours[k], edgecolor="#333333", linewidth=0.6), f"{k[0]} · {k[1]}") for k in keys]
    forms = list(dict.fromkeys(row_form(r) for r in rows))
    styles = [] if forms == ["fused"] else [
        (Patch(facecolor="white", edgecolor="#333333", linewidth=0.6,
               hatch=MULTI_BRANCH_HATCH if f == "multi-branch" else FUSED_HATCH), f) for f in forms]
    whisker = axes[0].errorbar([], [], yerr=[], fmt="none", ecolor="black", elinewidth=1.0, capsize=3)
    _add_legend(figure, series, styles + [(whisker, "whisker: p90 to p99")])
    if labelled:
        _fit_cluster_labels(figure, axes, [layout for layout, _ in panels])
    _fit_speedup_labels(figure, axes)
    return figure


def _add_legend(figure, series: list, styles: list) -> None:
    """A legend under the panels, read row by row: colours first, then the marks' key on its own row,
    with as many columns (and the caption on as few lines) as the figure width allows."""
    from matplotlib.patches import Patch

    blank = (Patch(visible=False), "")
    captions = [" · ".join(CAPTION_PARTS), " · ".join(CAPTION_PARTS[:2]) + "\n" + CAPTION_PARTS[2]]
    renderer = figure.canvas.get_renderer()
    for caption, columns in itertools.product(captions, range(len(series) + len(styles), 0, -1)):
        entries = series + [blank] * (-len(series) % columns) + styles
        entries += [blank] * (-len(entries) % columns)
        # matplotlib fills legend columns top to bottom; transpose so entries read left to right
        ordered = [entries[r * columns + c] for c in range(columns) for r in range(len(entries) // columns)]
        legend = figure.legend([h for h, _ in ordered], [t for _, t in ordered], loc="outside lower center",
                               ncol=columns, fontsize=8, frameon=False, title=caption, title_fontsize=8)
        legend.get_title().set_color("#444444")
        last_try = caption is captions[-1] and columns == 1
        if legend.get_window_extent(renderer).width <= 0.98 * figure.bbox.width or last_try:
            return
        legend.remove()


def _fit_cluster_labels(figure, axes, layouts: list) -> None:
    """Wrap each cluster's tick label only as much as it needs to stay clear of its neighbours'."""
    figure.draw_without_rendering()  # lays the figure out without rasterising
    renderer = figure.canvas.get_renderer()
    for axis, layout in zip(axes, layouts):
        slot_px = abs(axis.transData.transform((1, 0))[0] - axis.transData.transform((0, 0))[0])
        texts = []
        for label, (name, _, _, width) in zip(axis.get_xticklabels(), layout):
            # neighbouring centres sit (width_a + width_b) / 2 + GAP apart, so width + 0.4 each never meet
            for chars in range(len(name), 0, -1):
                label.set_text(_wrap(name, chars))
                if label.get_window_extent(renderer).width <= (width + 0.4) * slot_px:
                    break
            texts.append(label.get_text())
        axis.set_xticks(axis.get_xticks(), texts, fontsize=8)


def _fit_speedup_labels(figure, axes) -> None:
    """Turn labels upright when they are wider than a bar, then raise each y-limit so they fit inside."""
    figure.draw_without_rendering()
    renderer = figure.canvas.get_renderer()
    labels = {axis: [t for t in axis.texts if (t.get_gid() or "").startswith("speedup:")] for axis in axes}
    for axis in axes:
        bar_px = abs(axis.transData.transform((0.8, 0))[0] - axis.transData.transform((0, 0))[0])
        if any(t.get_window_extent(renderer).width > 0.95 * bar_px for t in labels[axis]):
            for t in labels[axis]:
                t.set_rotation(90)
    gap_px = 3 * figure.dpi / 72 + 4  # the label's offset above its whisker plus a little air
    for _ in range(3):  # a new limit can change tick labels and so the layout; settle in a few passes
        figure.draw_without_rendering()
        changed = False
        for axis in axes:
            axes_px, top = axis.get_window_extent(renderer).height, axis.get_ylim()[1]
            for t in labels[axis]:
                # anchor + above_px * top / axes_px <= top  =>  top >= anchor / (1 - above_px / axes_px)
                above_px = t.get_window_extent(renderer).height + gap_px
                top = max(top, 1.03 * t.xy[1] / max(0.05, 1 - above_px / axes_px))
            if top > axis.get_ylim()[1]:
                axis.set_ylim(0, top)
                changed = True
        if not changed:
            return


def plot_latency(report: dict, path: str | os.PathLike) -> None:
    """Render :func:`build_latency_figure` and write it atomically as PNG."""
    from rvdeploy.files import atomic_output

    figure = build_latency_figure(report)
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=130)
    figure.clear()  # drop the artists now; the figure is not registered with pyplot
