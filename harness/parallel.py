"""Run a suite's grid: data first (in this process), then the runs through joblib — loky on
this machine, or a Dask cluster — each result entering the store as soon as it arrives.

Ctrl-C stops the suite; every run that finished is already in the store, and a run cut off
leaves nothing, so running the suite again picks up where it stopped.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from harness import data as data_mod
from harness import params as params_mod
from harness.api import RunResult, RunSpec, UserError
from harness.registry import tasks
from harness.runner import execute, now, threads_for
from harness.store import DONE_STATUSES, Store, environment

BACKENDS = ("loky", "threading", "dask")


@dataclass
class Plan:
    todo: list[RunSpec]
    done: list[RunSpec]
    skipped: list[RunSpec]


@dataclass
class Summary:
    counts: dict = field(default_factory=lambda: {"ok": 0, "diverged": 0, "error": 0, "skipped": 0})
    already_stored: int = 0
    interrupted: bool = False


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device: {device!r} is not one of auto, cpu, cuda, cuda:N")
    if device == "cpu":
        return "cpu"
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here (use cpu or auto)")
    return device


def plan(specs: list[RunSpec], store_path: Path, rerun: bool, retry_errors: bool) -> Plan:
    """Which runs are still to do (stored ok/diverged/error runs are done unless told)."""
    stored: dict[str, str] = {}
    if store_path.exists() and not rerun:
        with Store(store_path) as store:
            stored = store.statuses([s.key() for s in specs])
    done_statuses = tuple(s for s in DONE_STATUSES if not (retry_errors and s == "error"))
    todo, done, skipped = [], [], []
    for spec in specs:
        if stored.get(spec.key()) in done_statuses:
            done.append(spec)
        elif spec.skip_reason:
            skipped.append(spec)
        else:
            todo.append(spec)
    return Plan(todo, done, skipped)


def prepare_data(specs: list[RunSpec], data_dir: Path, log: Callable[[str], None],
                 fetch: bool = True) -> dict[str, Optional[str]]:
    """Make every dataset the runs need ready; returns dataset → None (ready) or the reason."""
    needed: dict[str, None] = {}
    for spec in specs:
        task = tasks.get(spec.task)
        for name in task.datasets(params_mod.build(task.Params, spec.task_params)):
            needed[name] = None
    reasons: dict[str, Optional[str]] = {}
    for name in needed:
        if fetch:
            ok, detail = data_mod.fetch(name, data_dir, log)
        else:
            state, detail = data_mod.status(name, data_dir)
            ok = state == "ready"
        reasons[name] = None if ok else detail
        if not ok:
            log(f"skipping runs on {name}: {detail}")
    return reasons


def with_data_reasons(specs: list[RunSpec], reasons: dict[str, Optional[str]]) -> list[RunSpec]:
    out = []
    for spec in specs:
        task = tasks.get(spec.task)
        missing = [reasons[n] for n in task.datasets(params_mod.build(task.Params, spec.task_params))
                   if reasons.get(n)]
        out.append(replace(spec, skip_reason=missing[0]) if missing and not spec.skip_reason else spec)
    return out


def _executor(backend: str, jobs: int, scheduler: Optional[str]):
    import joblib
    if backend == "dask":
        try:
            from dask.distributed import Client
        except ImportError:
            raise UserError("--backend dask needs dask.distributed: pip install 'dask[distributed]'") from None
        try:
            client = Client(scheduler, timeout="10s") if scheduler else Client(
                processes=True, n_workers=jobs, threads_per_worker=1, dashboard_address=None)
        except (OSError, TimeoutError, ValueError) as exc:
            raise UserError(f"--scheduler {scheduler}: cannot reach a Dask scheduler there "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        return client, joblib.parallel_config(backend="dask")
    if scheduler:
        raise UserError("--scheduler is for --backend dask only")
    if backend == "loky":   # Ctrl-C is the main process's to handle: it stops the workers
        return None, joblib.parallel_config(backend=backend, initializer=_ignore_interrupts)
    return None, joblib.parallel_config(backend=backend)


def _ignore_interrupts() -> None:
    """Loky workers ignore SIGINT: a terminal's Ctrl-C reaches the whole process group, and a
    worker caught outside a run printed loky's traceback. The main process catches it, keeps
    every finished run and terminates the workers."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run(specs: list[RunSpec], store_path: Path, *, jobs: int = 1, backend: str = "loky",
        scheduler: Optional[str] = None, threads: Optional[int] = None, data_dir: Path,
        plugin_paths: tuple = (), rerun: bool = False, retry_errors: bool = False,
        progress: bool = True, log_epochs: bool = False, command: str = "",
        suite_name: str = "",
        log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Summary:
    import joblib
    from tqdm import tqdm
    if backend not in BACKENDS:
        raise UserError(f"--backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    summary = Summary()
    the_plan = plan(specs, store_path, rerun, retry_errors)
    summary.already_stored = len(the_plan.done)
    reasons = prepare_data(the_plan.todo, data_dir, log)
    todo = with_data_reasons(the_plan.todo, reasons)
    skipped = the_plan.skipped + [s for s in todo if s.skip_reason]
    todo = [s for s in todo if not s.skip_reason]
    threads = threads or threads_for(jobs)
    device = specs[0].device if specs else "cpu"
    with Store(store_path) as store:
        session = store.start_session(command, suite_name, environment(jobs, threads, backend, device))
        for spec in skipped:
            result = RunResult(spec=spec, status="skipped", reason=spec.skip_reason or "",
                               started_at=now(), finished_at=now())
            store.save(result, session)
            summary.counts["skipped"] += 1
        if not todo:
            return summary
        bar = tqdm(total=len(todo), unit="run", disable=not progress, file=sys.stderr,
                   dynamic_ncols=True, desc=suite_name or "runs")
        client, config = _executor(backend, jobs, scheduler)
        try:
            with config:
                results = joblib.Parallel(n_jobs=jobs, return_as="generator_unordered")(
                    joblib.delayed(execute)(spec, str(data_dir), threads, tuple(plugin_paths),
                                            log_epochs)
                    for spec in todo)
                for result in results:
                    store.save(result, session)
                    summary.counts[result.status] = summary.counts.get(result.status, 0) + 1
                    if result.status == "error":
                        bar.write(f"error in {result.spec.label} on {result.spec.task}/"
                                  f"{result.spec.arch.name} seed {result.spec.seed}: {result.reason}",
                                  file=sys.stderr)
                    bar.update(1)
                    bar.set_postfix_str(_postfix(summary, len(todo)))
        except KeyboardInterrupt:
            summary.interrupted = True
            bar.write("interrupted: every finished run is in the store; run the suite again "
                      "to continue", file=sys.stderr)
        finally:
            bar.close()
            if client is not None:
                client.close()
    return summary


def _postfix(summary: Summary, total: int) -> str:
    c = summary.counts
    finished = c["ok"] + c["diverged"] + c["error"]
    return f"ok {c['ok']} diverged {c['diverged']} failed {c['error']} " \
           f"skipped {c['skipped']} left {total - finished}"
