"""``--backend slurm``: a suite's runs as Slurm job arrays, submitted through submitit.

The parent process (on a login node) claims the runs in the store, submits them as one job
array (``executor.map_array``) whose every task calls :func:`harness.worker.supervise` on its
node — the run in a process of its own there, as on this machine — and then polls the queue
(``squeue``, one call for all its jobs): each task's result is read from submitit's result
file as its job ends and handed back, so it enters the store at once. A job that ends without
a result (it failed, was cancelled, ran out of time or memory, lost its node) becomes an
``error`` result with the job's state and the end of its log; a job whose Python raised (an
import error on the node, the time limit's signal) becomes one with the exception. Stopping
(Ctrl-C, SIGTERM) cancels the arrays this process submitted.

The job files (the sbatch script, pickled arguments and result, ``.out``/``.err`` logs) live
under ``SlurmOptions.folder``, which — like this project, its Python, the data folder and the
plugins — must be on a filesystem the nodes share.
"""
from __future__ import annotations

import fcntl
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from harness.api import RunResult, RunSpec, Status, UserError

POLL_S = 5.0             # between two looks at the queue (one squeue for all our jobs)
RESULT_GRACE_S = 15.0    # an ended job's result file may take this long to show (NFS)
UNSEEN_GRACE_S = 120.0   # a submitted job the queue never listed, before it counts as lost
MAX_ARRAY = 1000         # tasks per array (Slurm's default MaxArraySize is 1001)

# job states in which a job may still produce its result; any other state is an end
ACTIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED",
                    "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SIGNALING",
                    "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "POWER_UP_NODE"})
ENDINGS = {
    "COMPLETED": "it ended without leaving a result",
    "FAILED": "it exited with a non-zero status",
    "CANCELLED": "it was cancelled (scancel, or an administrator)",
    "TIMEOUT": "it ran out of time (--slurm-time, or the partition's limit)",
    "OUT_OF_MEMORY": "it ran out of memory (--slurm-mem)",
    "NODE_FAIL": "its node failed",
    "BOOT_FAIL": "its node failed to boot",
    "PREEMPTED": "it was preempted",
    "DEADLINE": "it passed its deadline",
}
# options that submitit sets itself, or that have an option of their own here
_OWN_FLAGS = {"array": None, "output": None, "error": None, "open-mode": None,
              "signal": None, "wrap": None, "partition": "--slurm-partition",
              "time": "--slurm-time", "mem": "--slurm-mem",
              "cpus-per-task": "--slurm-cpus-per-task", "gpus-per-task": "--slurm-gpus-per-task"}
_PARTITION = re.compile(r"[A-Za-z0-9_.\-]+(,[A-Za-z0-9_.\-]+)*")
_MEM = re.compile(r"\d+[KMGT]?", re.IGNORECASE)
_FLAG = re.compile(r"--([A-Za-z][A-Za-z0-9\-]*)(=(.*))?", re.DOTALL)


