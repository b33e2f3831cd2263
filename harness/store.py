"""The result store: an embedded SQLite database, one file per suite by default.

Tables: ``meta`` (the suite's name and structure, for reports without the YAML), ``sessions``
(who ran what where: versions, commit, CPU/GPU, threads), ``runs`` (one row per RunSpec key:
status, reason, memory, what each protocol selects, and the fingerprint of the source that made
it), ``epochs`` (times, losses, metrics as JSON) and ``claims`` (which process is computing which
run, so two processes on one store never compute the same run). A run and its epochs are written
in one transaction when the run finishes, so a run killed mid-way leaves nothing behind.

The file is marked with SQLite's ``application_id`` (and ``user_version`` = the schema), so a
file of another program is recognised from its header and never modified. Every failure to open,
read or write a store is one :class:`UserError` that names the path and what to do.

:func:`load` gives a store (or a committed ``runs.jsonl``, see :mod:`harness.exchange`) as pandas
DataFrames in one call.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Optional

from harness.api import DONE_STATUSES, RunResult, Selection, UserError

APPLICATION_ID = 0x504C4231          # "PLB1": a plausible-bench result store
SCHEMA_VERSION = 2
CLAIM_TTL_S = 600.0                  # a claim not renewed for this long is abandoned
SELECTION_COLUMNS = tuple(f.name for f in fields(Selection))
JSON_COLUMNS = ("params", "task_params", "spec", "notes", "fingerprint")


@dataclass(frozen=True)
class Environment:
    """Where a session ran: recorded once per ``run`` and shown in every report."""

    python: str
    torch: str
    project_version: str
    git_commit: str
    platform: str
    cpu: str
    cores: int
    gpu: str
    jobs: int
    threads: int
    backend: str
    device: str


SESSION_COLUMNS = ("uuid", "started_at", "command", "suite",
                   *(f.name for f in fields(Environment)))
RUN_COLUMNS = ("key", "suite", "label", "algorithm", "algorithm_version", "task",
               "task_version", "task_label", "arch", "seed", "protocol", "device", "params",
               "task_params", "spec", "status", "reason", "traceback", "threads",
               "peak_memory_mb", "memory_kind", "n_parameters", "epochs_run",
               *SELECTION_COLUMNS, "started_at", "finished_at", "notes", "source",
               "fingerprint")
EPOCH_COLUMNS = ("epoch", "train_time_s", "eval_time_s", "train_loss", "lr", "warmup",
                 "metrics")

SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE sessions (id INTEGER PRIMARY KEY AUTOINCREMENT, uuid TEXT UNIQUE NOT NULL,
    started_at TEXT, command TEXT, suite TEXT, python TEXT, torch TEXT, project_version TEXT,
    git_commit TEXT, platform TEXT, cpu TEXT, cores INTEGER, gpu TEXT, jobs INTEGER,
    threads INTEGER, backend TEXT, device TEXT);
CREATE TABLE runs (key TEXT PRIMARY KEY, session_id INTEGER REFERENCES sessions(id),
    suite TEXT, label TEXT, algorithm TEXT, algorithm_version INTEGER, task TEXT,
    task_version INTEGER, task_label TEXT, arch TEXT, seed INTEGER, protocol TEXT,
    device TEXT, params TEXT, task_params TEXT, spec TEXT, status TEXT NOT NULL, reason TEXT,
    traceback TEXT, threads INTEGER, peak_memory_mb REAL, memory_kind TEXT,
    n_parameters INTEGER, epochs_run INTEGER, metric TEXT, direction TEXT,
    clean_epoch INTEGER, clean_val REAL, clean_test REAL, paper_epoch INTEGER,
    paper_test REAL, started_at TEXT, finished_at TEXT, notes TEXT, source TEXT,
    fingerprint TEXT);
CREATE TABLE epochs (run_key TEXT REFERENCES runs(key) ON DELETE CASCADE, epoch INTEGER,
    train_time_s REAL, eval_time_s REAL, train_loss REAL, lr REAL, warmup INTEGER,
    metrics TEXT, PRIMARY KEY (run_key, epoch));
CREATE TABLE claims (key TEXT PRIMARY KEY, owner TEXT NOT NULL, host TEXT, pid INTEGER,
    claimed_at REAL, heartbeat REAL);
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {SCHEMA_VERSION};
"""


