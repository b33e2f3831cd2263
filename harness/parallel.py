"""Run a suite's grid: data first (in this process), then the runs through joblib — threads that
each supervise one run process on this machine (:mod:`harness.worker`), or a Dask cluster — or
as Slurm job arrays (:mod:`harness.slurm`), each result entering the store as soon as it
arrives.

Every run is *claimed* in the store just before it starts, so two processes on one store never
compute the same run; a claim whose process is gone is taken over. A run whose process dies or
outlives ``--run-timeout`` is stored as ``error`` with its cause and the suite goes on. Ctrl-C
and SIGTERM stop the suite: the run processes are killed, every finished run is already in the
store, a run cut off leaves nothing, and running the suite again picks up where it stopped.
"""
from __future__ import annotations

import contextlib
import signal
import statistics
import sys
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from harness import data as data_mod
from harness import params as params_mod
from harness import worker
from harness.api import DONE_STATUSES, RunResult, RunSpec, Status, UserError
from harness.fingerprint import is_current
from harness.registry import plugin_folders, tasks
from harness.runner import epoch_line, now, threads_for
from harness.slots import DeviceSlots
from harness.store import Owner, Store, environment

BACKENDS = ("local", "dask", "slurm")
HEARTBEAT_S = 60.0


@dataclass
class Plan:
    todo: list[RunSpec]
    done: list[RunSpec]
    skipped: list[RunSpec]
    stale: list[RunSpec] = field(default_factory=list)   # stored, made with other source
    # stored runs to do again (stale, rerun, retried errors) → (threads, CPU model) they had
    redo_settings: dict[str, tuple] = field(default_factory=dict)


@dataclass
class Summary:
    counts: dict = field(default_factory=lambda: {s.value: 0 for s in Status})
    already_stored: int = 0
    stale: int = 0
    elsewhere: int = 0               # claimed by another process, or stored by one meanwhile
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


def plan(specs: list[RunSpec], store_path: Path, rerun: bool = False,
         retry_errors: bool = False, rerun_stale: bool = False,
         sources: Optional[dict[str, str]] = None) -> Plan:
    """Which runs are still to do. Stored ok/diverged/error runs are done unless told
    (``rerun``, ``retry_errors``); ``sources`` (key → the current source digest) marks stored
    runs made with other source as stale, to do again with ``rerun_stale``."""
    stored: dict[str, str] = {}
    stored_sources: dict[str, Optional[str]] = {}
    stored_settings: dict[str, tuple] = {}
    if Path(store_path).exists() and Path(store_path).stat().st_size > 0:
        with Store(store_path, readonly=True) as store:
            stored, stored_sources = store.statuses(), store.sources()
            stored_settings = store.settings()
    done_statuses = [s for s in DONE_STATUSES if not (retry_errors and s == Status.ERROR)]
    the_plan = Plan([], [], [])
    for spec in specs:
        key = spec.key()
        status = stored.get(key)
        is_stale = (status is not None and status != Status.SKIPPED and sources is not None
                    and not is_current(spec, stored_sources.get(key), sources.get(key)))
        if is_stale:
            the_plan.stale.append(spec)
        if not rerun and status in done_statuses and not (is_stale and rerun_stale):
            the_plan.done.append(spec)
        elif spec.skip_reason:
            the_plan.skipped.append(spec)
        else:
            the_plan.todo.append(spec)
            if status is not None and status != Status.SKIPPED:
                the_plan.redo_settings[key] = stored_settings.get(key, (None, None))
    return the_plan


def setting_changes(the_plan: Plan, threads: int, device: str = "cpu",
                    cpu: Optional[str] = None, local: bool = True) -> list[str]:
    """A line for each way stored runs to do again were made otherwise than they will be:
    at other torch threads than ``threads``, or (CPU runs made here: ``local``, not on a
    cluster's nodes) on another CPU model than ``cpu`` (this machine's). Either changes the
    order and kernels of float sums, so a re-run meant to reproduce them may move their last
    digits and, through training, their metrics (BP's MNIST MLP, re-run on an AMD EPYC at its
    Intel Xeon runs' code and threads, moved its best test accuracy by up to 0.09 points, its
    FashionMNIST one by up to 0.23)."""
    from collections import Counter

    from harness.store import cpu_name
    made = the_plan.redo_settings.values()
    lines = []
    other = Counter(t for t, _ in made if t is not None and t != threads)
    if other:
        counts = ", ".join(f"{n} at {t}" for t, n in sorted(other.items()))
        reproduce = (f"; --threads {next(iter(other))} reproduces them" if len(other) == 1
                     else "")
        lines.append(f"note: {sum(other.values())} stored run(s) to run again were made at other "
                     f"torch threads ({counts}) than these will have ({threads}): float sums in "
                     f"another order may move their numbers{reproduce}")
    models: Counter = Counter()
    if local and str(device).startswith("cpu"):
        here = cpu if cpu is not None else cpu_name()
        models = Counter(m for _, m in made if m is not None and m != here)
    if models:
        counts = ", ".join(f"{n} on {m}" for m, n in sorted(models.items()))
        lines.append(f"note: {sum(models.values())} stored run(s) to run again were made on "
                     f"another CPU model ({counts}) than this one ({here}): its float "
                     "kernels differ, so their numbers may move, and their times are not "
                     "this machine's")
    return lines


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
    if backend == "slurm":     # harness.slurm submits and polls: no joblib
        return None, contextlib.nullcontext()
    # threads that each start one run process and wait for it: the runs are processes
    return None, joblib.parallel_config(backend="threading")


