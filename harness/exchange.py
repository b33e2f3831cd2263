"""Committed result data: ``reports/<suite>/runs.jsonl``, the text form of a store.

A report is only as durable as the data behind it, and SQLite files neither diff nor merge, so
every report is written with the runs it was built from, one JSON object per line:

* line 1, the header: ``{"format": "plausible-bench-runs", "version": 1, "suite": …,
  "structure": …}`` — the suite's name and structure (rows, columns, references, the plan), so
  the report can be rebuilt from this file alone;
* one ``{"session": {…}}`` line per session the runs ran in, sorted by its uuid;
* one ``{"run": {…}}`` line per run with its epochs, sorted by key.

Runs made on other machines or days add up: ``bench.py merge SUITE FILE`` loads a file into a
store (idempotent: sessions by uuid, runs by key), ``bench.py report FILE`` rebuilds the report.
The file is JSON only; nothing in it is ever executed or unpickled.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from harness.api import UserError

FORMAT = "plausible-bench-runs"
VERSION = 1
RUN_FIELDS = ("key", "status", "algorithm", "task", "label", "arch", "seed", "epochs")


def _finite(value: Any) -> Any:
    """NaN and ±inf as null: strict JSON, as every JSON reader expects."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


_ABSOLUTE = re.compile(r"(?<![\w.~:/…)\]}*`-])/(?:[^\s/=\"']+/)+([^\s/=\"']+)")
_PROJECT = str(Path(__file__).resolve().parents[1]) + os.sep


def without_machine_paths(text):
    """``text`` as it may be committed or shown in a report: paths inside this project relative
    to it (``harness/runner.py``), every other absolute path (a store, a data folder, a library)
    shortened to ``…/name`` (a path of at least two parts; URLs, ``a/b``, ``x//2`` and text
    already shortened are left alone). Anything not a string is returned as it is."""
    if not isinstance(text, str):
        return text
    return _ABSOLUTE.sub(r"…/\1", text.replace(_PROJECT, ""))


def _session(session: dict) -> dict:
    """A session as committed: no absolute path of the machine that ran it in its command
    line; the store keeps it whole."""
    return dict(session, command=without_machine_paths(session.get("command")))


def _run(run: dict) -> dict:
    """A run as committed: its reason and traceback without absolute machine paths."""
    return dict(run, reason=without_machine_paths(run.get("reason")),
                traceback=without_machine_paths(run.get("traceback")))


def _line(obj: dict) -> str:
    return json.dumps(_finite(obj), sort_keys=True, ensure_ascii=False, allow_nan=False)


def write_jsonl(records: dict, path: Path) -> Path:
    """Write ``records`` (see :meth:`harness.store.Store.export_records`) atomically."""
    path = Path(path)
    lines = [_line({"format": FORMAT, "version": VERSION, "suite": records.get("suite"),
                    "structure": records.get("structure")})]
    lines += [_line({"session": _session(s)}) for s in sorted(records.get("sessions", []),
                                                    key=lambda s: s["uuid"])]
    lines += [_line({"run": _run(r)}) for r in sorted(records.get("runs", []),
                                                      key=lambda r: r["key"])]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise UserError(f"{path}: cannot write the run data ({exc.strerror}); give a writable "
                        "--out folder") from None
    return path


def read_jsonl(path: Path) -> dict:
    """The records of a runs.jsonl, checked line by line; a malformed file is one UserError
    naming the file and the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such run data file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    records: dict = {"suite": None, "structure": None, "sessions": [], "runs": []}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            raise UserError(f"{path}: line {number} is not JSON") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line {number} is not a JSON object")
        if number == 1:
            if obj.get("format") != FORMAT:
                raise UserError(f"{path}: not a {FORMAT} file (its first line has no "
                                f"\"format\": \"{FORMAT}\")")
            if obj.get("version") != VERSION:
                raise UserError(f"{path}: format version {obj.get('version')!r}; this harness "
                                f"reads version {VERSION}")
            records["suite"], records["structure"] = obj.get("suite"), obj.get("structure")
        elif isinstance(obj.get("session"), dict) and isinstance(obj["session"].get("uuid"), str):
            records["sessions"].append(obj["session"])
        elif isinstance(obj.get("run"), dict):
            run = obj["run"]
            missing = [f for f in RUN_FIELDS if f not in run]
            if missing or not isinstance(run["epochs"], list):
                raise UserError(f"{path}: line {number}: a run needs {', '.join(missing) or 'epochs as a list'}")
            records["runs"].append(run)
        else:
            raise UserError(f"{path}: line {number} is neither a session nor a run")
    if records["structure"] is None and not records["runs"]:
        raise UserError(f"{path}: holds no runs")
    return records
