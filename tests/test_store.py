"""The result store: runs enter as they finish, re-runs skip stored runs, a killed suite
leaves no partial record and resumes, and the store loads into pandas in one call."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from harness import store
from harness.suite import load as load_suite

ROOT = Path(__file__).resolve().parent.parent
TEST_PLUGINS = Path(__file__).resolve().parent / "plugins"


def wait_for_first_run(store_path: Path, seconds: float = 120) -> int:
    """Poll the store until a run is in it; returns how many are."""
    deadline, stored = time.time() + seconds, 0
    while time.time() < deadline and stored < 1:
        time.sleep(0.2)
        try:
            with sqlite3.connect(store_path) as conn:
                stored = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
        except sqlite3.OperationalError:   # not created yet, or its tables not yet
            stored = 0
    return stored


def test_run_store_and_resume(blob_suite, cli):
    path = blob_suite("  bp: {lr: 0.01}\n  raises: {}", seeds=2, epochs=2)
    status, out, _ = cli("run", path, "--device", "cpu", "--no-progress", "--no-report")
    assert status == 0 and "ok 2" in out and "error 2" in out
    suite = load_suite(path)
    frames = store.load(suite.store_path)
    assert len(frames.runs) == 4
    assert set(frames.runs["status"]) == {"ok", "error"}
    assert len(frames.epochs) == 4  # 2 ok runs × 2 epochs; failed runs have none
    assert {"val_accuracy", "test_accuracy", "test_loss", "train_time_s"} <= set(frames.epochs.columns)
    assert len(frames.sessions) == 1 and frames.sessions["torch"].iloc[0]
    status, out, _ = cli("run", path, "--device", "cpu", "--no-progress", "--no-report")
    assert "already stored 4" in out and "ok 0" in out
    status, out, _ = cli("run", path, "--device", "cpu", "--no-progress", "--no-report", "--rerun")
    assert "ok 2" in out and "already stored 0" in out
    assert len(store.load(suite.store_path).runs) == 4


def test_killed_suite_leaves_no_partial_run_and_resumes(blob_suite, tmp_path):
    path = blob_suite("  slow_bp: {lr: 0.01, sleep_s: 0.02}", seeds=4, epochs=3)
    suite = load_suite(path)
    command = [sys.executable, str(ROOT / "bench.py"), "run", str(path), "--device", "cpu",
               "--no-progress", "--no-report", "--plugins", str(TEST_PLUGINS)]
    env = dict(os.environ, BENCH_OFFLINE="1")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    stored = wait_for_first_run(suite.store_path)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 1 <= stored < 4, "the suite should be killed part-way"
    frames = store.load(suite.store_path)
    # every stored run is complete: all its epochs are there
    assert all(frames.epochs.groupby("run_key").size() == 3)
    assert set(frames.runs["status"]) == {"ok"}
    before = dict(zip(frames.runs["key"], frames.runs["finished_at"]))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = store.load(suite.store_path).runs
    assert len(after) == 4 and set(after["status"]) == {"ok"}
    for key, finished in before.items():  # finished runs were kept, not re-run
        assert after.set_index("key").loc[key, "finished_at"] == finished


def test_not_a_store_is_a_user_error(tmp_path, cli, blob_suite):
    bad = tmp_path / "blobsuite.sqlite"
    bad.write_text("this is not sqlite")
    status, _, err = cli("report", blob_suite())
    assert status == 2 and "not a result store" in err


def test_ctrl_c_keeps_finished_runs(blob_suite):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) with two workers."""
    # slow enough per step that the interrupt lands before all 8 runs end (0.05 s raced once)
    path = blob_suite("  slow_bp: {lr: 0.01, sleep_s: 0.2}", seeds=8, epochs=3, name="ctrlc")
    suite = load_suite(path)
    command = [sys.executable, str(ROOT / "bench.py"), "run", str(path), "--device", "cpu",
               "--jobs", "2", "--no-progress", "--plugins", str(TEST_PLUGINS)]
    # SIGINT back to its default in the child: a test run started in the background of a
    # non-interactive shell (`make test &`) inherits it ignored, and Python then installs no
    # KeyboardInterrupt handler — the suite would never see this Ctrl-C
    proc = subprocess.Popen(command, cwd=path.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_first_run(suite.store_path)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err and "Traceback" not in err
    frames = store.load(suite.store_path)
    assert 1 <= len(frames.runs) < 8
    assert all(frames.epochs.groupby("run_key").size() == 3)


def test_merge_stores_from_two_machines(blob_suite, cli, tmp_path):
    """Half the seeds run into one store, half into another; merged, the suite is complete."""
    path = blob_suite("  bp: {lr: 0.01}", seeds=4, epochs=2, name="merged")
    part = tmp_path / "other_machine.sqlite"
    cli("run", path, "--device", "cpu", "--no-progress", "--no-report", "--only", "seed=0,1")
    cli("run", path, "--device", "cpu", "--no-progress", "--no-report", "--only", "seed=2,3",
        "--store", part)
    status, out, _ = cli("merge", path, part)
    assert status == 0 and "2 runs copied" in out and "4 of the suite's 4 runs" in out
    frames = store.load(load_suite(path).store_path)
    assert sorted(frames.runs["seed"]) == [0, 1, 2, 3]
    assert len(frames.epochs) == 8 and frames.runs["session_id"].nunique() == 2
    status, out, _ = cli("merge", path, part)
    assert "0 runs copied, 2 already" in out
    status, _, err = cli("merge", path, tmp_path / "missing.sqlite")
    assert status == 2 and "no result store" in err
