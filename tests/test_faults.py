"""Workers and stores that survive faults: a run that kills its process, exits, hangs or
segfaults is stored as an error with its cause and the suite goes on; two processes on one
store never compute the same run; SIGTERM (or the parent's death) leaves no process behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import store
from harness.suite import load as load_suite

ROOT = Path(__file__).resolve().parent.parent
TEST_PLUGINS = Path(__file__).resolve().parent / "plugins"


def _run(cli, path, *extra):
    return cli("run", path, "--device", "cpu", "--no-progress", "--no-report", "--plugins",
               TEST_PLUGINS, *extra)


@pytest.mark.parametrize("how,cause", [
    ("sigkill", "killed by SIGKILL (the kernel's out-of-memory killer"),
    ("os_exit", "exited with status 3"),
    ("segfault", "killed by SIGSEGV"),
    ("sys_exit", "the run called sys.exit(4)"),
])
def test_a_dying_worker_becomes_an_error_run_and_the_suite_goes_on(blob_suite, cli, how, cause):
    path = blob_suite(f"  bp: {{lr: 0.01}}\n  dies: {{how: {how}}}", seeds=2, epochs=2,
                      name=f"dies_{how}")
    status, out, err = _run(cli, path, "--jobs", "2")
    assert status == 0, err
    assert "ok 2" in out and "error 2" in out and "Traceback" not in err
    runs = store.load(load_suite(path).store_path).runs
    died = runs[runs.algorithm == "dies"]
    assert len(died) == 2 and set(died.status) == {"error"}
    assert all(cause in reason for reason in died.reason), list(died.reason)
    status, out, _ = _run(cli, path)                 # recorded: a re-run does not crash again
    assert status == 0 and "already stored 4" in out


def test_a_hanging_run_times_out(blob_suite, cli):
    path = blob_suite("  dies: {how: hang}\n  bp: {lr: 0.01}", epochs=1, name="hangs")
    started = time.monotonic()
    status, out, err = _run(cli, path, "--run-timeout", "6")
    assert status == 0 and "ok 1" in out and "error 1" in out, err
    assert time.monotonic() - started < 60
    runs = store.load(load_suite(path).store_path).runs
    reason = runs[runs.algorithm == "dies"].reason.iloc[0]
    assert reason.startswith("timed out: still running after 6 s (--run-timeout 6)")


def _bench(*args, cwd):
    """bench.py in a session of its own, run from ``cwd`` (where its report goes)."""
    return subprocess.Popen([sys.executable, str(ROOT / "bench.py"), *map(str, args)],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def test_two_concurrent_runs_of_one_suite_train_each_run_once(blob_suite):
    path = blob_suite("  slow_bp: {lr: 0.01, sleep_s: 0.03}", seeds=6, epochs=2, name="twice")
    args = ["run", path, "--device", "cpu", "--no-progress", "--no-report", "--plugins",
            TEST_PLUGINS]
    first, second = _bench(*args, cwd=path.parent), _bench(*args, cwd=path.parent)
    outs = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outs
    trained = 0
    for out, _ in outs:
        line = next(l for l in out.splitlines() if l.startswith("twice:"))
        trained += int(line.split("ok ")[1].split(",")[0])
    assert trained == 6, outs
    frames = store.load(load_suite(path).store_path)
    assert len(frames.runs) == 6 and frames.runs.session_id.nunique() == 2
    assert all(frames.epochs.groupby("run_key").size() == 2)


def _descendants(pid: int) -> set[int]:
    """Every process whose parent chain reaches ``pid``, by its session (the suite was started
    in a session of its own), or whose session leader is gone but which kept the session."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == pid and int(entry.name) != pid:   # field 6: the session id
            found.add(int(entry.name))
    return found


def _wait_for_a_run_process(pid: int, seconds: float = 60) -> set[int]:
    deadline = time.time() + seconds
    while time.time() < deadline:
        children = _descendants(pid)
        if len(children) >= 3:        # the fork server, the resource tracker, a run
            return children
        time.sleep(0.2)
    return _descendants(pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_the_suite_leaves_no_process_behind(blob_suite, sig):
    """After SIGTERM (handled as Ctrl-C) or SIGKILL of a --jobs 2 suite, none of its processes
    is alive 5 s later; after SIGTERM the finished runs are kept."""
    path = blob_suite("  slow_bp: {lr: 0.01, sleep_s: 0.05}", seeds=8, epochs=4,
                      name=f"term{int(sig)}")
    proc = _bench("run", path, "--device", "cpu", "--jobs", "2", "--no-progress", "--plugins",
                  TEST_PLUGINS, cwd=path.parent)
    children = _wait_for_a_run_process(proc.pid)
    assert children, "the suite never started a run process"
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=60)
    deadline = time.time() + 5
    while time.time() < deadline and _descendants(proc.pid):
        time.sleep(0.1)
    assert not _descendants(proc.pid), "processes of the suite outlived it"
    if sig == signal.SIGTERM:
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
        frames = store.load(load_suite(path).store_path)
        assert all(frames.epochs.groupby("run_key").size() == 4)
        assert set(frames.runs.status) <= {"ok"}


def test_a_claim_of_a_dead_process_is_taken_over(tmp_path):
    """A run claimed by a process that died is computed by the next one."""
    from harness.store import Owner, Store
    path = tmp_path / "claims.sqlite"
    with Store(path) as s:
        dead = Owner(pid=2 ** 22 + 12345)      # a pid that is not running
        assert s.claim("k1", dead) == "claimed"
        me = Owner()
        assert s.claim("k1", me) == "claimed"
        other = Owner()
        assert s.claim("k1", other) == "taken"
        s.release(me)
        assert s.claim("k1", other) == "claimed"
