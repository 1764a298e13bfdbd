"""Trade-off fronts of a sweep table: which settings are not beaten, and each curve's best point.

A table is a list of rows (dicts); ``goals`` maps a metric to ``"min"`` or ``"max"`` (lower or higher is
better, ``METRIC_GOALS``). Rows whose value for a goal metric is missing or NaN never count as better and
are left out of fronts and best points.

* ``pareto_front(rows, goals)``: the rows no other row dominates (at least as good in every goal metric and
  strictly better in one), e.g. FID (min) against IS (max), or energy distance (min) against on-shape (max).
* ``best_rows(rows, by, metric, goal)``: per group (e.g. ``("method", "reg")``, one curve over the weight
  grid), the row with the best ``metric``: a curve's turning point, where more guidance stops helping.
* ``chains(rows)``: the sampler chains (sampler, steps, sampler_kwargs) of a table; with several (a sweep's
  ``--samplers``), every curve, best point and summary line is per chain too.

The sweep's table (``write_table`` / ``read_table``), figure (``save_fronts``) and summary (``summary``) live here.
A table read back is checked (at most ``MAX_TABLE_BYTES`` and ``MAX_TABLE_ROWS``; the columns the figure reads;
a number in every cell of a number column) before anything is drawn: a bad cell is one line naming it.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from lightning_reg.errors import ConfigError, does_not_exist
from lightning_reg.io.files import atomic_write, read_text

GOALS = ("min", "max")
REG_STYLES = {"none": "-", "paper": "--", "vjp": ":", "reuse": "-.", "window": "-.", "graph_free": "--"}
LEAD_COLUMNS = ("setting", "method", "reg", "w", "convention", "weight", "params", "sampler", "steps",
                "sampler_kwargs")
CHAIN_COLUMNS = ("sampler", "steps", "sampler_kwargs")  # a sampler chain: its own curves when a table has several
COST_COLUMNS = ("num_samples", "time_per_sample_ms", "peak_memory_mib", "peak_memory_measure")
METRIC_GOALS = {"energy_distance": "min", "sliced_wasserstein": "min", "log_likelihood": "max", "on_shape": "max",
                "fid": "min", "kid": "min", "is": "max", "accuracy": "max", "clip_score": "max"}
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


def save_fronts(path: Path, rows: list[dict], x: str, y: str, title: str = "") -> None:
    """One panel per method (shared axes): a curve per REG mode over the weight grid in ``(x, y)``, line style
    by REG mode, each curve's best-``x`` point starred and labelled with its ``w``; the Pareto front of all
    rows in grey behind. Rows of several sampler chains: a curve per chain and REG mode, coloured by chain."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    from lightning_reg.metrics.plots import save_figure
    goals = {x: METRIC_GOALS[x], y: METRIC_GOALS[y]}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cols = min(len(methods), 3) or 1
    nrows = max(1, math.ceil(len(methods) / cols))
    fig = Figure(figsize=(max(4.6 * cols, 8.0), 3.9 * nrows), layout="constrained")  # room for the title
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False, sharex=True, sharey=True).ravel()
    front = sorted((rows[i] for i in pareto_front(rows, goals)), key=lambda r: float(r[x]))
    best = best_rows(rows, ("method", "reg", *CHAIN_COLUMNS), x, goals[x])
    keys = chains(rows)
    labels = chain_labels(keys)
    several = len(keys) > 1  # several sampler chains: coloured by chain, else by REG mode
    values = np.array([float(r[x]) for r in rows]) if rows else np.ones(1)
    for ax, method in zip(axes, methods):
        ax.plot([float(r[x]) for r in front], [float(r[y]) for r in front], color="0.75", lw=5, alpha=0.6,
                zorder=0, label="Pareto front (all)")
        drawn = 0
        for c, key in enumerate(keys):
            for reg, style in REG_STYLES.items():
                curve = sorted((r for r in rows if r["method"] == method and r["reg"] == reg and chain(r) == key),
                               key=lambda r: float(r["w"]))
                if not curve:
                    continue
                slot = drawn if several else list(REG_STYLES).index(reg)  # where the best point's label goes
                colour = f"C{c if several else slot}"
                ax.plot([float(r[x]) for r in curve], [float(r[y]) for r in curve], style, marker="o", ms=3.5,
                        color=colour, label=f"{labels[key]}, REG {reg}" if several else f"REG {reg}")
                top = best.get((method, reg, *key))
                if top is not None:
                    ax.plot(float(top[x]), float(top[y]), "*", ms=14, color=colour, mec="k", mew=0.8, zorder=3)
                    ax.annotate(f"w={float(top['w']):g}", (float(top[x]), float(top[y])),
                                textcoords="offset points", xytext=(6, -12 - 9 * slot), fontsize=7, color=colour)
                drawn += 1
        ax.set_title(method)
        ax.grid(alpha=0.3)
    if values.size and values.min() > 0 and values.max() / values.min() > 20:
        axes[0].set_xscale("log")
        axes[0].xaxis.set_minor_formatter(FuncFormatter(_minor_log_label))  # 2 and 5 of each decade only
    for ax in axes[len(methods):]:
        ax.set_axis_off()
    for ax in axes[(nrows - 1) * cols:]:
        ax.set_xlabel(f"{x} ({'lower' if goals[x] == 'min' else 'higher'} is better)")
    for ax in axes[::cols]:
        ax.set_ylabel(f"{y} ({'lower' if goals[y] == 'min' else 'higher'} is better)")
    axes[0].legend(fontsize="small", loc="best")
    per = "sampler chain and REG mode" if several else "REG mode"
    fig.suptitle("\n".join(filter(None, [title, f"a curve per {per} over the weights; ★ best {x} per curve"])))
    save_figure(fig, path)


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
                    REG_STYLES.get(reg, "-"), marker="o", ms=4, label=label,
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


