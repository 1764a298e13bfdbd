"""Trade-off fronts of a sweep table: which settings are not beaten, and each curve's best point.

A table is a list of rows (dicts); ``goals`` maps a metric to ``"min"`` or ``"max"`` (lower or higher is
better, ``METRIC_GOALS``). Rows whose value for a goal metric is missing or NaN never count as better and
are left out of fronts and best points.

* ``pareto_front(rows, goals)``: the rows no other row dominates (at least as good in every goal metric and
  strictly better in one), e.g. FID (min) against IS (max), or energy distance (min) against on-shape (max).
* ``best_rows(rows, by, metric, goal)``: per group (e.g. ``("method", "reg")``, one curve over the weight
  grid), the row with the best ``metric``: a curve's turning point, where more guidance stops helping.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

GOALS = ("min", "max")
METRIC_GOALS = {"energy_distance": "min", "sliced_wasserstein": "min", "log_likelihood": "max", "on_shape": "max",
                "fid": "min", "kid": "min", "is": "max", "accuracy": "max"}


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
    """Per group of equal ``tuple(row[k] for k in by)``, the row with the best finite ``metric`` (ties: the
    first in table order). Groups appear in table order; a group without a finite value is left out."""
    best: dict[tuple, Mapping] = {}
    for row in rows:
        value = _value(row, metric, goal)
        if not math.isfinite(value):
            continue
        key = tuple(row[k] for k in by)
        if key not in best or value < _value(best[key], metric, goal):
            best[key] = row
    return best
