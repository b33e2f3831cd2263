"""What a report says about the runs it does not have: cells still missing (with the one
command that fills each) and runs that were skipped, failed or diverged, grouped by reason —
never one row per run."""
from __future__ import annotations

import shlex
from dataclasses import dataclass

from harness.exchange import without_machine_paths
from harness.report.layout import Layout
from harness.tune import row_of


@dataclass(frozen=True)
class MissingCell:
    row: str
    task: str
    arch: str
    seeds: tuple[int, ...]          # seeds not stored yet
    planned: int                    # seeds the suite plans for the cell
    command: str                    # the one command that fills it


@dataclass(frozen=True)
class Problem:
    status: str
    reason: str
    count: int
    cells: tuple[str, ...]          # "row on task/arch", in the suite's order


def _entry(label: str) -> str:
    return label.split(" (")[0]


def missing_cells(layout: Layout, runs) -> list[MissingCell]:
    """Planned runs with nothing stored (skipped runs count as stored: they have a reason),
    per (row, task, arch), with the command that runs exactly them."""
    stored = set(runs["key"]) if len(runs) else set()
    by_cell: dict[tuple, list] = {}
    for entry in layout.plan:
        row = row_of(entry["label"])      # a tuning trial: its row runs it
        cell = (row, entry["task"], entry["arch"])
        by_cell.setdefault(cell, []).append(entry)
    suite = layout.raw.get("path") or f"suites/{layout.name}.yaml"
    all_seeds = {e["seed"] for e in layout.plan}
    out = []
    for (row, task, arch), entries in by_cell.items():
        seeds = tuple(sorted({e["seed"] for e in entries if e["key"] not in stored}))
        if not seeds:
            continue
        parts = ["python", "bench.py", suite, "--only", f"algorithm={row}", "--only",
                 f"task={task}", "--only", f"arch={arch}"]
        if any(e.get("role") == "trial" for e in entries):
            pass                        # a tuned row: its trials and finals run together
        elif set(seeds) != {e["seed"] for e in entries} or set(seeds) != all_seeds:
            parts += ["--only", "seed=" + ",".join(map(str, seeds))]
        out.append(MissingCell(row, task, arch, seeds, len({e["seed"] for e in entries}),
                               " ".join(shlex.quote(p) for p in parts)))
    order = {r: i for i, r in enumerate(layout.row_order)}
    columns = {c: i for i, c in enumerate(layout.column_order)}
    return sorted(out, key=lambda m: (columns.get((m.task, m.arch), 99), order.get(m.row, 99)))


def grouped_missing(layout: Layout, missing: list[MissingCell],
                    runs=None) -> list[tuple[str, str, str, str]]:
    """(rows, task/arch, runs missing, command) lines for the report: a task/arch column where
    every row planned for it misses runs, or has only skipped ones (``runs``: the stored runs'
    ``key`` and ``status``), is one line with one command for the column (it runs what is not
    stored: a resumed suite skips the rest) — a dataset this machine cannot have is one line,
    not one per rule, whichever rules tried it already; other cells are a line each."""
    status = (dict(zip(runs["key"], runs["status"]))
              if runs is not None and len(runs) and "status" in runs else {})
    planned: dict[tuple, set] = {}
    planned_runs: dict[tuple, int] = {}
    resulted: dict[tuple, set] = {}    # rows with a stored run that is not a skip
    tuned = set()
    for entry in layout.plan:
        row, column = row_of(entry["label"]), (entry["task"], entry["arch"])
        planned.setdefault(column, set()).add(row)
        planned_runs[column] = planned_runs.get(column, 0) + 1
        if entry["key"] in status and status[entry["key"]] != "skipped":
            resulted.setdefault(column, set()).add(row)
        if entry.get("role") == "trial":
            tuned.add(column)
    by_column: dict[tuple, list[MissingCell]] = {}
    for m in missing:
        by_column.setdefault((m.task, m.arch), []).append(m)
    suite = layout.raw.get("path") or f"suites/{layout.name}.yaml"
    out = []
    for (task, arch), cells in by_column.items():
        rows = planned.get((task, arch), set())
        skipped_only = rows - {m.row for m in cells} - resulted.get((task, arch), set()) \
            if status else set()
        if len(cells) < 2 or {m.row for m in cells} | skipped_only != rows \
                or (task, arch) in tuned:
            out += [(m.row, f"{task}/{arch}", f"{len(m.seeds)} of {m.planned}", m.command)
                    for m in cells]
            continue
        parts = ["python", "bench.py", suite, "--only", f"task={task}", "--only", f"arch={arch}"]
        out.append((f"every rule ({len(rows)})", f"{task}/{arch}",
                    f"{sum(len(m.seeds) for m in cells)} of {planned_runs[(task, arch)]}",
                    " ".join(shlex.quote(p) for p in parts)))
    return out


def problems(layout: Layout, runs) -> list[Problem]:
    """Skipped, failed and diverged runs grouped by (status, reason)."""
    bad = runs[runs["status"].isin(["skipped", "error", "diverged"])]
    groups: dict[tuple[str, str], list] = {}
    for status, reason, label, task, arch in zip(bad["status"], bad["reason"], bad["label"],
                                                 bad["task_label"], bad["arch"]):
        groups.setdefault((status, without_machine_paths(reason) or ""), []).append(
            f"{label} on {task}/{arch}")
    out = []
    for (status, reason), cells in groups.items():
        unique = list(dict.fromkeys(cells))
        out.append(Problem(status, reason, len(cells), tuple(unique)))
    rank = {"error": 0, "diverged": 1, "skipped": 2}
    return sorted(out, key=lambda p: (rank.get(p.status, 3), -p.count, p.reason))