# --------------------------------------------------------------------------------------------
# The environment a session ran in
# --------------------------------------------------------------------------------------------

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


def cpu_name() -> str:
    """This machine's CPU model, as sessions record it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(jobs: int, threads: int, backend: str, device: str) -> Environment:
    import torch
    from harness import __version__
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Environment(python=sys.version.split()[0], torch=torch.__version__,
                       project_version=__version__, git_commit=_git_commit(),
                       platform=platform.platform(), cpu=cpu_name(), cores=int(cores or 1),
                       gpu=gpu, jobs=jobs, threads=threads, backend=backend, device=device)


# --------------------------------------------------------------------------------------------
# Claims: which process computes which run
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Owner:
    """This process, as the owner of claims."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)


def alive(pid: int) -> bool:
    """Whether a process of this id runs on this host (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _abandoned(host: str, pid: int, heartbeat: float) -> bool:
    if host == socket.gethostname() and pid and not alive(pid):
        return True
    return time.time() - (heartbeat or 0.0) > CLAIM_TTL_S


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------

def _header_problem(path: Path) -> Optional[str]:
    """Why the file at ``path`` is not one of our stores (None when it is), from its header."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(100)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return "is not a result store (not an SQLite database); it was left as it is"
    app = int.from_bytes(header[68:72], "big")
    schema = int.from_bytes(header[60:64], "big")
    if app != APPLICATION_ID:
        return ("is an SQLite database of another program, not a result store; it was not "
                "modified (give another --store)")
    if schema != SCHEMA_VERSION:
        return (f"is a result store of schema {schema}; this harness reads schema "
                f"{SCHEMA_VERSION} (move it away, or use the harness version that wrote it)")
    return None


