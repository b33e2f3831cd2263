"""The result store: an embedded SQLite database, one file per suite by default.

Tables: ``sessions`` (who ran what where: versions, commit, CPU/GPU, threads), ``runs`` (one
row per RunSpec key, with status, reason, memory and the epochs each protocol selects) and
``epochs`` (one row per epoch: times, losses, metrics as JSON). A run and its epochs are written
in one transaction when the run finishes, so a run killed mid-way leaves nothing behind and
re-running the suite picks it up again.

``load(path)`` gives the whole store as pandas DataFrames in one call.
"""
from __future__ import annotations

import json
import platform
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Iterable, NamedTuple, Optional

from harness.api import RunResult, UserError

SCHEMA_VERSION = 1
DONE_STATUSES = ("ok", "diverged", "error")   # a re-run skips these; skipped runs are retried
SELECTION_COLUMNS = ("metric", "direction", "clean_epoch", "clean_val", "clean_test",
                     "paper_epoch", "paper_test")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at TEXT, command TEXT, suite TEXT, python TEXT, torch TEXT, project_version TEXT,
    git_commit TEXT, platform TEXT, cpu TEXT, cores INTEGER, gpu TEXT, jobs INTEGER,
    threads INTEGER, backend TEXT, device TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY, session_id INTEGER REFERENCES sessions(id), suite TEXT, label TEXT,
    algorithm TEXT, task TEXT, task_label TEXT, arch TEXT, seed INTEGER, protocol TEXT, device TEXT,
    params TEXT, task_params TEXT, spec TEXT,
    status TEXT NOT NULL, reason TEXT, traceback TEXT,
    threads INTEGER, peak_memory_mb REAL, memory_kind TEXT, n_parameters INTEGER,
    epochs_run INTEGER, metric TEXT, direction TEXT,
    clean_epoch INTEGER, clean_val REAL, clean_test REAL, paper_epoch INTEGER, paper_test REAL,
    started_at TEXT, finished_at TEXT, notes TEXT
);
CREATE TABLE IF NOT EXISTS epochs (
    run_key TEXT REFERENCES runs(key) ON DELETE CASCADE, epoch INTEGER,
    train_time_s REAL, eval_time_s REAL, train_loss REAL, lr REAL, warmup INTEGER,
    metrics TEXT, PRIMARY KEY (run_key, epoch)
);
"""


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (out.stdout.strip() or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(jobs: int, threads: int, backend: str, device: str) -> dict:
    import torch
    from harness import __version__
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    import os
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "project_version": __version__, "git_commit": _git_commit(),
            "platform": platform.platform(), "cpu": _cpu_name(), "cores": cores, "gpu": gpu,
            "jobs": jobs, "threads": threads, "backend": backend, "device": device}


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path, timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            with self.conn:
                self.conn.executescript(SCHEMA)
                self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                                  (str(SCHEMA_VERSION),))
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.path}: not a result store ({exc})") from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_session(self, command: str, suite: str, env: dict) -> int:
        with self.conn:
            cur = self.conn.execute(
                "INSERT INTO sessions (started_at, command, suite, python, torch, project_version,"
                " git_commit, platform, cpu, cores, gpu, jobs, threads, backend, device) VALUES"
                " (datetime('now'), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (command, suite, env["python"], env["torch"], env["project_version"],
                 env["git_commit"], env["platform"], env["cpu"], env["cores"], env["gpu"],
                 env["jobs"], env["threads"], env["backend"], env["device"]))
            return int(cur.lastrowid)

    def merge_from(self, other: str | Path, replace: bool = False) -> tuple[int, int]:
        """Copy the runs (with their epochs and sessions) of another store into this one, in
        one transaction: stores filled on different machines become one. Run keys are content
        hashes, so the same run is the same row; a run already here is kept unless ``replace``.
        Returns (runs copied, runs already present)."""
        other = Path(other)
        if not other.exists():
            raise UserError(f"{other}: no result store there")
        if other.resolve() == self.path.resolve():
            raise UserError(f"{other}: cannot merge a store into itself")
        try:
            self.conn.execute("ATTACH DATABASE ? AS src", (str(other),))
            source_runs = self.conn.execute("SELECT key FROM src.runs").fetchall()
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{other}: not a result store ({exc})") from None
        try:
            here = {k for (k,) in self.conn.execute("SELECT key FROM runs")}
            wanted = [k for (k,) in source_runs if replace or k not in here]
            session_cols = [c[1] for c in self.conn.execute("PRAGMA table_info(sessions)")][1:]
            run_cols = [c[1] for c in self.conn.execute("PRAGMA table_info(runs)")]
            with self.conn:
                new_id = {}
                for (old_id,) in self.conn.execute(
                        "SELECT DISTINCT session_id FROM src.runs WHERE session_id IS NOT NULL"):
                    cur = self.conn.execute(
                        f"INSERT INTO sessions ({', '.join(session_cols)}) SELECT "
                        f"{', '.join(session_cols)} FROM src.sessions WHERE id = ?", (old_id,))
                    new_id[old_id] = cur.lastrowid
                for key in wanted:
                    self.conn.execute("DELETE FROM epochs WHERE run_key = ?", (key,))
                    self.conn.execute(f"INSERT OR REPLACE INTO runs ({', '.join(run_cols)}) SELECT "
                                      f"{', '.join(run_cols)} FROM src.runs WHERE key = ?", (key,))
                    old_id = self.conn.execute("SELECT session_id FROM runs WHERE key = ?",
                                               (key,)).fetchone()[0]
                    self.conn.execute("UPDATE runs SET session_id = ? WHERE key = ?",
                                      (new_id.get(old_id), key))
                    self.conn.execute("INSERT INTO epochs SELECT * FROM src.epochs WHERE run_key = ?",
                                      (key,))
        finally:
            self.conn.execute("DETACH DATABASE src")
        return len(wanted), len(source_runs) - len(wanted)

    def statuses(self, keys: Optional[Iterable[str]] = None) -> dict[str, str]:
        rows = self.conn.execute("SELECT key, status FROM runs").fetchall()
        wanted = None if keys is None else set(keys)
        return {k: s for k, s in rows if wanted is None or k in wanted}

    def save(self, result: RunResult, session_id: Optional[int]) -> None:
        """Write one finished run and its epochs in a single transaction (replacing any older
        record of the same key)."""
        spec = result.spec
        key = spec.key()
        row = dict(
            key=key, session_id=session_id, suite=spec.suite, label=spec.label,
            algorithm=spec.algorithm, task=spec.task, task_label=spec.task_label or spec.task, arch=spec.arch.name, seed=spec.seed,
            protocol=spec.protocol, device=spec.device,
            params=json.dumps(dict(spec.params), default=str),
            task_params=json.dumps(dict(spec.task_params), default=str),
            spec=json.dumps(spec.to_json(), default=str), status=result.status,
            reason=result.reason, traceback=result.traceback, threads=result.threads,
            peak_memory_mb=result.peak_memory_mb, memory_kind=result.memory_kind,
            n_parameters=result.n_parameters, epochs_run=len(result.epochs),
            started_at=result.started_at, finished_at=result.finished_at,
            notes=json.dumps(result.notes, default=str),
            **{column: result.selection.get(column) for column in SELECTION_COLUMNS})
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self.conn:
            self.conn.execute("DELETE FROM epochs WHERE run_key = ?", (key,))
            self.conn.execute(f"INSERT OR REPLACE INTO runs ({columns}) VALUES ({marks})",
                              tuple(row.values()))
            self.conn.executemany(
                "INSERT INTO epochs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(key, e.epoch, e.train_time_s, e.eval_time_s, e.train_loss, e.lr, int(e.warmup),
                  json.dumps(e.metrics)) for e in result.epochs])


class Frames(NamedTuple):
    runs: "object"       # pandas.DataFrame
    epochs: "object"     # pandas.DataFrame, metrics flattened to <split>_<metric> columns
    sessions: "object"   # pandas.DataFrame


def load(path: str | Path, keys: Optional[Iterable[str]] = None) -> Frames:
    """The store as pandas DataFrames: ``runs``, ``epochs`` (joined with the run's algorithm,
    label, task, arch, seed) and ``sessions``. ``keys`` restricts to those runs."""
    import pandas as pd
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no result store there (run the suite first)")
    conn = sqlite3.connect(path)
    try:
        runs = pd.read_sql_query("SELECT * FROM runs", conn)
        epochs = pd.read_sql_query("SELECT * FROM epochs", conn)
        sessions = pd.read_sql_query("SELECT * FROM sessions", conn)
    except Exception as exc:
        raise UserError(f"{path}: not a result store ({exc})") from None
    finally:
        conn.close()
    if keys is not None:
        wanted = set(keys)
        runs = runs[runs["key"].isin(wanted)].reset_index(drop=True)
        epochs = epochs[epochs["run_key"].isin(wanted)].reset_index(drop=True)
    if len(epochs):
        flat = pd.json_normalize([json.loads(m) for m in epochs["metrics"]], sep="_")
        epochs = pd.concat([epochs.drop(columns=["metrics"]), flat], axis=1)
    else:
        epochs = epochs.drop(columns=["metrics"])
    info = runs[["key", "label", "algorithm", "task", "task_label", "arch", "seed", "status"]]
    epochs = epochs.merge(info, left_on="run_key", right_on="key", how="left").drop(columns=["key"])
    epochs["warmup"] = epochs["warmup"].astype(bool)
    return Frames(runs, epochs, sessions)

