"""Each run in a process of its own, watched by a supervisor, so that whatever a run does — raise,
hang, call ``os._exit`` or ``sys.exit``, segfault, get killed by the out-of-memory killer — it
ends as a recorded run with its cause, and the suite goes on.

Locally, runs are forked from a *fork server* that imported torch and the engine once (so a run
starts in milliseconds, not the seconds of torch's import, and from a process that never
touched CUDA). Where processes may not have children of their own (a Dask worker), a run is a
plain subprocess, ``python -m harness.worker``, instead.

Every run process watches its parents: when the process that started the suite disappears
(SIGKILL, a closed terminal), its runs exit within a second rather than training on. The
supervisor kills a run that outlives ``timeout`` seconds, and :func:`stop_all` kills every run
of this process when the suite stops (Ctrl-C, SIGTERM).
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

from harness.api import RunResult, RunSpec, Status
from harness.store import alive

POLL_S = 0.2
_lock = threading.Lock()
_live: dict[int, object] = {}          # pid -> process (mp.Process or Popen) of a running run
stopping = threading.Event()           # set when the suite stops: no new run starts


def _fork_context():
    context = multiprocessing.get_context("forkserver")
    with _lock:
        # takes effect when the server starts (first run): torch and the engine, imported once
        context.set_forkserver_preload(["harness.toolkit", "harness.runner", "torch._dynamo"])
    return context


def watch_parents(suite_pid: int) -> None:
    """In a run process: exit as soon as the suite's process (or our own parent) is gone."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent or not alive(suite_pid):
                os._exit(75)
    threading.Thread(target=watch, name="watch-parents", daemon=True).start()