def parse_time(text: str) -> int:
    """Slurm's time formats (minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S) → whole minutes, > 0."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)((?::\d+){0,2})", text.strip())
    if not match:
        raise UserError(f"--slurm-time: {text!r} is not a time (minutes, HH:MM:SS or "
                        "D-HH:MM:SS)")
    days, first, rest = match.groups()
    fields = [int(first)] + [int(n) for n in rest.split(":")[1:]]
    if days is not None:                  # D-H, D-H:M, D-H:M:S
        units = [3600, 60, 1][:len(fields)]
    else:                                 # M, M:S, H:M:S
        units = {1: [60], 2: [60, 1], 3: [3600, 60, 1]}[len(fields)]
    if any(value >= 60 for value in fields[1:]):
        raise UserError(f"--slurm-time: {text!r}: minutes and seconds go up to 59")
    total = sum(v * u for v, u in zip(fields, units)) + int(days or 0) * 86400
    if total <= 0:
        raise UserError(f"--slurm-time: {text!r} must be more than zero")
    return -(-total // 60)


@dataclass(frozen=True)
class SlurmOptions:
    """The resources of each run's job (``--slurm-*`` on the command line)."""

    partition: Optional[str] = None
    gpus_per_task: Optional[int] = None
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None              # e.g. 8G, 16000M
    time: Optional[str] = None             # minutes or HH:MM:SS (Slurm's formats)
    extra: tuple[str, ...] = ()            # more sbatch flags: --account=abc, --qos=high
    array_parallelism: Optional[int] = None   # array tasks at once (default: --jobs)
    folder: Optional[Path] = None          # submitit's job files (default: beside the store)

    def given(self) -> list[str]:
        """The options set, as their command-line names."""
        return [f"--slurm-{name.replace('_', '-')}" for name, value in vars(self).items()
                if value not in (None, ())]

    def check(self, need_sbatch: bool = True) -> None:
        """Every value well-formed and ``sbatch`` reachable, or one UserError: before anything
        is submitted."""
        if self.partition is not None and not _PARTITION.fullmatch(self.partition):
            raise UserError(f"--slurm-partition: {self.partition!r} is not a partition name "
                            "(letters, digits, _ . -; several separated by commas)")
        for name in ("gpus_per_task", "cpus_per_task", "array_parallelism"):
            value, least = getattr(self, name), 0 if name == "gpus_per_task" else 1
            if value is not None and value < least:
                raise UserError(f"--slurm-{name.replace('_', '-')}: must be ≥ {least}, "
                                f"not {value}")
        if self.mem is not None and not _MEM.fullmatch(self.mem.strip()):
            raise UserError(f"--slurm-mem: {self.mem!r} is not a memory size (e.g. 8G, 16000M; "
                            "a plain number is megabytes)")
        if self.time is not None:
            parse_time(self.time)
        self.extra_parameters()
        if need_sbatch and shutil.which("sbatch") is None:
            raise UserError("--backend slurm: no `sbatch` on PATH (run from a Slurm login node, "
                            "or put Slurm's commands on PATH)")

    def extra_parameters(self) -> dict:
        """``--slurm-extra`` flags as submitit's ``additional_parameters``."""
        out: dict = {}
        for flag in self.extra:
            match = _FLAG.fullmatch(flag.strip())
            if not match:
                raise UserError(f"--slurm-extra: {flag!r} is not a long sbatch flag; write it "
                                "as --slurm-extra=--account=abc")
            name, _, value = match.groups()
            if name in _OWN_FLAGS:
                own = _OWN_FLAGS[name]
                raise UserError(f"--slurm-extra: --{name} " + (
                    f"has an option of its own: {own}" if own else "is set by the harness"))
            out[name] = True if value is None else value
        return out

    def parameters(self, jobs: int, name: str) -> dict:
        """submitit ``SlurmExecutor.update_parameters`` keywords."""
        return {
            "job_name": f"bench-{name}" if name else "bench",
            "partition": self.partition,
            "gpus_per_task": self.gpus_per_task or None,
            "cpus_per_task": self.cpus_per_task,
            "mem": self.mem.strip().upper() if self.mem else None,
            # no --slurm-time: no --time (the partition's default), never submitit's 5 minutes
            "time": parse_time(self.time) if self.time else None,
            "array_parallelism": self.array_parallelism or max(1, jobs),
            "additional_parameters": self.extra_parameters(),
        }

    def threads(self) -> int:
        """Torch threads per run: the task's CPUs."""
        return self.cpus_per_task or 1

    def has_gpus(self) -> bool:
        return bool(self.gpus_per_task) or any(
            re.match(r"--(gres=\S*gpu|gpus)", flag.strip()) for flag in self.extra)

    def job_folder(self, store_path: Path, suite_name: str) -> Path:
        """Where submitit keeps the job files: ``--slurm-folder``, else ``slurm/<suite>/``
        beside the store (``results/slurm/<suite>/`` for a suite's default store)."""
        folder = self.folder or Path(store_path).parent / "slurm" / (suite_name or "runs")
        return Path(folder).expanduser().resolve()

    def device(self, device: str) -> str:
        """The runs' device, decided by what the jobs ask for (the login node may have no GPU,
        or one the nodes lack)."""
        if device == "auto":
            return "cuda" if self.has_gpus() else "cpu"
        if device == "cpu":
            return device
        if device == "cuda" or device.startswith("cuda:"):
            if not self.has_gpus():
                raise UserError(f"--device {device} with --backend slurm: ask for GPUs with "
                                "--slurm-gpus-per-task N")
            return device
        raise UserError(f"--device: {device!r} is not one of auto, cpu, cuda, cuda:N")


def _log_epoch(spec: RunSpec, record) -> None:
    """In the array task: each finished epoch on the job's stderr log (tail -f it)."""
    try:
        from harness.runner import epoch_line
        first = record.metrics.get("val") or record.metrics.get("test") or {}
        print(epoch_line(spec, record, next(iter(first), "")), file=sys.stderr, flush=True)
    except Exception:   # a log line never costs a run
        pass


