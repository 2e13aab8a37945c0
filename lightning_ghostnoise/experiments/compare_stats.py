"""The statistics of ``ghostnoise compare``: per-method summaries, N selected on validation, paired tests.

Seeds are paired: for one seed every method starts from the same weights and sees the same batches,
so each method is compared with the baseline (``plain``: BN or LN) seed by seed. The ghost batch size
``N`` of each method is chosen on the validation accuracy alone; test numbers never enter a choice.

Example:
    >>> runs = [{"label": "BN", "method": "plain", "variant": None, "ghost_batch_size": None, "seed": s,
    ...          "test_acc": a, "val_acc": a, "train_acc": 1.0, "gap": 1.0 - a, "test_loss": 0.3,
    ...          "train_seconds_per_epoch": 2.0, "eval_seconds": 1.0} for s, a in enumerate((0.80, 0.82, 0.81))]
    >>> rows = summarize(runs, ["BN"])
    >>> round(rows[0]["test_acc_mean"], 3)
    0.81
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["format_table", "paired_difference", "select_on_validation", "summarize"]


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _method_key(run_or_row: Dict[str, Any]) -> Tuple[str, Optional[str]]:
    return run_or_row["method"], run_or_row.get("variant")


def summarize(runs: Sequence[Dict[str, Any]], labels: Sequence[str]) -> List[Dict[str, Any]]:
    """Per label (one method at one ``N``): mean and sample std over seeds; mean timings.

    Args:
        runs: finished runs (dicts with ``label``, ``method``, ``variant``, ``ghost_batch_size``,
            ``seed`` and the metrics ``test_acc``, ``train_acc``, ``gap``, ``test_loss`` and, with a
            validation split, ``val_acc``).
        labels: the rows to make, in order; labels without runs are skipped.

    Returns:
        One dict per label with ``<metric>_mean`` and ``<metric>_std`` for every metric present.
    """
    rows = []
    for label in labels:
        group = [r for r in runs if r["label"] == label]
        if not group:
            continue
        first = group[0]
        row: Dict[str, Any] = {
            "label": label,
            "method": first["method"],
            "variant": first.get("variant"),
            "ghost_batch_size": first["ghost_batch_size"],
            "seeds": [r["seed"] for r in group],
        }
        for key in ("val_acc", "test_acc", "train_acc", "gap", "test_loss", "val_loss"):
            values = [r.get(key) for r in group]
            if all(v is not None for v in values):
                row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([float(v) for v in values])  # type: ignore[arg-type]  # None excluded just above
        row["train_seconds_per_epoch"] = statistics.mean(float(r["train_seconds_per_epoch"]) for r in group)
        row["eval_seconds"] = statistics.mean(float(r["eval_seconds"]) for r in group)
        rows.append(row)
    return rows


def select_on_validation(rows: Sequence[Dict[str, Any]]) -> Dict[Tuple[str, Optional[str]], str]:
    """Per method (and variant), the label of the ``N`` with the best mean validation accuracy.

    Only ``val_acc_mean`` is read: the test set never enters the choice. Ties go to the first row.
    ``plain`` has no ``N`` and is never selected among.

    Raises:
        ValueError: a ghost row without validation accuracy (run with a validation split).

    Example:
        >>> rows = [{"label": "GNI(8)", "method": "gni", "variant": None, "val_acc_mean": 0.9},
        ...         {"label": "GNI(16)", "method": "gni", "variant": None, "val_acc_mean": 0.92}]
        >>> select_on_validation(rows)
        {('gni', None): 'GNI(16)'}
    """
    best: Dict[Tuple[str, Optional[str]], Tuple[float, str]] = {}
    for row in rows:
        if row["method"] == "plain":
            continue
        if "val_acc_mean" not in row:
            raise ValueError(
                f"{row['label']} has no validation accuracy: selecting N needs a validation split (--val-size)."
            )
        key = _method_key(row)
        if key not in best or row["val_acc_mean"] > best[key][0]:
            best[key] = (row["val_acc_mean"], row["label"])
    return {key: label for key, (_, label) in best.items()}


def paired_difference(
    runs: Sequence[Dict[str, Any]], label: str, baseline: str, metric: str = "test_acc"
) -> Optional[Dict[str, Any]]:
    """The paired comparison of ``label`` with ``baseline`` over the seeds both ran.

    Returns ``None`` when they share no seed. Otherwise ``mean`` (of ``label - baseline``), its 95%
    confidence interval ``ci`` (Student's t over the paired differences; ``None`` with one seed),
    the two-sided paired t-test ``p`` (``scipy.stats.ttest_rel``; ``None`` with one seed or when
    every difference is equal), ``wins`` (seeds where ``label`` is higher) and ``n``.

    Example:
        >>> runs = [{"label": lab, "seed": s, "test_acc": a} for lab, s, a in
        ...         [("BN", 0, .80), ("BN", 1, .81), ("BN", 2, .79), ("GNI", 0, .82), ("GNI", 1, .82), ("GNI", 2, .80)]]
        >>> d = paired_difference(runs, "GNI", "BN")
        >>> round(d["mean"], 4), d["wins"], d["n"]
        (0.0133, 3, 3)
    """
    from scipy import stats

    base = {r["seed"]: float(r[metric]) for r in runs if r["label"] == baseline}
    other = {r["seed"]: float(r[metric]) for r in runs if r["label"] == label}
    seeds = sorted(set(base) & set(other))
    if not seeds:
        return None
    a = [other[s] for s in seeds]
    b = [base[s] for s in seeds]
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = statistics.mean(diffs)
    ci: Optional[List[float]] = None
    p: Optional[float] = None
    if n > 1:
        sd = statistics.stdev(diffs)
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        ci = [mean - half, mean + half]
        if sd > 0:
            p = float(stats.ttest_rel(a, b).pvalue)
    return {
        "baseline": baseline,
        "metric": metric,
        "seeds": seeds,
        "mean": mean,
        "ci": ci,
        "p": p,
        "wins": sum(d > 0 for d in diffs),
        "n": n,
    }


def _pct(row: Dict[str, Any], key: str) -> str:
    if f"{key}_mean" not in row:
        return "-"
    return f"{row[f'{key}_mean']:.2%} +- {row[f'{key}_std'] * 100:.2f}"


def _paired_cells(paired: Optional[Dict[str, Any]]) -> Tuple[str, str, str]:
    if paired is None:
        return "", "", ""
    diff = f"{paired['mean'] * 100:+.2f}"
    if paired["ci"] is not None:
        lo, hi = paired["ci"]
        diff += f" [{lo * 100:+.2f}, {hi * 100:+.2f}]"
    p = "-" if paired["p"] is None else (f"{paired['p']:.3f}" if paired["p"] >= 0.001 else f"{paired['p']:.1e}")
    return diff, p, f"{paired['wins']}/{paired['n']}"


def format_table(rows: Sequence[Dict[str, Any]], baseline_label: Optional[str] = None) -> str:
    """A Markdown table: accuracies in percent (``mean +- std`` over seeds), the gap in points, and,
    per row with a ``paired`` entry, the paired test-accuracy difference to ``baseline_label`` with its
    95% CI, the paired t-test p-value and the wins."""
    has_val = any("val_acc_mean" in r for r in rows)
    base = baseline_label or "baseline"
    head = (
        ["method"]
        + (["val acc"] if has_val else [])
        + [
            "test acc",
            "train acc",
            "gap (pp)",
            "test loss",
            f"test - {base} (pp) [95% CI]",
            "p",
            "wins",
            "train s/epoch",
        ]
    )
    body = []
    for r in rows:
        diff, p, wins = _paired_cells(r.get("paired"))
        cells = (
            [r["label"]]
            + ([_pct(r, "val_acc")] if has_val else [])
            + [
                _pct(r, "test_acc"),
                _pct(r, "train_acc"),
                f"{r['gap_mean'] * 100:.2f} +- {r['gap_std'] * 100:.2f}",
                f"{r['test_loss_mean']:.3f} +- {r['test_loss_std']:.3f}" if "test_loss_mean" in r else "-",
                diff,
                p,
                wins,
                f"{r['train_seconds_per_epoch']:.2f}",
            ]
        )
        body.append(cells)
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    sep = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep] + [line(b) for b in body])