class Store:
    """One result store. ``readonly`` opens an existing store without writing anything (so a
    store on a read-only medium can be reported); ``shared``: one connection used by several
    threads (the caller serialises them); ``":memory:"`` is a store in memory."""

    def __init__(self, path: str | Path, readonly: bool = False, shared: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        memory = str(path) == ":memory:"
        fresh = memory
        if not memory:
            if self.path.is_dir():
                raise UserError(f"{self.path}: is a directory, not a result store")
            if self.path.exists() and self.path.stat().st_size > 0:
                problem = _header_problem(self.path)
                if problem:
                    raise UserError(f"{self.path}: {problem}")
            elif readonly:
                raise UserError(f"{self.path}: no result store there (run the suite first)")
            else:
                self._check_writable_folder()
                self._create()
        try:
            if readonly:
                self.conn = sqlite3.connect(f"file:{self.path.resolve()}?mode=ro", uri=True,
                                            timeout=30, isolation_level=None,
                                            check_same_thread=not shared)
            else:
                self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                            check_same_thread=not shared)
            self.conn.execute("PRAGMA foreign_keys=ON")
            if fresh:
                self.conn.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    def _create(self) -> None:
        """A new store, atomically: built beside its path and linked into place, so that a
        second process starting at the same moment opens a complete store (never a half-made
        one, and never one it mistakes for another program's file)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.new")
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            conn.executescript(SCHEMA)
            conn.close()
            if self.path.exists() and self.path.stat().st_size == 0:
                os.replace(tmp, self.path)          # an empty file: nothing to lose
            else:
                os.link(tmp, self.path)
        except FileExistsError:
            pass                                    # another process made it first
        except (OSError, sqlite3.Error) as exc:
            raise UserError(f"{self.path}: cannot create the store ({exc}); give a writable "
                            "--store PATH") from None
        finally:
            try:
                tmp.unlink()
            except OSError:
                pass

    def _check_writable_folder(self) -> None:
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{self.path}: cannot create its folder {folder} ({exc.strerror}); "
                            "give a writable --store PATH") from None
        if not os.access(folder, os.W_OK):
            raise UserError(f"{self.path}: the folder {folder} is read-only; give a writable "
                            "--store PATH")

    def _error(self, exc: Exception) -> UserError:
        text = str(exc)
        if "readonly" in text or "read-only" in text or "unable to open" in text:
            return UserError(f"{self.path}: cannot write the store ({text}); its folder or "
                             "medium is read-only: give a writable --store PATH")
        if "malformed" in text or "not a database" in text or "encrypted" in text:
            return UserError(f"{self.path}: the store is corrupt ({text}); move it away (its "
                             "runs can be recovered from a committed runs.jsonl, if any)")
        return UserError(f"{self.path}: store error ({text})")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT (ROLLBACK on any error), store errors as UserError."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        try:
            yield self.conn
        except sqlite3.Error as exc:
            self.conn.execute("ROLLBACK")
            raise self._error(exc) from None
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._error(exc) from None

    def query(self, sql: str, args: tuple = ()) -> list:
        try:
            return self.conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- meta ------------------------------------------------------------------------------

    def meta(self, key: str) -> Optional[str]:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, **values: str) -> None:
        with self.transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(values.items()))

    def record_suite(self, name: str, structure: dict) -> None:
        """The suite this store belongs to, and what its report needs (see Suite.structure)."""
        self.set_meta(suite=name, structure=json.dumps(structure, sort_keys=True))

    def structure(self) -> Optional[dict]:
        text = self.meta("structure")
        return json.loads(text) if text else None

    # -- sessions --------------------------------------------------------------------------

    def start_session(self, command: str, suite: str, env: Environment) -> int:
        row = dict(asdict(env), uuid=uuid.uuid4().hex, command=command, suite=suite,
                   started_at=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
        with self.transaction() as conn:
            cur = conn.execute(f"INSERT INTO sessions ({', '.join(SESSION_COLUMNS)}) VALUES "
                               f"({', '.join('?' for _ in SESSION_COLUMNS)})",
                               tuple(row.get(c) for c in SESSION_COLUMNS))
            return int(cur.lastrowid)

    # -- runs ------------------------------------------------------------------------------

    def statuses(self, keys: Optional[Iterable[str]] = None) -> dict[str, str]:
        rows = self.query("SELECT key, status FROM runs")
        wanted = None if keys is None else set(keys)
        return {k: s for k, s in rows if wanted is None or k in wanted}

    def sources(self) -> dict[str, Optional[str]]:
        """Run key → the source digest it was made with."""
        return dict(self.query("SELECT key, source FROM runs"))

    def settings(self) -> dict[str, tuple[Optional[int], Optional[str]]]:
        """Run key → (the torch threads it ran with, the CPU model of its session); None where
        not recorded."""
        return {key: (threads, cpu) for key, threads, cpu in self.query(
            "SELECT runs.key, runs.threads, sessions.cpu FROM runs "
            "LEFT JOIN sessions ON sessions.id = runs.session_id")}

    def save(self, result: RunResult, session_id: Optional[int],
             owner: Optional[Owner] = None) -> None:
        """Write one finished run and its epochs in one transaction (replacing an older record
        of the same key), and drop this owner's claim on it."""
        spec = result.spec
        key = spec.key()
        row = dict(
            key=key, suite=spec.suite, label=spec.label, algorithm=spec.algorithm,
            algorithm_version=spec.algorithm_version, task=spec.task,
            task_version=spec.task_version, task_label=spec.task_label or spec.task,
            arch=spec.arch.name, seed=spec.seed, protocol=spec.protocol, device=spec.device,
            params=dict(spec.params), task_params=dict(spec.task_params), spec=spec.to_json(),
            status=str(result.status), reason=result.reason, traceback=result.traceback,
            threads=result.threads, peak_memory_mb=result.peak_memory_mb,
            memory_kind=result.memory_kind, n_parameters=result.n_parameters,
            epochs_run=len(result.epochs), started_at=result.started_at,
            finished_at=result.finished_at, notes=result.notes,
            source=result.fingerprint.get("source"), fingerprint=result.fingerprint,
            **asdict(result.selection))
        epochs = [dict(epoch=e.epoch, train_time_s=e.train_time_s, eval_time_s=e.eval_time_s,
                       train_loss=e.train_loss, lr=e.lr, warmup=int(e.warmup),
                       metrics=e.metrics) for e in result.epochs]
        with self.transaction() as conn:
            self._insert_run(conn, row, session_id, epochs)
            if owner is not None:
                conn.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, owner.id))

    @staticmethod
    def _insert_run(conn, row: dict, session_id: Optional[int], epochs: list[dict]) -> None:
        values = [json.dumps(row.get(c), default=str) if c in JSON_COLUMNS else row.get(c)
                  for c in RUN_COLUMNS]
        conn.execute("DELETE FROM epochs WHERE run_key = ?", (row["key"],))
        conn.execute(f"INSERT OR REPLACE INTO runs (session_id, {', '.join(RUN_COLUMNS)}) "
                     f"VALUES (?, {', '.join('?' for _ in RUN_COLUMNS)})",
                     (session_id, *values))
        conn.executemany(
            f"INSERT INTO epochs (run_key, {', '.join(EPOCH_COLUMNS)}) VALUES "
            f"(?, {', '.join('?' for _ in EPOCH_COLUMNS)})",
            [(row["key"], *[json.dumps(e[c]) if c == "metrics" else e[c]
                            for c in EPOCH_COLUMNS]) for e in epochs])

    # -- claims ----------------------------------------------------------------------------

    def claim(self, key: str, owner: Owner, rerun: bool = False) -> str:
        """``claimed`` (this owner computes the run now), ``done`` (it is stored meanwhile) or
        ``taken`` (a live process computes it)."""
        with self.transaction() as conn:
            if not rerun:
                row = conn.execute("SELECT status FROM runs WHERE key = ?", (key,)).fetchone()
                if row and row[0] in DONE_STATUSES:
                    return "done"
            row = conn.execute("SELECT owner, host, pid, heartbeat FROM claims WHERE key = ?",
                               (key,)).fetchone()
            if row and row[0] != owner.id and not _abandoned(row[1], row[2], row[3]):
                return "taken"
            now = time.time()
            conn.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?, ?)",
                         (key, owner.id, owner.host, owner.pid, now, now))
            return "claimed"

    def release(self, owner: Owner, key: Optional[str] = None) -> None:
        with self.transaction() as conn:
            if key is None:
                conn.execute("DELETE FROM claims WHERE owner = ?", (owner.id,))
            else:
                conn.execute("DELETE FROM claims WHERE owner = ? AND key = ?", (owner.id, key))

    def renew(self, owner: Owner) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE claims SET heartbeat = ? WHERE owner = ?", (time.time(), owner.id))

    def claimed_elsewhere(self, owner: Owner) -> set[str]:
        return {k for k, o, host, pid, beat in self.query(
            "SELECT key, owner, host, pid, heartbeat FROM claims")
                if o != owner.id and not _abandoned(host, pid, beat)}

    # -- moving runs between stores --------------------------------------------------------

    def export_records(self, keys: Optional[Iterable[str]] = None) -> dict:
        """Everything about the runs (all, or ``keys``) as plain data: the suite, its
        structure, the sessions they ran in (by uuid) and each run with its epochs."""
        wanted = None if keys is None else set(keys)
        columns = ", ".join(RUN_COLUMNS)
        runs, used = [], set()
        sessions = {sid: dict(zip(SESSION_COLUMNS, rest)) for sid, *rest in self.query(
            f"SELECT id, {', '.join(SESSION_COLUMNS)} FROM sessions")}
        epochs: dict[str, list[dict]] = {}
        for run_key, *rest in self.query(
                f"SELECT run_key, {', '.join(EPOCH_COLUMNS)} FROM epochs ORDER BY run_key, epoch"):
            epoch = dict(zip(EPOCH_COLUMNS, rest))
            epoch["metrics"] = json.loads(epoch["metrics"])
            epoch["warmup"] = bool(epoch["warmup"])
            epochs.setdefault(run_key, []).append(epoch)
        for session_id, *rest in self.query(f"SELECT session_id, {columns} FROM runs "
                                            "ORDER BY key"):
            run = dict(zip(RUN_COLUMNS, rest))
            if wanted is not None and run["key"] not in wanted:
                continue
            for column in JSON_COLUMNS:
                run[column] = json.loads(run[column]) if run[column] else None
            session = sessions.get(session_id)
            run["session"] = session["uuid"] if session else None
            if session:
                used.add(session_id)
            run["epochs"] = epochs.get(run["key"], [])
            runs.append(run)
        return {"suite": self.meta("suite"), "structure": self.structure(),
                "sessions": sorted((sessions[i] for i in used), key=lambda s: s["uuid"]),
                "runs": runs}

    def import_records(self, records: dict, replace: bool = False, force: bool = False,
                       source: str = "") -> tuple[int, int]:
        """Add runs exported from another store (or a runs.jsonl), in one transaction.
        Idempotent: sessions are matched by uuid, runs by key (a run already here is kept
        unless ``replace``). Runs of another suite are refused unless ``force``.
        Returns (runs copied, runs already present)."""
        mine, theirs = self.meta("suite"), records.get("suite")
        if mine and theirs and mine != theirs and not force:
            raise UserError(f"{source or 'the source'}: holds runs of suite {theirs!r}, not "
                            f"{mine!r}; use --force to merge them anyway")
        here = set(self.statuses())
        copied = present = 0
        with self.transaction() as conn:
            session_ids = dict(conn.execute("SELECT uuid, id FROM sessions").fetchall())
            for session in records.get("sessions", []):
                if session["uuid"] not in session_ids:
                    cur = conn.execute(
                        f"INSERT INTO sessions ({', '.join(SESSION_COLUMNS)}) VALUES "
                        f"({', '.join('?' for _ in SESSION_COLUMNS)})",
                        tuple(session.get(c) for c in SESSION_COLUMNS))
                    session_ids[session["uuid"]] = cur.lastrowid
            for run in records.get("runs", []):
                if run["key"] in here and not replace:
                    present += 1
                    continue
                self._insert_run(conn, run, session_ids.get(run.get("session")),
                                 run.get("epochs", []))
                copied += 1
            if not mine and theirs:
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('suite', ?)", (theirs,))
            if records.get("structure") and not self.meta("structure"):
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('structure', ?)",
                             (json.dumps(records["structure"], sort_keys=True),))
        return copied, present


