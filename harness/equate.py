"""``bench.py equate``: show that a change of code leaves the stored runs' numbers as they were,
and record it, so that those runs stay current instead of going stale.

Every run records digests of the code that made it (:mod:`harness.fingerprint`); any edit to
that code makes the stored runs *stale*, to be run again — a day of CPU for the paper table,
even for a change that only makes a rule faster or moves code between files. ``equate`` is the
way such a change keeps them: for each configuration (a run's identity without its seed,
:func:`harness.fingerprint.config_of`) whose stored runs are stale, it re-runs a stored run with
the current code for its first epochs — same seed, same threads — and compares every number
the store holds for them (training loss, learning rate, every metric of every split). Only where
they agree (exactly, or within ``--tolerance``, relative) does it append to
``equivalences.yaml`` an entry saying that runs of that configuration made with the old digest
count as runs of the new one. A configuration that differs is reported with the number that
moved, and stays stale: run it again (``--rerun-stale``).

Runs made on another CPU model (or at other threads) differ from a re-run here in their last
digits even with unchanged code — after one epoch of the paper table's FashionMNIST MLP, BP's
test loss moved by 1.7e-3 (relative) between an Intel Xeon and an AMD EPYC — so an exact check
against them cannot tell rounding from a real change. ``--baseline DIR`` does the check on this
machine instead: DIR is a checkout of the code the stored runs were made with (``git worktree
add DIR COMMIT``); each configuration runs there and here, same seed and threads, and the two
must agree (exactly by default), its digest there having to be the stored runs'. The stored
numbers are then compared for information only.

What a check can and cannot show: the first epochs equal, to the last bit, mean the new code
computes what the old one did on this path, for this configuration; the tail of a run (a
schedule's later epochs, early stopping) is not re-run. A tolerance above 0 accepts float
rounding (another CPU model, a reordered sum); over a whole run such differences grow to
seed-level noise, so the entry records the largest difference it saw.
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from harness import fingerprint
from harness.api import RunSpec, Status, UserError, device_kind

CHECKED_STATUSES = (Status.OK, Status.DIVERGED)
STORED_LIMIT = 0.05     # --baseline: the stored numbers may differ from the old code's re-run
                        # here by float rounding grown over an epoch (1.7e-3 seen), not more
HEADER = """\
# Verified equivalences of code (harness/fingerprint.py, `python bench.py equate --help`).
#
# Each entry says: stored runs of this configuration (`config`: the run's identity without its
# seed) made with the code of digest `from` count as runs of the code of digest `to`, because
# `bench.py equate` re-ran the runs named under `runs` with the `to` code and every number of
# their first `epochs` epochs agreed (largest relative difference: max_relative_difference).
# An entry holds for its device kind (`device`; cpu where absent) and configuration only.
# With `compared_with: the old code re-run on this machine`, the agreement is with a re-run of
# the `from` code here (runs stored on another CPU model). The stored selection (the epoch each
# protocol takes) is checked against the current code's choice over all stored epochs.
# Entries are written by `bench.py equate`, never by hand; delete one to make its runs stale.
"""


@dataclass
class Cell:
    """Stale stored runs of one configuration that share an old and a new digest."""
    config: str
    old: str                       # the digest the stored runs count as now (resolved)
    new: str                       # the digest the current code gives them
    runs: list = field(default_factory=list)   # (spec, stored record, cpu of its session)

    @property
    def first(self) -> RunSpec:
        return self.runs[0][0]

    def name(self) -> str:
        spec = self.first
        return f"{spec.label or spec.algorithm} on {spec.task_label or spec.task}/{spec.arch.name}"


@dataclass
class Outcome:
    cell: Cell
    keys: list = field(default_factory=list)
    seeds: list = field(default_factory=list)
    epochs: int = 0
    threads: list = field(default_factory=list)
    cpus: list = field(default_factory=list)
    max_relative: float = 0.0
    where: str = ""
    error: str = ""
    baseline: str = ""             # the old code's checkout the re-run was compared with
    stored_relative: Optional[float] = None   # with a baseline: the stored numbers vs here

    def passed(self, tolerance: float) -> bool:
        return not self.error and self.max_relative <= tolerance


def stale_cells(specs: list[RunSpec], store, sources: dict[str, str]) -> list[Cell]:
    """The configurations among ``specs`` whose stored ok/diverged runs are stale, each with
    its runs (those made on this machine's CPU model first, then by seed)."""
    from harness.store import cpu_name
    records = store.export_records([s.key() for s in specs])
    by_key = {run["key"]: run for run in records["runs"]}
    cpu_of = {s["uuid"]: s.get("cpu") for s in records["sessions"]}
    here = cpu_name()
    cells: dict[tuple, Cell] = {}
    for spec in specs:
        record = by_key.get(spec.key())
        if record is None or record["status"] not in CHECKED_STATUSES or not record["epochs"]:
            continue
        stored, current = record.get("source"), sources.get(spec.key())
        if stored is None or fingerprint.is_current(spec, stored, current):
            continue
        config = fingerprint.config_of(spec)
        old = fingerprint.resolve(config, stored, device_kind(spec.device))
        cell = cells.setdefault((config, old, current), Cell(config, old, current))
        cell.runs.append((spec, record, cpu_of.get(record.get("session"))))
    for cell in cells.values():
        cell.runs.sort(key=lambda run: (run[2] != here, run[0].seed))
    return sorted(cells.values(), key=Cell.name)


def _numbers(train_loss, lr, metrics) -> dict[str, Optional[float]]:
    out = {"train loss": train_loss, "lr": lr}
    for split, values in (metrics or {}).items():
        for name, value in (values or {}).items():
            out[f"{split} {name}"] = value
    return out


def _finite_or_none(value):
    """A number as the store keeps it: a non-finite float is stored as null."""
    if value is None or isinstance(value, bool):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def _relative(a, b) -> float:
    a, b = _finite_or_none(a), _finite_or_none(b)
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


def compare(stored_epochs: list[dict], new_epochs: list[dict], epochs: int,
            before: str = "stored") -> tuple[float, str]:
    """The largest relative difference between the stored epochs and the re-run's, over their
    first ``epochs``, and where it is (``epoch 1 test accuracy: 97.1 stored, 97.2 now``)."""
    worst, where = 0.0, ""
    for stored, new in zip(stored_epochs[:epochs], new_epochs[:epochs]):
        old = _numbers(stored.get("train_loss"), stored.get("lr"), stored.get("metrics"))
        after = _numbers(new.get("train_loss"), new.get("lr"), new.get("metrics"))
        for name in sorted(set(old) | set(after)):
            if name.startswith("train ") and name != "train loss" and name not in old:
                continue          # a figure the old code did not report is not a difference
            diff = _relative(old.get(name), after.get(name))
            if diff > worst:
                worst = diff
                where = (f"epoch {stored['epoch']} {name}: {old.get(name)!r} {before}, "
                         f"{after.get(name)!r} now")
    return worst, where


RERUN_SCRIPT = """
import json, os, sys
sys.path.insert(0, os.getcwd())   # this checkout's harness, even under PYTHONSAFEPATH
args = json.loads(sys.argv[1])
from harness import api
from harness.registry import discover
from harness.runner import execute
discover(args["plugins"])
data = args["spec"]
layer = lambda entry: [api.LAYER_KINDS[k](**v) for k, v in entry.items()][0]
arch = api.Arch(name=data["arch"]["name"], input_shape=tuple(data["arch"]["input_shape"]),
                layers=tuple(layer(e) for e in data["arch"]["layers"]),
                output_size=data["arch"]["output_size"])
fields = {k: v for k, v in data.items() if k in api.RunSpec.__dataclass_fields__}
fields.update(arch=arch, params=tuple(sorted(data["params"].items())),
              task_params=tuple(sorted(data["task_params"].items())),
              diagnostics=tuple(data.get("diagnostics", ())), device="cpu")
spec = api.RunSpec(**fields)
if spec.key() != args["key"]:
    print(json.dumps({"error": "this code gives the stored spec the key " + spec.key()}))
    sys.exit(0)
class Enough(Exception):
    pass
def stop(_spec, record):
    if record.epoch >= args["epochs"]:
        raise Enough()
result = execute(spec, args["data_dir"], args["threads"], tuple(args["plugins"]), on_epoch=stop)
print(json.dumps({"source": result.fingerprint.get("source"), "status": str(result.status),
                  "reason": result.reason, "n_parameters": result.n_parameters,
                  "epochs": [{"epoch": e.epoch, "train_loss": e.train_loss, "lr": e.lr,
                              "metrics": e.metrics} for e in result.epochs]}))
"""


ROOT = Path(__file__).resolve().parent.parent     # the current code's checkout


def run_checkout(checkout: Path, spec: RunSpec, epochs: int, threads: int, data_dir,
                 plugin_paths) -> dict:
    """Run ``spec`` for ``epochs`` epochs with the code checked out in ``checkout`` — the old
    code (``--baseline``) or the current one (:data:`ROOT`) — in a process of its own that
    imports that checkout's harness: a run that crashes or is killed ends that process, not
    equate. The spec is rebuilt there from its JSON, not from the suite file (which old code
    may not read), and must get the same key. ``{source, status, reason, n_parameters,
    epochs}``, or ``{error}`` saying why there is none."""
    import json
    import subprocess
    import sys

    from harness.registry import PLUGIN_PATH_ENV
    from harness.worker import death_reason
    args = {"spec": spec.to_json(), "key": spec.key(), "epochs": epochs,
            "threads": threads, "data_dir": str(Path(data_dir).resolve()),
            "plugins": [str(Path(p).resolve()) for p in plugin_paths]}
    env = dict(os.environ)          # plugin folders named relative to here, absolute there
    if env.get(PLUGIN_PATH_ENV):
        env[PLUGIN_PATH_ENV] = os.pathsep.join(
            str(Path(p).resolve()) for p in env[PLUGIN_PATH_ENV].split(os.pathsep) if p)
    done = subprocess.run([sys.executable, "-c", RERUN_SCRIPT,
                           json.dumps(args, default=str)],
                          cwd=checkout, capture_output=True, text=True, env=env)
    lines = done.stdout.strip().splitlines()
    try:
        found = json.loads(lines[-1]) if lines else {}
    except ValueError:
        found = {}
    if not isinstance(found, dict):
        found = {}
    which = "the old code" if Path(checkout).resolve() != ROOT else "the current code"
    if done.returncode < 0:
        return {"error": f"{which}'s re-run in {checkout} ended without a result: "
                         f"{death_reason(done.returncode)}"}
    if done.returncode != 0 or not found or "error" in found:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        why = found.get("error") or (f"{death_reason(done.returncode)}; its last line: {last}"
                                     if done.returncode > 0 and not found else last)
        return {"error": f"{which}'s re-run in {checkout} failed: {why}"}
    return found


SELECTION = ("clean_epoch", "clean_val", "clean_test", "paper_epoch", "paper_test")


def selection_difference(spec: RunSpec, record: dict) -> tuple[float, str]:
    """What the current code selects from the stored run's epochs (``runner.summarize``: the
    epoch each protocol takes, and its values) against the selection stored with it — the
    numbers the results tables read. The re-run's epochs cover the start of a run; this covers
    the choice made over all of it."""
    from harness.api import EpochRecord
    from harness.registry import tasks
    from harness.runner import summarize
    task = tasks.get(spec.task)
    epochs = [EpochRecord(epoch=e["epoch"], train_time_s=e.get("train_time_s") or 0.0,
                          eval_time_s=e.get("eval_time_s") or 0.0,
                          train_loss=e.get("train_loss"), metrics=e.get("metrics") or {},
                          lr=e.get("lr"), warmup=bool(e.get("warmup")))
              for e in record["epochs"]]
    now = summarize(epochs, task.primary_metric, task.metrics[task.primary_metric])
    worst, where = 0.0, ""
    for name in SELECTION:
        diff = _relative(record.get(name), getattr(now, name))
        if diff > worst:
            worst, where = diff, f"selection {name}: {record.get(name)!r} stored, " \
                                 f"{getattr(now, name)!r} now"
    return worst, where


def _stopped_short(who: str, rerun: dict, wanted: int) -> str:
    """Why a re-run (:func:`run_checkout`'s result) has fewer epochs than the check compares."""
    return (f"{who} stopped after {len(rerun['epochs'])} of {wanted} epoch(s): "
            f"{rerun['status']} {rerun['reason']}").strip()


def check(cell: Cell, runs_per_cell: int, epochs: int, data_dir, plugin_paths,
          say: Callable[[str], None], baseline: Optional[Path] = None) -> Outcome:
    """Re-run up to ``runs_per_cell`` of the cell's stored runs for their first ``epochs``
    epochs with the current code (each with the threads it ran with) and compare with the
    stored numbers — or, with ``baseline``, with the same run of the old code made here. Each
    re-run is a process of its own (:func:`run_checkout`)."""
    outcome = Outcome(cell, baseline=str(baseline) if baseline else "")
    for spec, record, cpu in cell.runs[:runs_per_cell]:
        wanted = min(epochs, len(record["epochs"]))
        threads = int(record.get("threads") or 1)
        reference = record["epochs"]
        if baseline is not None:
            say(f"  running seed {spec.seed} for {wanted} epoch(s) at {threads} thread(s) with "
                f"the old code ({baseline})…")
            old = run_checkout(baseline, spec, wanted, threads, data_dir, plugin_paths)
            if "error" in old:
                outcome.error = old["error"]
                return outcome
            if len(old["epochs"]) < wanted:
                outcome.error = _stopped_short("the old code", old, wanted)
                return outcome
            if fingerprint.resolve(cell.config, old["source"],
                                   device_kind(spec.device)) != cell.old:
                outcome.error = (f"the code in {baseline} has digest {old['source']}, not the "
                                 f"stored runs' {record.get('source')}: check out the commit "
                                 f"they were made with")
                return outcome
            reference = old["epochs"]
        say(f"  re-running seed {spec.seed} for {wanted} epoch(s) at {threads} thread(s)…")
        result = run_checkout(ROOT, spec, wanted, threads, data_dir, plugin_paths)
        if "error" in result:
            outcome.error = result["error"]
            return outcome
        if len(result["epochs"]) < wanted:
            outcome.error = _stopped_short(f"seed {spec.seed}", result, wanted)
            return outcome
        if result["source"] != cell.new:
            outcome.error = (f"the re-run's code has digest {result['source']}, "
                             f"not {cell.new}: files changed while it ran")
            return outcome
        diff, where = compare(reference, result["epochs"], wanted,
                              "with the old code" if baseline is not None else "stored")
        for other, other_where in (
                selection_difference(spec, record),
                (_relative(record.get("n_parameters"), result["n_parameters"]),
                 f"parameters: {record.get('n_parameters')!r} stored, "
                 f"{result['n_parameters']!r} now")):
            if other > diff:
                diff, where = other, other_where
        if baseline is not None:
            stored_diff, stored_where = compare(record["epochs"], result["epochs"], wanted)
            outcome.stored_relative = max(outcome.stored_relative or 0.0, stored_diff)
            if not stored_diff <= STORED_LIMIT:
                outcome.error = (f"the stored run is not what this code, old or new, gives "
                                 f"here (relative difference {stored_diff:.3g} > "
                                 f"{STORED_LIMIT}: {stored_where}): other data, torch or "
                                 f"code than the baseline's?")
                return outcome
        outcome.keys.append(spec.key())
        outcome.seeds.append(spec.seed)
        outcome.threads.append(threads)
        outcome.cpus.append(cpu or "unknown")
        outcome.epochs = wanted if not outcome.epochs else min(outcome.epochs, wanted)
        if diff > outcome.max_relative or (diff == outcome.max_relative and not outcome.where):
            outcome.max_relative, outcome.where = diff, where
    return outcome


def entry(outcome: Outcome, note: str) -> dict:
    from harness.store import cpu_name
    spec = outcome.cell.first
    return {"algorithm": spec.algorithm, "task": spec.task, "arch": spec.arch.name,
            "row": spec.label or spec.algorithm, "config": outcome.cell.config,
            "device": device_kind(spec.device), "from": outcome.cell.old,
            "to": outcome.cell.new,
            "checked": datetime.date.today().isoformat(), "runs": outcome.keys,
            "seeds": outcome.seeds, "epochs": outcome.epochs,
            "max_relative_difference": float(outcome.max_relative),
            "stored_on": sorted(set(outcome.cpus)), "checked_on": cpu_name(),
            "threads": sorted(set(outcome.threads)),
            **({"compared_with": "the old code re-run on this machine (--baseline), same seed "
                                 "and threads",
                "stored_vs_rerun_max_relative": float(outcome.stored_relative or 0.0)}
               if outcome.baseline else {"compared_with": "the stored numbers"}),
            "note": note}


def append(path: Path, entries: list[dict]) -> None:
    """Add entries to the equivalences file in one atomic replace (a new file gets a header),
    under a lock: two checks that end together both land."""
    try:
        _append(path, entries)
    except OSError as exc:
        raise UserError(f"{path}: cannot write the equivalences file ({exc.strerror or exc})") \
            from None


def _append(path: Path, entries: list[dict]) -> None:
    import fcntl
    import yaml
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fingerprint.load_equivalences(path)          # refuse to extend a malformed file
        text = path.read_text() if path.exists() else HEADER
        if text and not text.endswith("\n"):
            text += "\n"
        text += yaml.safe_dump(entries, sort_keys=False, allow_unicode=True, width=100)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def run(specs, store_path: Path, sources: dict[str, str], data_dir, plugin_paths, epochs: int,
        tolerance: float, runs_per_cell: int, note: str, list_only: bool,
        baseline: Optional[Path] = None) -> int:
    from harness.store import Store
    if epochs < 1:
        raise UserError(f"--epochs: must be ≥ 1, not {epochs}")
    if runs_per_cell < 1:
        raise UserError(f"--runs-per-cell: must be ≥ 1, not {runs_per_cell}")
    if not 0 <= tolerance < 1:
        raise UserError(f"--tolerance: a relative difference in [0, 1), not {tolerance}")
    if not Path(store_path).exists():
        raise UserError(f"{store_path}: no result store there")
    if baseline is not None and not (Path(baseline) / "harness" / "runner.py").is_file():
        raise UserError(f"--baseline {baseline}: not a checkout of this project (no "
                        f"harness/runner.py); make one with `git worktree add DIR COMMIT`")
    path = fingerprint.equivalences_path()
    fingerprint.load_equivalences(path)              # a malformed file: say so before any run
    with Store(store_path, readonly=True) as store:
        cells = stale_cells(specs, store, sources)
    if not cells:
        print("nothing to check: every stored run selected is current")
        return 0
    print(f"{len(cells)} configuration(s) with stale runs "
          f"({sum(len(c.runs) for c in cells)} runs):")
    for cell in cells:
        print(f"  {cell.name()}: {len(cell.runs)} run(s), code {cell.old} → {cell.new}")
    if list_only:
        return 0
    passed, failed = [], []
    for cell in cells:
        print(f"{cell.name()}:", flush=True)
        outcome = check(cell, runs_per_cell, epochs, data_dir, plugin_paths,
                        lambda line: print(line, flush=True), baseline)
        if outcome.passed(tolerance):
            passed.append(outcome)
            append(path, [entry(outcome, note)])     # at once: an interrupted check keeps it
            how = "equal" if outcome.max_relative == 0 else \
                f"within {outcome.max_relative:.2g} (largest: {outcome.where})"
            against = " to the old code's re-run" if baseline else ""
            stored = (f" (the stored numbers, made on {', '.join(sorted(set(outcome.cpus)))}: "
                      f"within {outcome.stored_relative:.2g})"
                      if baseline and outcome.stored_relative else "")
            print(f"  {how}{against} over {outcome.epochs} epoch(s){stored}: its "
                  f"{len(cell.runs)} run(s) count as current", flush=True)
        else:
            failed.append(outcome)
            print(f"  DIFFERS — {outcome.error or outcome.where}", flush=True)
    if passed:
        print(f"{path}: {len(passed)} entr{'y' if len(passed) == 1 else 'ies'} added")
    if failed:
        print(f"{len(failed)} configuration(s) differ and stay stale: "
              + "; ".join(o.cell.name() for o in failed)
              + " (run them again with --rerun-stale)")
        return 1
    return 0