def execute_noting_cpu(spec, data_dir, threads, plugin_paths, on_epoch=None):
    """``runner.execute`` in this run process, with a note in the result of how much of its
    cores it had: ``cpu_share``, the process's CPU seconds (every thread) ÷ (wall seconds × its
    threads) over the whole run, set-up and evaluation included — about 1 for a one-thread run
    that had its core to itself, well below where other work took it (or, above one thread,
    where its threads sat idle), so a report can say which timings were taken under load — and
    ``load_per_core``, the machine's one-minute load average ÷ the cores this process may use
    as the run ended. Neither is noted for a GPU run, whose time is the device's."""
    from harness.runner import execute
    wall, cpu = time.perf_counter(), time.process_time()
    result = execute(spec, data_dir, threads, plugin_paths, on_epoch=on_epoch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if not str(spec.device).startswith("cpu"):
        return result
    if wall > 0:
        result.notes["cpu_share"] = round(cpu / (wall * max(1, threads)), 3)
    try:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
        result.notes["load_per_core"] = round(os.getloadavg()[0] / max(1, cores), 2)
    except (OSError, AttributeError):       # no load average on this platform
        pass
    return result


def _run_in_child(conn, spec, data_dir, threads, plugin_paths, suite_pid) -> None:
    """The run process: every finished epoch, then the result, go to the supervisor."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the suite's to handle
    watch_parents(suite_pid)
    result = execute_noting_cpu(spec, data_dir, threads, plugin_paths,
                                on_epoch=lambda _, record: conn.send(("epoch", record)))
    conn.send(("result", result))
    conn.close()


def death_reason(exitcode: Optional[int]) -> str:
    """Why a run process ended without a result, from its exit status."""
    if exitcode is None:
        return "the run's worker vanished without an exit status"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = {"SIGKILL": " (the kernel's out-of-memory killer sends it: check the run's "
                           "memory)",
                "SIGSEGV": " (a crash in native code)",
                "SIGABRT": " (a native library aborted)"}.get(name, "")
        return f"the run's worker was killed by {name}{hint}"
    if exitcode == 75:
        return "the run's worker stopped: the suite's process disappeared"
    return (f"the run's worker exited with status {exitcode} before the run ended "
            f"(os._exit or a native exit in the run's code?)")


def _failed(spec: RunSpec, reason: str, started: str) -> RunResult:
    from harness.runner import now
    return RunResult(spec=spec, status=Status.ERROR, reason=reason, started_at=started,
                     finished_at=now())


def supervise(spec: RunSpec, data_dir: str, threads: int, plugin_paths: tuple = (),
              on_epoch=None, timeout: Optional[float] = None) -> Optional[RunResult]:
    """Run ``spec`` in its own process and return its result — an ``error`` result with the
    cause when the process dies or outlives ``timeout`` seconds. None when the suite is
    stopping (the run was not started, or was killed for the stop). ``on_epoch(spec, record)``
    is called (in this thread) after each epoch the run finishes."""
    from harness.runner import now
    if stopping.is_set():
        return None
    if multiprocessing.current_process().daemon:   # e.g. a Dask worker: no mp children here
        return _supervise_subprocess(spec, data_dir, threads, plugin_paths, timeout)
    context = _fork_context()
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_run_in_child, daemon=True, name=f"run-{spec.key()}",
                              args=(writer, spec, data_dir, threads, tuple(plugin_paths),
                                    os.getpid()))
    started, clock = now(), time.monotonic()
    with _lock:
        if stopping.is_set():
            return None
        process.start()
        _live[process.pid] = process
    writer.close()
    result = None
    try:
        while result is None:
            if reader.poll(POLL_S):
                try:
                    kind, message = reader.recv()
                except (EOFError, OSError):   # died mid-send, or without sending
                    break
                if kind == "result":
                    result = message
                elif on_epoch is not None:
                    on_epoch(spec, message)
                continue
            if not process.is_alive():
                if reader.poll(0):
                    continue
                break
            if stopping.is_set():
                process.kill()
                process.join()
                return None
            if timeout is not None and time.monotonic() - clock > timeout:
                process.kill()
                process.join()
                return _failed(spec, f"timed out: still running after {timeout:g} s "
                                     f"(--run-timeout {timeout:g})", started)
        process.join(timeout=30)
        if result is not None:
            return result
        if stopping.is_set():
            return None
        return _failed(spec, death_reason(process.exitcode), started)
    finally:
        with _lock:
            _live.pop(process.pid, None)
        reader.close()


def _supervise_subprocess(spec, data_dir, threads, plugin_paths, timeout):
    """The same, as ``python -m harness.worker`` with the arguments pickled on stdin and the
    result pickled on stdout (between this harness's own processes only)."""
    from harness.runner import now
    started, clock = now(), time.monotonic()
    payload = pickle.dumps((spec, data_dir, threads, tuple(plugin_paths), os.getpid()))
    process = subprocess.Popen([sys.executable, "-m", "harness.worker"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, start_new_session=False)
    with _lock:
        _live[process.pid] = process
    try:
        try:
            out, _ = process.communicate(payload, timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            return _failed(spec, f"timed out: still running after {timeout:g} s "
                                 f"(--run-timeout {timeout:g})", started)
        if process.returncode == 0 and out:
            try:
                return pickle.loads(out)  # noqa: S301 (our own child's result)
            except Exception:
                return _failed(spec, "the run's worker sent an unreadable result", started)
        return None if stopping.is_set() else _failed(spec, death_reason(process.returncode),
                                                      started)
    finally:
        with _lock:
            _live.pop(process.pid, None)


def stop_all() -> None:
    """Start no new run and kill every run process of this process."""
    stopping.set()
    with _lock:
        processes = list(_live.values())
    for process in processes:
        try:
            process.kill()
        except (OSError, ValueError, AttributeError):
            pass


def reset() -> None:
    """Allow runs again (after a stopped suite, in a process that goes on: tests)."""
    stopping.clear()


def _main() -> int:
    """``python -m harness.worker``: one run, arguments and result pickled over stdin/stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec, data_dir, threads, plugin_paths, suite_pid = pickle.loads(  # noqa: S301
        sys.stdin.buffer.read())
    watch_parents(suite_pid)
    out = sys.stdout.buffer
    sys.stdout = sys.stderr          # nothing the run prints can corrupt the result
    from harness.registry import tasks
    from harness.runner import epoch_line

    def log(spec, record) -> None:   # a remote worker's log: its own stderr
        print(epoch_line(spec, record, tasks.get(spec.task).primary_metric), file=sys.stderr,
              flush=True)
    result = execute_noting_cpu(spec, data_dir, threads, plugin_paths, on_epoch=log)
    out.write(pickle.dumps(result))
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
