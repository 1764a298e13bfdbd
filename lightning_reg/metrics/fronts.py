"""Trade-off fronts of a sweep table: which settings are not beaten, and each curve's best point.

A table is a list of rows (dicts); ``goals`` maps a metric to ``"min"`` or ``"max"`` (lower or higher is
better, ``METRIC_GOALS``). Rows whose value for a goal metric is missing or NaN never count as better and
are left out of fronts and best points.

* ``pareto_front(rows, goals)``: the rows no other row dominates (at least as good in every goal metric and
  strictly better in one), e.g. FID (min) against IS (max), or energy distance (min) against on-shape (max).
* ``best_rows(rows, by, metric, goal)``: per group (e.g. ``("method", "reg")``, one curve over the weight
  grid), the row with the best ``metric``: a curve's turning point, where more guidance stops helping.
* ``chains(rows)``: the sampler chains (sampler, steps, sampler_kwargs) of a table; ``series(row)``: its source
  (the sweep a merged row came from), sample count and chain. Rows of different series never share a curve, a
  best point or a summary line; with several (a sweep's ``--samplers``, merged sweeps), each is labelled.

The sweep's table (``write_table`` / ``read_table``), figure (``fronts_figure``: axes clamped to the data and the
metrics' bounds, ``w`` labels placed inside the axes without overlap, a legend of what is drawn) and summary
(``summary``, aligned whatever the names' lengths) live here.
A table read back is checked (at most ``MAX_TABLE_BYTES`` and ``MAX_TABLE_ROWS``; the columns the figure reads;
a number in every cell of a number column) before anything is drawn: a bad cell is one line naming it.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Mapping, Sequence

from lightning_reg.errors import ConfigError, does_not_exist
from lightning_reg.io.files import atomic_write, read_text

GOALS = ("min", "max")
REG_STYLES = {"none": "-", "paper": "--", "vjp": ":", "reuse": "-.", "window": (0, (5, 1)), "graph_free": (0, (5, 5)),
              "graph_free_reuse": (0, (3, 1, 1, 1, 1, 1)), "adaptive": (0, (1, 1)),
              "short": (0, (3, 5, 1, 5))}  # one per REG mode (tests/test_sweep.py)
LEAD_COLUMNS = ("setting", "method", "reg", "w", "convention", "weight", "params", "sampler", "steps",
                "sampler_kwargs")
CHAIN_COLUMNS = ("sampler", "steps", "sampler_kwargs")  # a sampler chain: its own curves when a table has several
SERIES_COLUMNS = ("source", "num_samples", *CHAIN_COLUMNS)  # rows that may share a curve: equal in all of these
COST_COLUMNS = ("num_samples", "time_per_sample_ms", "peak_memory_mib", "peak_memory_measure")
METRIC_GOALS = {"energy_distance": "min", "sliced_wasserstein": "min", "log_likelihood": "max", "on_shape": "max",
                "fid": "min", "kid": "min", "is": "max", "accuracy": "max", "clip_score": "max"}
METRIC_BOUNDS = {"energy_distance": (0, math.inf), "sliced_wasserstein": (0, math.inf), "fid": (0, math.inf),
                 "is": (1, math.inf), "accuracy": (0, 1), "on_shape": (0, 1), "clip_score": (0, 100)}  # kid: may be < 0
MARGIN = 0.06  # of the data's span, each side of an axis
STAR_SIZE = 14  # points: a curve's best point
LABEL_OFFSETS = ((8, 0), (-8, 0), (0, 9), (0, -9), *((dx, dy) for dy in (12, -12, 24, -24, 36, -36) for dx in (8, -8)))
TABLE_COLUMNS = ("method", "reg", "w", "time_per_sample_ms")  # what the figure and the summary read
NUMBER_COLUMNS = ("w", "weight", "steps", "num_samples", "time_per_sample_ms", "peak_memory_mib", *METRIC_GOALS)
MAX_TABLE_BYTES = 16 << 20  # a sweep's table is a few KB
MAX_TABLE_ROWS = 100_000


def _value(row: Mapping, metric: str, goal: str) -> float:
    """``row[metric]`` oriented so that lower is better (``-value`` for ``max``); ``nan`` if missing."""
    if goal not in GOALS:
        raise ValueError(f"goal of {metric!r} must be 'min' or 'max', got {goal!r}")
    value = row.get(metric)
    value = math.nan if value is None or value == "" else float(value)
    return value if goal == "min" else -value


def dominates(a: Mapping, b: Mapping, goals: Mapping[str, str]) -> bool:
    """``a`` is at least as good as ``b`` in every goal metric and strictly better in one."""
    pairs = [(_value(a, m, g), _value(b, m, g)) for m, g in goals.items()]
    return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)


def pareto_front(rows: Sequence[Mapping], goals: Mapping[str, str]) -> list[int]:
    """Indices (ascending) of the rows with finite goal values that no other such row dominates.

    Two rows with equal values are both on the front (neither dominates the other).
    """
    if not goals:
        raise ValueError("pareto_front needs at least one goal metric")
    valid = [i for i, row in enumerate(rows) if all(math.isfinite(_value(row, m, g)) for m, g in goals.items())]
    return [i for i in valid if not any(dominates(rows[j], rows[i], goals) for j in valid if j != i)]


def best_rows(rows: Sequence[Mapping], by: Sequence[str], metric: str, goal: str = "min") -> dict[tuple, Mapping]:
    """Per group of equal ``tuple(row.get(k) for k in by)`` (a missing column reads ``None``), the row with the
    best finite ``metric`` (ties: the first in table order). Groups appear in table order; a group without a
    finite value is left out."""
    best: dict[tuple, Mapping] = {}
    for row in rows:
        value = _value(row, metric, goal)
        if not math.isfinite(value):
            continue
        key = tuple(row.get(k) for k in by)
        if key not in best or value < _value(best[key], metric, goal):
            best[key] = row
    return best


def chain(row: Mapping) -> tuple:
    """A row's sampler chain: its ``CHAIN_COLUMNS`` (``None`` in a table from before them)."""
    return tuple(row.get(c) for c in CHAIN_COLUMNS)