@dataclass
class _Task:
    spec: RunSpec
    job: object                       # submitit's SlurmJob
    submitted: float                  # time.monotonic()
    started_at: str
    state: str = ""
    ended: Optional[float] = None     # when the queue first showed it ended (or gone)


def _array_id(job_id: str) -> str:
    return job_id.split("_", 1)[0]


def queue_states(array_ids: list[str]) -> Optional[dict[str, tuple[str, str]]]:
    """job id (``123_4``; ``123`` for a one-run slice, which submitit submits as a plain job)
    → (state, reason) of every task of these arrays that the controller still lists (ended
    jobs stay there MinJobAge seconds, 300 by default); None when squeue did not answer."""
    states: dict[str, tuple[str, str]] = {}
    if not array_ids:
        return states
    done = subprocess.run(["squeue", "--noheader", "--array", "--states=all",
                           "--format=%i|%T|%r", f"--jobs={','.join(array_ids)}"],
                          capture_output=True, text=True)
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        return None     # the controller did not answer (restarting, busy): ask again later
    for line in done.stdout.splitlines():
        job_id, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if job_id and "[" not in job_id:   # 123_4 (a task), or 123 (a one-run slice)
            states[job_id] = (state.split()[0] if state else "", reason)
    return states


def _accounting_states(array_ids: list[str]) -> dict[str, tuple[str, str]]:
    """The same from ``sacct``, for jobs the controller forgot (where accounting is on)."""
    if not array_ids or shutil.which("sacct") is None:
        return {}
    done = subprocess.run(["sacct", "--noheader", "--parsable2", "--allocations",
                           "--format=JobID,State", f"--jobs={','.join(array_ids)}"],
                          capture_output=True, text=True)
    out = {}
    if done.returncode == 0:
        for line in done.stdout.splitlines():
            job_id, _, state = line.strip().partition("|")
            if job_id and "[" not in job_id and state:
                out[job_id] = (state.split()[0], "")
    return out


def _log_tail(path: Path, lines: int = 40) -> list[str]:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _error(task: _Task, reason: str, traceback: str = "") -> RunResult:
    from harness.runner import now
    return RunResult(spec=task.spec, status=Status.ERROR, reason=reason, traceback=traceback,
                     started_at=task.started_at, finished_at=now())


def _collect(task: _Task) -> Optional[RunResult]:
    """The result of an ended job: its own (from submitit's result file), or an error with
    the cause; None while its result file may still be on its way."""
    from submitit.core.utils import pickle_load
    job_id, paths = task.job.job_id, task.job.paths
    if paths.result_pickle.exists():
        try:
            outcome, payload = pickle_load(paths.result_pickle)
        except Exception as exc:
            return _error(task, f"Slurm job {job_id}: its result file is unreadable "
                                f"({type(exc).__name__}: {exc}) at {paths.result_pickle}")
        if outcome == "success" and isinstance(payload, RunResult):
            return payload
        if outcome == "success":
            return _error(task, f"Slurm job {job_id} returned no result (log: {paths.stderr})")
        trace = str(payload)
        last = next((line for line in reversed(trace.splitlines()) if line.strip()), "")
        if "checkpoint_and_try_requeue" in trace:   # submitit's handler of Slurm's USR2
            last = ("Slurm signalled the end of its time (or a preemption) and the run was "
                    f"stopped: give it more --slurm-time ({last.strip()})")
        return _error(task, f"Slurm job {job_id} failed: {last.strip()} (log: {paths.stderr})",
                      trace)
    if time.monotonic() - (task.ended or 0.0) < RESULT_GRACE_S:
        return None
    state = task.state or "UNKNOWN"
    why = ENDINGS.get(state, "it left the queue without a result")
    tail = _log_tail(paths.stderr)
    reason = f"Slurm job {job_id} ended {state}: {why}"
    if tail:
        reason += f"; its log ends: {tail[-1].strip()[:300]}"
    return _error(task, f"{reason} (log: {paths.stderr})", "\n".join(tail))


