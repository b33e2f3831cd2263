"""What a report needs besides the runs: the suite's structure as the store recorded it, and
the escaping of anything a user wrote before it goes into a markdown table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class Layout:
    """What a report needs besides the runs: the suite's structure as the store recorded it
    (see ``Suite.structure``), so that a report is built without the YAML or the plugins."""

    name: str
    description: str
    protocol: str
    baseline: Optional[str]
    row_order: list
    column_order: list
    metrics: dict          # task label -> (primary metric, direction)
    references: dict       # (row, task label, arch) -> (mean, std or None)
    reference_source: str
    plan: list             # one dict per planned run: key, label, task, arch, seed, …
    raw: dict
    row_algorithms: Optional[dict] = None   # row label -> its algorithm plugin

    @classmethod
    def of(cls, structure: dict) -> "Layout":
        return cls(
            name=structure["name"], description=structure.get("description") or "",
            protocol=structure.get("protocol", "clean"), baseline=structure.get("baseline"),
            row_order=[r["label"] for r in structure.get("rows", [])],
            column_order=[(c["task"], c["arch"]) for c in structure.get("columns", [])],
            metrics={t: tuple(v["metrics"][0]) for t, v in structure.get("tasks", {}).items()},
            references={(r["row"], r["task"], r["arch"]): (r["mean"], r.get("std"))
                        for r in structure.get("references", [])},
            reference_source=structure.get("reference_source") or "",
            plan=structure.get("plan", []), raw=structure,
            row_algorithms={r["label"]: r.get("algorithm") for r in structure.get("rows", [])})

    def keys(self) -> list[str]:
        return [p["key"] for p in self.plan]


def md(text) -> str:
    """A value as it may stand in a markdown table cell: no pipe, newline or HTML of its own."""
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("|", "\\|").replace("\r", " ").replace("\n", " "))