def chains(rows: Sequence[Mapping]) -> list[tuple]:
    """The distinct sampler chains of ``rows``, in table order."""
    return list(dict.fromkeys(chain(row) for row in rows))


def chain_labels(keys: Sequence[tuple]) -> dict[tuple, str]:
    """Each chain's label: ``sampler steps``, e.g. ``ddim 20`` or ``DPMSolverMultistep 10`` (a diffusers
    scheduler by its class name without ``Scheduler``), and its options where two labels would be equal."""
    short = {key: "" if key[0] is None else  # "": a table from before the chain columns
             f"{key[0].rpartition(':')[2].removesuffix('Scheduler')} {key[1] if key[1] is not None else ''}".strip()
             for key in keys}
    shared = {label for label in short.values() if list(short.values()).count(label) > 1}
    return {key: f"{label} {key[2]}" if label in shared and key[2] else label for key, label in short.items()}


def default_front(metric_names: tuple[str, ...]) -> list[str]:
    """The figure's ``[x, y]``: a distance to the target against a measure of guidance's effect."""
    x = "energy_distance" if "energy_distance" in metric_names else "fid"
    y = next((m for m in ("on_shape", "clip_score", "accuracy", "is", "log_likelihood") if m in metric_names), None)
    return [x, y]


def write_table(path: Path, rows: list[dict]) -> None:
    """``rows`` as CSV (floats with full precision): the setting's columns, the metrics, then the cost columns."""
    seen = list(dict.fromkeys(c for row in rows for c in row))
    columns = ([c for c in LEAD_COLUMNS if c in seen] + [c for c in seen if c not in LEAD_COLUMNS + COST_COLUMNS]
               + [c for c in COST_COLUMNS if c in seen])

    def write(f):
        out = csv.DictWriter(f, fieldnames=columns)
        out.writeheader()
        out.writerows(rows)

    atomic_write(path, write, binary=False)