def open_results(path: str | Path) -> Store:
    """A store to read: a SQLite store (read-only), or a runs.jsonl loaded into memory."""
    path = Path(path)
    if path.suffix == ".jsonl":
        from harness.exchange import read_jsonl
        store = Store(":memory:")
        store.import_records(read_jsonl(path), force=True)
        store.path = path
        return store
    return Store(path, readonly=True)


class Frames(NamedTuple):
    runs: "object"       # pandas.DataFrame
    epochs: "object"     # pandas.DataFrame, metrics flattened to <split>_<metric> columns
    sessions: "object"   # pandas.DataFrame


def frames(store: Store, keys: Optional[Iterable[str]] = None) -> Frames:
    """A store as pandas DataFrames: ``runs``, ``epochs`` (joined with the run's algorithm,
    label, task, arch, seed, status) and ``sessions``. ``keys`` restricts to those runs."""
    import pandas as pd
    try:
        runs = pd.read_sql_query("SELECT * FROM runs", store.conn)
        epochs = pd.read_sql_query("SELECT * FROM epochs", store.conn)
        sessions = pd.read_sql_query("SELECT * FROM sessions", store.conn)
    except Exception as exc:  # pandas wraps sqlite errors in its own types
        raise UserError(f"{store.path}: not a readable result store ({exc})") from None
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


def load(path: str | Path, keys: Optional[Iterable[str]] = None) -> Frames:
    """The store at ``path`` (SQLite, or a runs.jsonl) as pandas DataFrames."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no result store there (run the suite first)")
    with open_results(path) as store:
        return frames(store, keys)
