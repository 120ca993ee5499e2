"""The compare report's PNG plots (matplotlib, the optional `plot` extra), one function per plot.

Each `plot_*` takes the report (figures.build + curves and spectra) and a path, and writes one PNG.
`write_plots` writes them all and returns {name: file name}; without matplotlib it returns
({}, reason) and the report says the plots were skipped.
"""

from __future__ import annotations

import pathlib

import numpy as np

from jaxtune.compare.figures import PEAK_RSS_LABEL, evaluated, learning

COLORS = {"lora": "tab:blue", "full": "tab:red", "base": "black"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed); ImportError without the `plot` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"matplotlib is not installed ({e}): pip install 'jaxtune[plot]' for the plots") from e
    return plt


def label_geometry():
    """(matplotlib's Bbox, Text) for placing labels; ImportError without the `plot` extra."""
    try:
        from matplotlib.text import Text
        from matplotlib.transforms import Bbox
    except ImportError as e:
        raise ImportError(f"matplotlib is not installed ({e}): pip install 'jaxtune[plot]' for the plots") from e
    return Bbox, Text


def learning_label(report: dict) -> str:
    return "task accuracy (mean over tasks)" if report["base"]["learning_by"] == "task" else "- held-out loss"


# Where a point's label may go, in points from the point, tried in this order: beside it (up-right,
# down-right, up-left, down-left, above, below), then the same directions further out, with a leader line.
LABEL_DIRECTIONS = ((6, 4), (6, -4), (-6, 4), (-6, -4), (0, 7), (0, -7))
LABEL_RINGS = (1.0, 2.2, 3.6, 5.2)
LABEL_FONTSIZE = 7
LABEL_CLEARANCE = 5  # points kept free around the other points' markers


def overlap_area(a, b) -> float:
    """Area (display units) shared by two boxes (matplotlib Bbox)."""
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(width, 0.0) * max(height, 0.0)


def box_distance(box, x: float, y: float) -> float:
    """Display distance from the display point (x, y) to the box (0 inside it)."""
    return float(np.hypot(max(box.x0 - x, 0.0, x - box.x1), max(box.y0 - y, 0.0, y - box.y1)))


def marker_box(center, size: float, pad: float, dpi: float):
    """The display box of a scatter marker of area `size` (points^2) centred at display `center`,
    grown by `pad` points."""
    bbox, _ = label_geometry()
    half = (size ** 0.5 / 2 + pad) * dpi / 72
    return bbox.from_extents(center[0] - half, center[1] - half, center[0] + half, center[1] + half)


def label_cost(box, own: int, centers, markers: list, taken: list, frame) -> float:
    """How bad a label box is (0: free): the area it shares with labels already placed, the other
    points' markers (with clearance) and the boxes to avoid, its area outside the axes, and its whole
    area again when another point is nearer to it than its own (it would read as that point's label)."""
    cost = sum(overlap_area(box, other) for i, other in enumerate(markers) if i != own)
    cost += sum(overlap_area(box, other) for other in taken) + box.width * box.height - overlap_area(box, frame)
    own_distance = box_distance(box, *centers[own])
    if any(box_distance(box, *c) < own_distance - 0.5 for i, c in enumerate(centers) if i != own):
        cost += box.width * box.height
    return cost