def read_table(path) -> list[dict]:
    """``sweep.csv`` back as rows of strings, checked: the ``TABLE_COLUMNS``, a number (``nan`` too) in every
    cell of the ``NUMBER_COLUMNS`` it has, at most ``MAX_TABLE_ROWS`` rows; else one ConfigError naming the
    row and column."""
    hint = "give the sweep.csv a sweep.py run wrote"
    reader = csv.DictReader(io.StringIO(read_text(path, "table", "sweep table", MAX_TABLE_BYTES), newline=""))
    rows = []
    try:
        columns = reader.fieldnames or []
        missing = [c for c in TABLE_COLUMNS if c not in columns]
        if missing:
            raise ConfigError(f"{path} has no column {missing[0]!r}; {hint}")
        numbers = [c for c in NUMBER_COLUMNS if c in columns]
        for row in reader:
            if len(rows) == MAX_TABLE_ROWS:
                raise ConfigError(f"{path} has more than {MAX_TABLE_ROWS:,} rows; {hint}")
            rows.append(row)
            bad = next((c for c in numbers if not _is_number(row[c])), None)
            if bad:
                raise ConfigError(f"{path}, row {len(rows)} (line {reader.line_num}), column {bad}: "
                                  f"{str(row[bad])[:40]!r} is not a number; {hint}")
    except csv.Error as err:
        raise ConfigError(f"{path}, line {reader.reader.line_num}: not CSV ({err}); {hint}") from None
    return rows


def _is_number(cell: str | None) -> bool:
    try:
        float(cell)
    except (TypeError, ValueError):
        return False
    return True


def series(row: Mapping) -> tuple:
    """A row's series: its ``SERIES_COLUMNS`` (the sweep it came from, its sample count, its sampler chain); rows
    of different series never share a curve, a best point or a summary line."""
    return tuple(row.get(c) for c in SERIES_COLUMNS)


def series_parts(keys: Sequence[tuple]) -> dict[tuple, dict[str, str]]:
    """Each series' parts that differ between ``keys``, by column header: ``source``, ``samples`` (the sample
    count) and ``sampler`` (``chain_labels``); no parts when there is one series."""
    chain_names = chain_labels(list(dict.fromkeys(key[2:] for key in keys)))
    parts = {key: {"source": str(key[0] or ""), "samples": "" if key[1] is None else f"{int(float(key[1]))}",
                   "sampler": chain_names[key[2:]]} for key in keys}
    varying = [h for h in ("source", "samples", "sampler") if len({p[h] for p in parts.values()}) > 1]
    return {key: {h: p[h] for h in varying} for key, p in parts.items()}


def series_labels(keys: Sequence[tuple]) -> dict[tuple, str]:
    """Each series' label: its ``series_parts``, comma-separated, the sample count as ``n=500``."""
    return {key: ", ".join(f"n={v}" if h == "samples" else v for h, v in parts.items() if v)
            for key, parts in series_parts(keys).items()}


def axis_limits(values: Sequence[float], metric: str, log: bool = False) -> tuple[float, float]:
    """The axis range of ``values``: their span plus ``MARGIN`` of it each side (in log10 for a log axis), clipped
    at the metric's bounds (``METRIC_BOUNDS``: accuracy never above 1, FID never below 0)."""
    finite = [v for v in values if math.isfinite(v) and (v > 0 or not log)]
    if not finite:
        return (0.0, 1.0) if not log else (0.1, 10.0)
    lo, hi = (math.log10(v) for v in (min(finite), max(finite))) if log else (min(finite), max(finite))
    pad = MARGIN * ((hi - lo) or abs(hi) or 1.0)
    lo, hi = (10 ** (lo - pad), 10 ** (hi + pad)) if log else (lo - pad, hi + pad)
    low, high = METRIC_BOUNDS.get(metric, (-math.inf, math.inf))
    return max(lo, low), min(hi, high)