class _Heartbeat(threading.Thread):
    """Renews this process's claims while its runs go on, so nobody takes them over."""

    def __init__(self, store: Store, owner: Owner, lock: threading.Lock):
        super().__init__(name="claims-heartbeat", daemon=True)
        self.store, self.owner, self.lock, self.done = store, owner, lock, threading.Event()

    def run(self) -> None:
        while not self.done.wait(HEARTBEAT_S):
            try:
                with self.lock:
                    self.store.renew(self.owner)
            except UserError:
                pass   # a busy store: renewed next time (a claim lives CLAIM_TTL_S)


class _Stop(KeyboardInterrupt):
    """SIGTERM (or SIGHUP), handled as Ctrl-C is."""


def _raise_stop(signum, frame) -> None:
    raise _Stop()


def run(specs: list[RunSpec], store_path: Path, *, jobs: int = 1, backend: str = "local",
        scheduler: Optional[str] = None, threads: Optional[int] = None, data_dir: Path,
        plugin_paths: tuple = (), rerun: bool = False, retry_errors: bool = False,
        rerun_stale: bool = False, sources: Optional[dict[str, str]] = None,
        run_timeout: Optional[float] = None, progress: bool = True, log_epochs: bool = False,
        command: str = "", suite_name: str = "", structure: Optional[dict] = None,
        estimates: Optional[dict] = None, slurm=None, per_gpu: int = 1,
        gpu_count: Optional[int] = None,
        log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Summary:
    """``slurm``: the jobs' resources (a :class:`harness.slurm.SlurmOptions`) with
    ``backend="slurm"``; ``estimates``: key → :class:`harness.estimate.Estimate`, for the
    progress bar; ``per_gpu``: runs sharing one GPU when the specs' device is ``cuda`` (they
    are spread over every visible GPU: harness.slots; ``gpu_count`` overrides the count)."""
    import joblib
    if backend not in BACKENDS:
        raise UserError(f"--backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "slurm":
        from harness import slurm as slurm_mod
        slurm = slurm or slurm_mod.SlurmOptions()
        slurm.check()
    elif slurm is not None and slurm.given():
        raise UserError(f"{', '.join(slurm.given())}: for --backend slurm only")
    summary = Summary()
    the_plan = plan(specs, store_path, rerun, retry_errors, rerun_stale, sources)
    summary.already_stored, summary.stale = len(the_plan.done), len(the_plan.stale)
    threads = threads or (slurm.threads() if backend == "slurm" else threads_for(jobs))
    device = specs[0].device if specs else "cpu"
    for line in setting_changes(the_plan, threads, device, local=backend == "local"):
        log(line)
    plugin_paths = tuple(dict.fromkeys([*map(str, plugin_paths), *plugin_folders()]))
    with Store(store_path) as store:       # a store that cannot be written fails here, first
        reasons = prepare_data(the_plan.todo, data_dir, log)
        todo = with_data_reasons(the_plan.todo, reasons)
        skipped = the_plan.skipped + [s for s in todo if s.skip_reason]
        todo = [s for s in todo if not s.skip_reason]
        if structure is not None:
            store.record_suite(suite_name, structure)
        session = store.start_session(command, suite_name,
                                      environment(jobs, threads, backend, device))
        for spec in skipped:
            store.save(RunResult(spec=spec, status=Status.SKIPPED, reason=spec.skip_reason or "",
                                 started_at=now(), finished_at=now()), session)
            summary.counts[Status.SKIPPED] += 1
        if not todo:
            return summary
        owner, lock = Owner(), threading.Lock()
        claims = Store(store_path, shared=True)   # the dispatching threads' connection
        heartbeat = _Heartbeat(claims, owner, lock)
        heartbeat.start()

        def claimed():
            for spec in todo:
                if worker.stopping.is_set():
                    return
                with lock:
                    answer = claims.claim(spec.key(), owner, rerun=rerun or (
                        spec in the_plan.stale) or retry_errors)
                if answer == "claimed":
                    yield spec
                else:
                    summary.elsewhere += 1

        progress_bar = _Progress(todo, estimates or {}, progress, suite_name)
        bar = progress_bar.bar
        client, config = _executor(backend, jobs, scheduler)
        metric_of = {s.task: tasks.get(s.task).primary_metric for s in todo}

        def on_epoch(spec: RunSpec, record) -> None:   # called in the supervising threads
            progress_bar.epoch(spec)
            if log_epochs:
                bar.write(epoch_line(spec, record, metric_of[spec.task]), file=sys.stderr)
        handlers = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
        results = None
        try:
            with config:
                if backend == "slurm":   # every run claimed, then submitted; the heartbeat
                    results = slurm_mod.results(   # keeps the claims while the jobs queue
                        list(claimed()), slurm, data_dir=str(data_dir), threads=threads,
                        plugin_paths=plugin_paths, timeout=run_timeout, jobs=jobs,
                        folder=slurm.job_folder(store_path, suite_name), name=suite_name,
                        log=lambda m: bar.write(m, file=sys.stderr))
                else:
                    if backend == "local":   # threads here share the node's device slots
                        slots = DeviceSlots(device, per_gpu, gpu_count)
                        calls = (joblib.delayed(_on_a_slot)(slots, spec, str(data_dir), threads,
                                                            plugin_paths, on_epoch, run_timeout)
                                 for spec in claimed())
                    else:                     # each Dask worker runs one at a time, as it is
                        calls = (joblib.delayed(worker.supervise)(spec, str(data_dir), threads,
                                                                  plugin_paths, None, run_timeout)
                                 for spec in claimed())
                    results = joblib.Parallel(n_jobs=jobs, return_as="generator_unordered",
                                              pre_dispatch="n_jobs")(calls)
                for result in results:
                    if result is None:
                        continue
                    store.save(result, session, owner)
                    summary.counts[result.status] = summary.counts.get(result.status, 0) + 1
                    if result.status in (Status.ERROR, Status.DIVERGED):
                        bar.write(f"{result.status} in {result.spec.label} on "
                                  f"{result.spec.task_label}/{result.spec.arch.name} seed "
                                  f"{result.spec.seed}: {result.reason}", file=sys.stderr)
                    progress_bar.finished(result.spec)
                    bar.set_postfix_str(_postfix(summary, len(todo)))
        except KeyboardInterrupt:
            summary.interrupted = True
            worker.stop_all()
            bar.write("interrupted: every finished run is in the store; run the suite again "
                      "to continue", file=sys.stderr)
        finally:
            if backend == "slurm" and results is not None:
                results.close()          # cancels the jobs that have not ended
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            worker.stop_all()
            heartbeat.done.set()
            with lock:
                try:
                    claims.release(owner)
                except UserError:
                    pass
                claims.close()
            bar.close()
            if client is not None:
                client.close()
            worker.reset()
    return summary


def _on_a_slot(slots: DeviceSlots, spec: RunSpec, *args) -> Optional[RunResult]:
    """Supervise one run on the next free device slot (its GPU, with --device cuda)."""
    device = slots.acquire()
    try:
        return worker.supervise(slots.pinned(spec, device) if slots.pooled else spec, *args)
    finally:
        slots.release(device)


class _Progress:
    """The progress bar, in estimated seconds of work (harness.estimate) where estimates are
    known — so its ETA is the estimate's — advanced a run's share at every finished epoch; in
    runs where they are not."""

    def __init__(self, todo: list[RunSpec], estimates: dict, enabled: bool, name: str):
        from tqdm import tqdm
        known = [e.seconds for e in estimates.values() if getattr(e, "seconds", None)]
        self.in_seconds = bool(known)
        fallback = statistics.median(known) if known else 1.0
        self.work = {s.key(): ((estimates.get(s.key()).seconds if estimates.get(s.key())
                                else None) or fallback) if self.in_seconds else 1.0
                     for s in todo}
        self.done: dict[str, float] = {}
        self.lock = threading.Lock()
        self.bar = tqdm(total=sum(self.work.values()), disable=not enabled, file=sys.stderr,
                        dynamic_ncols=True, desc=name or "runs",
                        unit="s" if self.in_seconds else "run",
                        bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}"
                        if self.in_seconds else None)

    def _advance(self, key: str, amount: float) -> None:
        with self.lock:
            amount = max(0.0, min(amount, self.work.get(key, 0.0) - self.done.get(key, 0.0)))
            self.done[key] = self.done.get(key, 0.0) + amount
            self.bar.update(amount)

    def epoch(self, spec: RunSpec) -> None:
        if self.in_seconds:
            self._advance(spec.key(), self.work.get(spec.key(), 0.0) / max(1, spec.epochs))

    def finished(self, spec: RunSpec) -> None:
        self._advance(spec.key(), float("inf"))


def _postfix(summary: Summary, total: int) -> str:
    c = summary.counts
    finished = c["ok"] + c["diverged"] + c["error"]
    return f"ok {c['ok']} diverged {c['diverged']} failed {c['error']} " \
           f"skipped {c['skipped']} left {total - finished - summary.elsewhere}"
