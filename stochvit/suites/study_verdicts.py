"""A study's verdict table: the claims a reader asks about, each picked from the report's comparisons, in one table
(claim, regime, seeds, difference with its 95% interval, verdict) that the report writes to verdicts.md.

    [[verdicts]]
    claim = "the default layer lowers ECE"      # the claim in words
    regime = "clean test, 5,000 images"          # where it was measured
    from = "calibration/clean"                   # calibration/clean | calibration/shift | robustness | privacy | compare/NAME
    method = "stochastic"
    baseline = "deterministic"
    metric = "ece"

The table is the one place a README copies its headline results from: every number in it is rebuilt by
`stochvit study SPEC` from the committed run directories. A claim whose comparison has no finished runs yet reads
"not measured yet".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..eval.stats import Comparison

KEYS = ("claim", "regime", "from", "method", "baseline", "metric")


@dataclass(frozen=True)
class Verdict:
    claim: str
    regime: str
    source: str  # the spec's `from`: which section of the report holds the comparison
    method: str
    baseline: str
    metric: str


def parse_verdicts(rows: Any, sections: dict[str, tuple[set[tuple[str, str]], tuple[str, ...] | None]],
                   where: str) -> list[Verdict]:
    """The spec's [[verdicts]] array; `sections` maps each `from` the spec offers to its (method, baseline) pairs and
    its metrics (None: not known before the suite runs)."""
    if not isinstance(rows, list):
        raise UserError(f"{where}: `verdicts` must be an array of tables ([[verdicts]])")
    out = []
    for i, row in enumerate(rows, 1):
        at = f"{where}: verdict {i}"
        if not isinstance(row, dict) or set(row) != set(KEYS):
            got = sorted(row) if isinstance(row, dict) else row
            raise UserError(f"{at} needs exactly the keys {list(KEYS)}, got {got}")
        if row["from"] not in sections:
            raise UserError(f"{at}: from = {row['from']!r} is not a section of this spec; known: {sorted(sections)}")
        pairs, metrics = sections[row["from"]]
        if (row["method"], row["baseline"]) not in pairs:
            raise UserError(f"{at}: {row['from']} compares no {row['method']!r} with {row['baseline']!r}")
        if metrics is not None and row["metric"] not in metrics:
            raise UserError(f"{at}: {row['from']} has no metric {row['metric']!r}; known: {list(metrics)}")
        out.append(Verdict(row["claim"], row["regime"], row["from"], row["method"], row["baseline"], row["metric"]))
    return out


def verdict_table(verdicts: list[Verdict], comparisons: dict[str, list[Comparison]], digits: int = 3) -> str:
    """Markdown: one row per verdict, from `comparisons` (the report's rows by `from`)."""
    lines = ["| claim | regime | seeds | difference [95% CI] | verdict |", "|---|---|---|---|---|"]
    for v in verdicts:
        found = [c for c in comparisons.get(v.source, [])
                 if (c.method, c.baseline, c.metric) == (v.method, v.baseline, v.metric)]
        if not found:
            lines.append(f"| {v.claim} | {v.regime} | - | - | not measured yet |")
            continue
        c = found[0]
        lines.append(f"| {v.claim} | {v.regime} | {c.seeds[0]} vs {c.seeds[1]} | {c.difference:+.{digits}f} "
                     f"[{c.low:+.{digits}f}, {c.high:+.{digits}f}] {c.metric} | {c.verdict_text()} |")
    return "\n".join(lines) + "\n"