def place_labels(ax, labels: Sequence) -> None:
    """Move each of ``labels`` (annotations at ``offset points`` from their star, in order) to the first of
    ``LABEL_OFFSETS`` whose box lies inside the axes and overlaps no star and no label placed before it; where
    none does, to the offset inside the axes overlapping least (clipped to the axes: a label never leaves them).
    Needs the figure laid out (``draw_without_rendering``) first."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    half = STAR_SIZE / 2 * ax.figure.dpi / 72
    stars = [ax.transData.transform(label.xy) for label in labels]
    taken = [Bbox.from_extents(*(star - half), *(star + half)) for star in stars]  # the stars, then each label

    def overlap(box) -> float:
        return sum(max(0.0, min(box.x1, b.x1) - max(box.x0, b.x0)) * max(0.0, min(box.y1, b.y1) - max(box.y0, b.y0))
                   for b in taken)

    def move(label, offset):
        dx, dy = offset
        label.set_position(offset)
        label.set_horizontalalignment("left" if dx > 0 else "right" if dx < 0 else "center")
        label.set_verticalalignment("bottom" if dy > 0 else "top" if dy < 0 else "center")
        return label.get_window_extent(renderer)

    for label in labels:
        options = []
        for offset in LABEL_OFFSETS:
            box = move(label, offset)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            options.append((not inside, overlap(box), len(options), offset))
            if inside and not options[-1][1]:
                break
        taken.append(move(label, min(options)[3]))


def fronts_figure(rows: list[dict], x: str, y: str, title: str = ""):
    """One panel per method (shared axes): a curve per REG mode over the weight grid in ``(x, y)``, line style
    by REG mode, each curve's best-``x`` point starred and labelled with its ``w`` (``place_labels``); the Pareto
    front of all rows in grey behind. Rows of several series (sources, sample counts, sampler chains): a curve
    per series and REG mode, coloured by series. Axes span the data (``axis_limits``); one legend, below the
    panels, of what is drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    goals = {x: METRIC_GOALS[x], y: METRIC_GOALS[y]}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cols = min(len(methods), 3) or 1
    nrows = max(1, math.ceil(len(methods) / cols))
    fig = Figure(figsize=(max(4.6 * cols, 8.0), 3.9 * nrows + 0.8), layout="constrained")  # + the legend
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False, sharex=True, sharey=True).ravel()
    front = sorted((rows[i] for i in pareto_front(rows, goals)), key=lambda r: float(r[x]))
    best = best_rows(rows, ("method", "reg", *SERIES_COLUMNS), x, goals[x])
    keys = list(dict.fromkeys(series(row) for row in rows))
    labels = series_labels(keys)
    several = len(keys) > 1  # several series: coloured by series, else by REG mode
    regs = list(dict.fromkeys([*REG_STYLES, *(r["reg"] for r in rows)]))
    w_labels = {}
    for ax, method in zip(axes, methods):
        if front:  # a marker too: a front of one row is a point
            ax.plot([float(r[x]) for r in front], [float(r[y]) for r in front], color="0.75", lw=5, alpha=0.6,
                    marker="o", ms=9, zorder=0, label="Pareto front (all rows)")
        for c, key in enumerate(keys):
            for reg in regs:
                curve = sorted((r for r in rows if r["method"] == method and r["reg"] == reg and series(r) == key),
                               key=lambda r: float(r["w"]))
                if not curve:
                    continue
                colour = f"C{(c if several else regs.index(reg)) % 10}"
                ax.plot([float(r[x]) for r in curve], [float(r[y]) for r in curve], ls=REG_STYLES.get(reg, "-"),
                        marker="o", ms=3.5, color=colour,
                        label=f"{labels[key]}, REG {reg}" if several else f"REG {reg}")
                top = best.get((method, reg, *key))
                if top is not None:
                    ax.plot(float(top[x]), float(top[y]), "*", ms=STAR_SIZE, color=colour, mec="k", mew=0.8, zorder=3)
                    label = ax.annotate(f"w={float(top['w']):g}", (float(top[x]), float(top[y])),
                                        textcoords="offset points", xytext=LABEL_OFFSETS[0], fontsize=7,
                                        color=colour, clip_on=True, zorder=4)
                    label.set_in_layout(False)  # placed after the layout, inside the axes
                    w_labels.setdefault(ax, []).append(label)
        ax.set_title(method)
        ax.grid(alpha=0.3)
    xs, ys = [float(r[x]) for r in rows], [float(r[y]) for r in rows]
    finite = [v for v in xs if math.isfinite(v)]
    log = bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 20
    if log:
        axes[0].set_xscale("log")
        axes[0].xaxis.set_minor_formatter(FuncFormatter(_minor_log_label))  # 2 and 5 of each decade only
    axes[0].set_xlim(*axis_limits(xs, x, log))
    axes[0].set_ylim(*axis_limits(ys, y))
    for ax in axes[len(methods):]:
        ax.set_axis_off()
    for ax in axes[(nrows - 1) * cols:]:
        ax.set_xlabel(f"{x} ({'lower' if goals[x] == 'min' else 'higher'} is better)")
    for ax in axes[::cols]:
        ax.set_ylabel(f"{y} ({'lower' if goals[y] == 'min' else 'higher'} is better)")
    handles = {}
    for ax in axes:
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                handles.setdefault(line.get_label(), line)
    if handles:
        per_row = int(fig.get_figwidth() * 72 // (5 * max(map(len, handles)) + 40))  # ~5 points a character
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", fontsize="small",
                   ncols=max(1, min(len(handles), per_row)))
    per = "series and REG mode" if several else "REG mode"
    fig.suptitle("\n".join(filter(None, [title, f"a curve per {per} over the weights; ★ best {x} per curve"])))
    fig.draw_without_rendering()  # the layout, then the labels inside it
    for ax, texts in w_labels.items():
        place_labels(ax, texts)
    return fig