def place_labels(ax, points: list[tuple[str, float, float, float]], avoid: list) -> list:
    """Label each (name, x, y, marker size) of `ax` at the first place of LABEL_DIRECTIONS x LABEL_RINGS
    (beyond the first ring with a leader line to its point) where `label_cost` is 0, or, with none, where
    it is least. Call it once the figure's layout is final (the boxes are in display units). -> the labels."""
    _, text = label_geometry()
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    centers = [tuple(ax.transData.transform((x, y))) for _, x, y, _ in points]
    markers = [marker_box(c, size, LABEL_CLEARANCE, fig.dpi) for c, (_, _, _, size) in zip(centers, points)]
    frame = ax.get_window_extent(renderer)
    taken, labels = list(avoid), []
    for own, (name, x, y, size) in enumerate(points):
        reach = size ** 0.5 / 2  # labels start beyond the marker's edge
        best = None
        for ring in LABEL_RINGS:
            for dx, dy in LABEL_DIRECTIONS:
                offset = (dx * ring + (reach if dx > 0 else -reach if dx < 0 else 0),
                          dy * ring + (reach if dy > 0 else -reach))
                leader = {"arrowstyle": "-", "color": "0.5", "lw": 0.6, "shrinkA": 0, "shrinkB": reach}
                label = ax.annotate(name, (x, y), xytext=offset, textcoords="offset points", fontsize=LABEL_FONTSIZE,
                                    ha="left" if dx > 0 else "right" if dx < 0 else "center",
                                    va="bottom" if dy > 0 else "top", zorder=4,
                                    arrowprops=leader if ring > LABEL_RINGS[0] else None)
                label.update_positions(renderer)
                box = text.get_window_extent(label, renderer)  # the text's box (Annotation's adds the leader)
                cost = label_cost(box, own, centers, markers, taken, frame)
                if best is None or cost < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (cost, label, box)
                else:
                    label.remove()
                if cost == 0:
                    break
            if best[0] == 0:
                break
        taken.append(best[2])
        labels.append(best[1])
    return labels