def results(specs: list[RunSpec], options: SlurmOptions, *, data_dir: str, threads: int,
            plugin_paths: tuple, timeout: Optional[float], jobs: int, folder: Path,
            name: str = "", log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)
            ) -> Iterator[RunResult]:
    """Submit ``specs`` as job arrays (one per suite slice; more only past MAX_ARRAY tasks)
    and yield each run's result as its job ends. Closing the generator, or an exception
    (Ctrl-C, SIGTERM) while it waits, cancels the jobs not yet ended."""
    if not specs:
        return
    import submitit
    from submitit.core.utils import FailedJobError
    from submitit.slurm.slurm import SlurmJob

    from harness import worker
    from harness.runner import now
    root = str(Path(worker.__file__).resolve().parent.parent)
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=folder / "%j")
    executor.update_parameters(
        **options.parameters(jobs, name),
        # the nodes import this very checkout of the harness (not another one installed there)
        setup=[f"export PYTHONPATH={shlex.quote(root)}${{PYTHONPATH:+:$PYTHONPATH}}"])
    data_dir = str(Path(data_dir).resolve())
    plugin_paths = tuple(str(Path(p).resolve()) for p in plugin_paths)
    live: dict[str, _Task] = {}
    arrays: list[str] = []
    try:
        for start in range(0, len(specs), MAX_ARRAY):
            chunk = specs[start:start + MAX_ARRAY]
            n = len(chunk)
            # one submission at a time per folder (two runs of a suite share it), so that a
            # refused one removes its own temporary files and nothing of another's
            with open(folder / ".submit.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                before = set(folder.glob("*.pkl")) | set(folder.glob(".submission_file_*"))
                try:
                    submitted = executor.map_array(worker.supervise, chunk, [data_dir] * n,
                                                   [threads] * n, [plugin_paths] * n,
                                                   [_log_epoch] * n, [timeout] * n)
                    failure = None
                except (FailedJobError, OSError) as exc:
                    failure = exc
                    for left in ((set(folder.glob("*.pkl"))
                                  | set(folder.glob(".submission_file_*"))) - before):
                        left.unlink(missing_ok=True)
            if failure is not None:
                message = next((line for line in str(failure).splitlines() if line.strip()),
                               type(failure).__name__)
                raise UserError(f"--backend slurm: sbatch refused the job array: "
                                f"{message.strip()}") from None
            clock, started = time.monotonic(), now()
            for spec, job in zip(chunk, submitted):
                live[job.job_id] = _Task(spec, job, clock, started)
            arrays.append(_array_id(submitted[0].job_id))
            log(f"submitted {n} run(s) as Slurm job {'array ' if n > 1 else ''}{arrays[-1]}; "
                f"job files and logs in {folder}")
        reasons: dict[str, str] = {}
        while live:
            states = queue_states(sorted({_array_id(j) for j in live}))
            if states is None:   # no word from the controller: only results already written
                for job_id, task in list(live.items()):
                    if task.job.paths.result_pickle.exists():
                        task.ended = task.ended or time.monotonic()
                        result = _collect(task)
                        if result is not None:
                            del live[job_id]
                            yield result
                time.sleep(POLL_S)
                continue
            unlisted = [j for j in live if j not in states]
            if unlisted:
                states.update(_accounting_states(sorted({_array_id(j) for j in unlisted})))
            clock = time.monotonic()
            pending_reasons: dict[str, str] = {}
            for job_id, task in list(live.items()):
                state, why = states.get(job_id, ("", ""))
                if state:
                    task.state = state
                if state in ACTIVE:
                    task.ended = None
                    if state == "PENDING" and why not in ("", "None", "JobArrayTaskLimit"):
                        pending_reasons[job_id] = why
                    continue
                if not state and not task.state and clock - task.submitted < UNSEEN_GRACE_S:
                    continue   # not listed yet
                if task.ended is None:
                    task.ended = clock
                result = _collect(task)
                if result is not None:
                    del live[job_id]
                    yield result
            if pending_reasons and set(pending_reasons.values()) != set(reasons.values()):
                counts: dict[str, int] = {}
                for why in pending_reasons.values():
                    counts[why] = counts.get(why, 0) + 1
                log("Slurm: waiting — " + ", ".join(f"{n} job(s) pending ({why})"
                                                    for why, n in sorted(counts.items())))
            reasons = pending_reasons
            if live:
                time.sleep(POLL_S)
    finally:
        if live:
            unended = list(dict.fromkeys(_array_id(j) for j in live))
            for array_id in unended:   # the array's tasks that have not ended
                try:
                    SlurmJob(folder=folder / "%j", job_id=array_id).cancel(check=False)
                except OSError as exc:
                    log(f"could not cancel Slurm job {array_id}: {exc}")
            log(f"cancelled Slurm job array(s) {', '.join(unended)}: {len(live)} run(s) had "
                "not ended (not stored; run the suite again to continue)")