def summary(rows: list[dict], x: str, y: str) -> str:
    """Per method and REG mode (and sampler chain, a first column, when the rows have several), the best-``x``
    row: its weight (w convention), ``x``, ``y`` and time per sample."""
    best = best_rows(rows, ("method", "reg", *CHAIN_COLUMNS), x, METRIC_GOALS[x])
    labels = chain_labels(chains(rows))
    several = len(labels) > 1
    samplers = {key: labels[key[2:]] if several else "" for key in best}
    s = max([len("sampler")] + [len(v) for v in samplers.values()]) + 2 if several else 0
    m = max([len("method")] + [len(key[0]) for key in best]) + 2  # columns as wide as their longest entry
    r = max([len("reg")] + [len(key[1]) for key in best]) + 2
    lines = [f"{'sampler' if s else '':<{s}}{'method':<{m}}{'reg':<{r}}{'best w':>8}{x:>18}{y:>16}{'ms/sample':>11}"]
    for key, row in best.items():
        lines.append(f"{samplers[key]:<{s}}{key[0]:<{m}}{key[1]:<{r}}{float(row['w']):>8g}{float(row[x]):>18.4g}"
                     f"{float(row[y]):>16.4g}{float(row['time_per_sample_ms']):>11.3g}")
    return "\n".join(lines)


def markdown_table(rows: list[dict], metrics: Sequence[str]) -> str:
    """``rows`` as a Markdown table: (the sampler chain, when the rows have several,) method, REG mode, ``w``, then
    ``metrics`` (4 significant digits)."""
    labels = chain_labels(chains(rows))
    several = len(labels) > 1
    lead = ["sampler"] * several + ["method", "reg", "w"]
    lines = ["| " + " | ".join(lead + list(metrics)) + " |", "|---" * (len(lead) + len(metrics)) + "|"]
    for row in rows:
        values = [f"{float(row[m]):.4g}" if row.get(m) not in (None, "") else "" for m in metrics]
        cells = [labels[chain(row)]] * several + [row["method"], row["reg"], f"{float(row['w']):g}"] + values
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    rows, shared = [], set(METRIC_GOALS)
    for table in args.tables:
        if not table.is_file():
            fail(f"{table} {does_not_exist(table)}; give the sweep.csv a sweep.py run wrote")
        try:
            table_rows = read_table(table)
        except ConfigError as err:
            fail(str(err))
        rows += table_rows
        shared &= set(table_rows[0]) if table_rows else set()
    missing = [m for m in args.front if m not in shared]
    if missing:
        fail(f"--front {missing} are not metrics of {[str(t) for t in args.tables]}; give two of {sorted(shared)}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_fronts(args.output, rows, *args.front, title=args.title)
    metrics = [m for m in METRIC_GOALS if m in rows[0]]
    print(f"{len(rows)} rows of {len(args.tables)} tables in {args.output}\n{summary(rows, *args.front)}\n\n"
          f"{markdown_table(rows, metrics)}")


if __name__ == "__main__":
    main()