def plot_learning_vs_forgetting(report: dict, path: pathlib.Path) -> None:
    """Learning vs drift and vs general-QA retention, one point per arm, the Pareto front marked; each
    point labelled with its arm's name where the label overlaps no other label or point."""
    plt = pyplot()
    rows = evaluated(report["rows"])
    base = report["base"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    labels: dict = {}
    for ax, key, label in ((axes[0], "drift", "forgetting: drift (nats, lower is better)"),
                           (axes[1], "qa_kept", "retention: general QA kept (higher is better)")):
        labels[ax] = []
        for r in rows:
            if r.get(key) is None:
                continue
            on_front = r["name"] in report["pareto"]
            size = 90 if on_front else 45
            ax.scatter(r[key], learning(r), s=size, color=COLORS[r["mode"]],
                       edgecolors="gold" if on_front else "none", linewidths=2.5, zorder=3)
            labels[ax].append((r["name"], r[key], learning(r), size))
        if learning(base) is not None and base.get(key) is not None:
            ax.scatter(base[key], learning(base), marker="*", s=150, color=COLORS["base"], zorder=3)
            labels[ax].append(("base", base[key], learning(base), 150))
        ax.set_xlabel(label)
        ax.set_ylabel(learning_label(report))
        ax.grid(alpha=0.3)
        ax.margins(0.15)  # room for the labels of the outermost points
    front = sorted((r for r in rows if r["name"] in report["pareto"]), key=lambda r: r["drift"])
    if front:
        axes[0].plot([r["drift"] for r in front], [learning(r) for r in front], "--", color="gold", zorder=2,
                     label="Pareto front (learning vs drift)")
    for mode in ("lora", "full"):
        axes[0].scatter([], [], color=COLORS[mode], label="LoRA" if mode == "lora" else "full")
    legend = axes[0].legend(fontsize=8)
    fig.suptitle("Learning vs forgetting (one point per arm; gold edge: on the Pareto front)")
    fig.tight_layout()
    fig.canvas.draw()  # the final layout (and the legend's place), which the labels are placed in
    # Pin the legend where "best" put it among the points: "best" also avoids texts, and would move it onto
    # the points once the labels are there.
    legend.set_loc(tuple(axes[0].transAxes.inverted().transform(legend.get_window_extent().p0)))
    for ax, points in labels.items():
        place_labels(ax, points, [legend.get_window_extent()] if ax is axes[0] else [])
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lr_sensitivity(report: dict, path: pathlib.Path) -> None:
    """Learning figure against learning rate, one line per method (LoRA ranks apart); diverged arms as x."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    methods = sorted({r["method"] for r in report["rows"]})
    for method in methods:
        rows = sorted((r for r in report["rows"] if r["method"] == method), key=lambda r: r["lr"])
        done = [r for r in rows if r in evaluated(rows)]
        color = COLORS["full" if method == "full" else "lora"]
        ax.plot([r["lr"] for r in done], [learning(r) for r in done], "o-", color=color, label=method,
                alpha=1.0 if method in ("full", methods[0]) else 0.6)
        for r in rows:
            if r["status"] == "diverged":
                ax.axvline(r["lr"], color=color, linestyle=":", alpha=0.6)
                ax.annotate(f"{r['name']} diverged", (r["lr"], 0.02), xycoords=("data", "axes fraction"),
                            rotation=90, fontsize=7, color=color)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(learning_label(report))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_title("Learning-rate sensitivity per method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss_curves(report: dict, path: pathlib.Path) -> None:
    """Train loss (solid) and held-out loss (dashed, with markers) per arm, from metrics.jsonl."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=False)
    cmap = plt.get_cmap("tab10")
    status = {r["name"]: r["status"] for r in report["rows"]}
    for i, (name, curves) in enumerate(report["curves"].items()):
        label = name if status[name] == "finished" else f"{name} ({status[name]}: so far)"
        axes[0].plot(curves["train_steps"], curves["train_loss"], color=cmap(i % 10), label=label, lw=1.2)
        axes[1].plot(curves["eval_steps"], curves["eval_loss"], "o--", color=cmap(i % 10), label=label, lw=1.2)
    for ax, title in zip(axes, ("training loss", "held-out loss")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if report["curves"]:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spectra(report: dict, path: pathlib.Path) -> None:
    """Per matrix type: the weight change's singular values (mean over layers, divided by the largest)."""
    plt = pyplot()
    kinds = sorted({k for s in report["spectra"].values() for k in s})
    if not kinds:
        raise ValueError("no spectra")
    cols = min(4, len(kinds))
    rows_n = (len(kinds) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 3.0 * rows_n), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, kind in zip(axes.flat, kinds):
        for i, (name, spectra) in enumerate(report["spectra"].items()):
            if kind in spectra:
                s = spectra[kind]
                ax.semilogy(range(1, len(s["normalized_mean"]) + 1), [max(v, 1e-8) for v in s["normalized_mean"]],
                            color=cmap(i % 10), label=f"{name} (r90 {s['rank90_median']:.0f})", lw=1.2)
        ranks = {r["rank"] for r in report["rows"] if r["mode"] == "lora"}
        for rank in ranks:
            ax.axvline(rank, color="gray", linestyle=":", lw=1)
        full_rank = next(s[kind]["full_rank"] for s in report["spectra"].values() if kind in s)
        ax.set_title(f"{kind} (full rank {full_rank})", fontsize=9)
        ax.set_ylim(1e-4, 1.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=5)
    for ax in list(axes.flat)[len(kinds):]:
        ax.axis("off")
    fig.suptitle("dW singular values / largest (mean over layers); dotted: LoRA rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COST_BARS = (("tokens_per_s", "tokens/s", 1.0), ("peak_rss_bytes", f"{PEAK_RSS_LABEL} (GB)", 1e9),
             ("wall_s", "training wall time (s)", 1.0), ("checkpoint_bytes", "checkpoint (MB)", 1e6),
             ("trainable_params", "trainable params (M)", 1e6))


def plot_cost(report: dict, path: pathlib.Path) -> None:
    plt = pyplot()
    rows = [r for r in report["rows"] if r["status"] == "finished"]
    fig, axes = plt.subplots(1, len(COST_BARS), figsize=(3.2 * len(COST_BARS), 3.8))
    for ax, (key, label, scale) in zip(axes, COST_BARS):
        values = [(r.get(key) or 0) / scale for r in rows]
        ax.bar(range(len(rows)), values, color=[COLORS[r["mode"]] for r in rows])
        ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        if key in ("checkpoint_bytes", "trainable_params"):
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {"learning_vs_forgetting": plot_learning_vs_forgetting, "lr_sensitivity": plot_lr_sensitivity,
         "loss_curves": plot_loss_curves, "spectra": plot_spectra, "cost": plot_cost}


def write_plots(report: dict, folder: pathlib.Path) -> tuple[dict[str, str], str | None]:
    """({name: file name relative to the report}, None), or ({}, why the plots were skipped)."""
    try:
        pyplot()
    except ImportError as e:
        return {}, str(e)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, plot in PLOTS.items():
        if name == "spectra" and not any(report["spectra"].values()):
            continue
        plot(report, folder / f"{name}.png")
        written[name] = f"{folder.name}/{name}.png"
    return written, None