def save_fronts(path: Path, rows: list[dict], x: str, y: str, title: str = "") -> None:
    """``fronts_figure`` as a PNG at ``path``."""
    from lightning_reg.metrics.plots import save_figure
    save_figure(fronts_figure(rows, x, y, title), path)


def save_step_curves(path: Path, rows: list[dict], metrics: Sequence[str], title: str = "") -> None:
    """How a metric moves with the number of steps (a sweep with a samplers axis): a panel per metric, x the
    steps (log), a curve per sampler (its options included), method, ``w`` and REG mode, coloured by sampler and
    styled by REG mode; the time per sample of each point in a panel of its own (wall time of the run)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    from lightning_reg.metrics.plots import save_figure
    panels = [*metrics, "time_per_sample_ms"]
    fig = Figure(figsize=(4.3 * len(panels), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    samplers = list(dict.fromkeys((r["sampler"], r.get("sampler_kwargs") or "") for r in rows))
    labels = chain_labels([(sampler, None, kwargs) for sampler, kwargs in samplers])
    names = {(sampler, kwargs): labels[(sampler, None, kwargs)] for sampler, kwargs in samplers}
    curves = dict.fromkeys((r["sampler"], r.get("sampler_kwargs") or "", r["method"], float(r["w"]), r["reg"])
                           for r in rows)
    steps = sorted({int(float(r["steps"])) for r in rows})
    for ax, metric in zip(axes, panels):
        several = len({(c[2], c[3]) for c in curves}) > 1  # more than one method and w: say which
        for sampler, kwargs, method, w, reg in curves:
            curve = sorted((r for r in rows if (r["sampler"], r.get("sampler_kwargs") or "", r["method"],
                                                float(r["w"]), r["reg"]) == (sampler, kwargs, method, w, reg)),
                           key=lambda r: float(r["steps"]))
            label = f"{names[(sampler, kwargs)]}, REG {reg}" + (f", {method} w={w:g}" if several else "")
            ax.plot([float(r["steps"]) for r in curve], [float(r[metric]) for r in curve],
                    ls=REG_STYLES.get(reg, "-"), marker="o", ms=4, label=label,
                    color=f"C{samplers.index((sampler, kwargs)) % 10}")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(steps))  # the grid's step counts, as integers
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(n) for n in steps])
        ax.set_xlabel("steps")
        goal = METRIC_GOALS.get(metric)
        ax.set_ylabel(f"{metric} ({'lower' if goal == 'min' else 'higher'} is better)" if goal
                      else "time per sample (ms, wall time of the run)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="x-small", loc="best")
    fig.suptitle("\n".join(filter(None, [title, "a curve per sampler and REG mode over the steps"])))
    save_figure(fig, path)


def _minor_log_label(value: float, _) -> str:
    """Label a minor log tick only at 2 and 5 times a power of ten."""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if any(math.isclose(mantissa, m) for m in (2, 5)) else ""


def aligned(header: Sequence[str], lines: Sequence[Sequence[str]], text_columns: int) -> str:
    """A plain-text table: every column as wide as its longest cell, two spaces apart, the first
    ``text_columns`` left-aligned, the numbers after them right-aligned under their headers."""
    widths = [max(map(len, column)) for column in zip(header, *lines)]
    return "\n".join("  ".join(cell.ljust(n) if i < text_columns else cell.rjust(n)
                                for i, (cell, n) in enumerate(zip(cells, widths)))
                      for cells in (header, *lines))


def summary(rows: list[dict], x: str, y: str) -> str:
    """Per series (first columns, where the rows have several: ``series_parts``), method and REG mode, the
    best-``x`` row: its weight (w convention), ``x``, ``y`` and time per sample (``aligned``)."""
    best = best_rows(rows, ("method", "reg", *SERIES_COLUMNS), x, METRIC_GOALS[x])
    parts = series_parts(list(dict.fromkeys(series(row) for row in rows)))
    lead = list(next(iter(parts.values()), {}))
    header = [*lead, "method", "reg", "best w", x, y, "ms/sample"]
    lines = [[*parts[key[2:]].values(), key[0], key[1], f"{float(row['w']):g}", f"{float(row[x]):.4g}",
              f"{float(row[y]):.4g}", f"{float(row['time_per_sample_ms']):.3g}"] for key, row in best.items()]
    return aligned(header, lines, len(lead) + 2)


def markdown_table(rows: list[dict], metrics: Sequence[str]) -> str:
    """``rows`` as a Markdown table: (the series parts, where the rows have several: ``series_parts``,) method,
    REG mode, ``w``, then ``metrics`` (4 significant digits)."""
    parts = series_parts(list(dict.fromkeys(series(row) for row in rows)))
    lead = [*next(iter(parts.values()), {}), "method", "reg", "w"]
    lines = ["| " + " | ".join(lead + list(metrics)) + " |", "|---" * (len(lead) + len(metrics)) + "|"]
    for row in rows:
        values = [f"{float(row[m]):.4g}" if row.get(m) not in (None, "") else "" for m in metrics]
        cells = [*parts[series(row)].values(), row["method"], row["reg"], f"{float(row['w']):g}", *values]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def source_names(tables: Sequence[Path]) -> list[str]:
    """Each table's ``source`` cell: its folder's name (a sweep's ``--output``), else its file name without the
    suffix where two folders share a name, else the path as given."""
    for names in ([t.parent.name for t in tables], [t.stem for t in tables]):
        if len(set(names)) == len(names):
            return names
    return [str(t) for t in tables]


def main(argv: list[str] | None = None) -> None:
    """Several sweeps' tables on one figure: ``python -m lightning_reg.metrics.fronts a/sweep.csv b/sweep.csv
    --front fid accuracy --output both.png`` (e.g. CFG and autoguidance, whose guiding files differ, so they
    are two sweeps); prints the best row per curve and every row as a Markdown table."""
    import argparse

    from lightning_reg.distributed import fail

    p = argparse.ArgumentParser(description=main.__doc__.split(":")[0])
    p.add_argument("tables", nargs="+", type=Path, help="sweep.csv files (their rows are concatenated in order)")
    p.add_argument("--front", nargs=2, required=True, metavar=("X", "Y"), help=f"two of {sorted(METRIC_GOALS)}")
    p.add_argument("--output", type=Path, required=True, help="the figure (.png)")
    p.add_argument("--title", help="the figure's title (default: the tables' source names)")
    args = p.parse_args(argv)
    rows, shared = [], set(METRIC_GOALS)
    sources = source_names(args.tables)
    for table, source in zip(args.tables, sources):
        if not table.is_file():
            fail(f"{table} {does_not_exist(table)}; give the sweep.csv a sweep.py run wrote")
        try:
            table_rows = read_table(table)
        except ConfigError as err:
            fail(str(err))
        rows += [{"source": source, **row} for row in table_rows] if len(args.tables) > 1 else table_rows
        shared &= set(table_rows[0]) if table_rows else set()
    missing = [m for m in args.front if m not in shared]
    if missing:
        fail(f"--front {missing} are not metrics of {[str(t) for t in args.tables]}; give two of {sorted(shared)}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_fronts(args.output, rows, *args.front, title=args.title or ", ".join(dict.fromkeys(sources)))
    metrics = [m for m in METRIC_GOALS if m in rows[0]]
    print(f"{len(rows)} rows of {len(args.tables)} tables in {args.output}\n{summary(rows, *args.front)}\n\n"
          f"{markdown_table(rows, metrics)}")


if __name__ == "__main__":
    main()
