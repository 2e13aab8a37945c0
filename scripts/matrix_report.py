"""The version matrix's Markdown report and its notes (used by scripts/matrix.py).

Example::

    python3 scripts/matrix.py --report    # rewrite docs/results/version_matrix.md from the JSON
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _first_error(msg: str) -> str:
    """The first ``E`` line of a failure (else its last line), short."""
    lines = [line for line in msg.strip().splitlines() if line.strip()] or [""]
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    return (errors[0] if errors else lines[-1]).replace("|", "\\|").replace("`", "'")[:240]


def _cell_lines(rec: dict[str, Any]) -> list[str]:
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in rec.get("seconds", {}).items())
    lines = [f"- **{rec['cell']}**: {rec['about']}; ran {rec['date']} from tree `{rec.get('tree', '?')}` ({secs})."]
    if rec.get("forced"):
        lines.append(f"  - forced in with `--no-deps` after the package: {', '.join(rec['forced'])}")
    if rec.get("error"):
        lines.append(f"  - {rec['status']}: `{_first_error(rec['error'])}`")
    errors: dict[str, list[str]] = {}
    for name, msg in rec.get("failures", {}).items():
        errors.setdefault(_first_error(msg), []).append(name)
    for err, names in sorted(errors.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(f"`{n}`" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        lines.append(f"  - {len(names)} failed with `{err}`: {shown}")
    reasons: dict[str, int] = {}
    for msg in rec.get("skips", {}).values():
        reasons[msg] = reasons.get(msg, 0) + 1
    for msg, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        lines.append(f"  - {n} skipped: {msg[:200]}")
    return lines


def write_markdown(data: dict[str, Any], path: Path) -> None:
    """The Markdown report: the cells' versions and counts, then each cell's failures and skips."""
    cols = ("python", "torch", "lightning", "torchmetrics", "lightning-utilities", "jsonargparse", "numpy", "triton")
    head = [
        "| cell | " + " | ".join(cols) + " | passed | failed | skipped | time | result |",
        "|---" * (len(cols) + 6) + "|",
    ]
    lines = [
        "# Version matrix",
        "",
        f"`{data['command']}` on {data['machine']}. Each cell: a fresh venv, torch first, then the package's wheel "
        f'with its `test` extra under the cell\'s constraints; `pytest -m "{data["marker"]}"` against the installed '
        "package (checked: every `lightning_ghostnoise` module the tests imported lies in the venv) and "
        "`ghostnoise --help`. Raw results, with the full `pip freeze` of each cell: `version_matrix.json`.",
        "",
    ]
    cells = [rec for rec in data["cells"] if not rec.get("probe")]
    probes = [rec for rec in data["cells"] if rec.get("probe")]
    for group, title in ((cells, None), (probes, "## Below the floors")):
        if not group:
            continue
        if title:
            lines += [title, "", "Cells that check why a floor is where it is: each is expected to fail.", ""]
        lines += head
        for rec in group:
            ver, cnt = rec.get("versions", {}), rec.get("counts", {})
            vals = [ver.get(c, rec["torch_pin"] if c == "torch" else "") for c in cols]
            failed = cnt.get("failed", 0) + cnt.get("errors", 0) if cnt else ""
            mins = rec.get("seconds", {}).get("total", 0) / 60
            lines.append(
                f"| {rec['cell']} | " + " | ".join(vals) + f" | {cnt.get('passed', '')} | {failed} | "
                f"{cnt.get('skipped', '')} | {mins:.1f} min | {rec['status']} |"
            )
        lines.append("")
        for rec in group:
            lines += _cell_lines(rec)
        lines.append("")
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    path.write_text("\n".join(lines))


#: What the runs showed about the floors and the newest releases (kept in the report).
NOTES = [
    "The floors pyproject.toml first promised (Python 3.9.18, torch 2.4.0, Lightning 2.2.0, torchmetrics 1.0.0, "
    "lightning-utilities 0.10.0, jsonargparse 4.27.0; tree ce7e9ba) failed 122 of 1521 fast tests. 85 + 3: "
    "Triton 3.0's interpreter (Triton <= 3.3, torch <= 2.7) takes a parameter as `tl.constexpr` only from an "
    "annotation object, and torch 2.4's `custom_op` cannot read string annotations, while the Triton modules "
    "postponed their annotations: fixed in the package (those modules evaluate their annotations). 19: "
    "`seed_everything(verbose=...)` needs Lightning >= 2.4 (`ghostnoise compare` and the tests use it): the "
    "Lightning floor is now 2.4 (cell lightning-2.3). 12: the tests called jsonargparse's `instantiate` "
    "(>= 4.49): they fall back to `instantiate_classes`. 1: torchmetrics < 1.6 has no `Metric.merge_state`: the "
    "test merges through the metric's own sync there (torchmetrics floor 1.0 kept). 1: Lightning < 2.5 replays "
    "the batch in whose `on_train_batch_end` a checkpoint was saved: the resume test expects that batch first "
    "there and still checks every (epoch, batch)'s values. 1: Triton < 3.4 has no `triton.knobs`: the cached "
    "launcher takes Triton's own launch there, which the test now checks.",
    "LightningCLI requires jsonargparse[signatures] >= 4.27.7 (its own requirement; 4.27.0 raises VersionConflict, "
    "cell jsonargparse-4.27.0): the `cli` and `test` extras' floor is now 4.27.7.",
    "Python 3.13 strips docstrings' indentation: a test that pinned a docstring's line break and indentation "
    "compares its words instead.",
    "torch 2.15.0 lies above this machine's pip constraint (torch <= 2.14.1, /etc/xdg/pip/pip.conf). Every pip "
    "command of a cell gets the cell's constraints file through PIP_CONSTRAINT, which replaces the configured "
    "constraint for that command only; the machine's files are unchanged.",
    "Lightning 2.6.6 is the newest release on PyPI (no 2.7 to test): the cap lightning < 2.7 stays.",
    "The whole suite beyond the fast one (`-m 'not gpu'`: slow, multi-process and packaging tests) on the oldest "
    "cell's venv (Python 3.9, torch 2.4.0, Lightning 2.4.0), source tree a24ddbb: 1579 passed, 25 failed. Fixed in "
    "the package: 19, torch 2.4's compiler could not trace `is_contiguous` inside the layers' autograd functions "
    "(a graph break per layer; the eager-only choice it fed is now skipped under the compiler). Feature-detected "
    "skips, each with its reason: torch 2.4's `fully_shard` needs CUDA (2 CPU ModelParallelStrategy tests; "
    "tests/gpu covers it), Triton 3.0's ASTSource takes no `constexprs` (the sm_90 compile check), torch 2.4's "
    "inductor has no `cpu_backend` (the launch-count benchmark), no git checkout in the matrix's snapshot "
    "(the A/B benchmark). The installed-wheel test now installs the running torch. Re-run from the source tree "
    "(the cell's venv kept by `--cells oldest --keep`, then `PYTHONPATH=. <venv>/bin/python -m pytest -m 'not gpu'` "
    "at commit 42a5cda): 1599 passed, 5 skipped, 1 failed (that pin, fixed next; the test then passed alone in 90 s).",
]
