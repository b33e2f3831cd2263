"""The run processes' C allocator keeps freed memory (harness/allocator.py): set in every run
process and noted in its run, off with BENCH_MALLOC=default, and the numbers unchanged."""
from __future__ import annotations

import json
import os
import platform
import sqlite3
import subprocess
import sys

import pytest

from conftest import ROOT

PROBE = ("from harness.allocator import keep_freed_memory as k; "
         "a = k(); b = k(); print(repr(a)); assert a == b")


def _probe(**env) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, **env))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc",
                    reason="mallopt is glibc's")
def test_set_once_on_glibc_and_off_when_asked():
    assert "freed memory kept" in _probe()
    assert _probe(BENCH_MALLOC="default") == "None"


def test_runs_note_it_and_train_to_the_same_numbers(blob_suite, tmp_path):
    """The same suite run twice, once as it comes and once with BENCH_MALLOC=default (each a
    `bench.py run` of its own: run processes take the setting from the process that forks
    them): every number of every epoch equal; only the first notes the setting."""
    epochs = {}
    for side in ("kept", "default"):
        env = dict(os.environ)
        env.pop("BENCH_MALLOC", None)
        if side == "default":
            env["BENCH_MALLOC"] = "default"
        path = blob_suite(seeds=1, epochs=3, name=f"alloc_{side}")
        done = subprocess.run([sys.executable, "bench.py", "run", str(path), "--no-progress",
                               "--no-report", "--device", "cpu", "--threads", "1",
                               "--plugins", str(ROOT / "tests" / "plugins")],
                              capture_output=True, text=True, cwd=ROOT, env=env)
        assert done.returncode == 0, done.stderr
        with sqlite3.connect(tmp_path / f"alloc_{side}.sqlite") as conn:
            (notes,), = conn.execute("SELECT notes FROM runs").fetchall()
            epochs[side] = conn.execute("SELECT epoch, train_loss, lr, metrics FROM epochs "
                                        "ORDER BY epoch").fetchall()
        noted = json.loads(notes).get("malloc")
        if side == "default" or platform.libc_ver()[0] != "glibc":
            assert noted is None
        else:
            assert "freed memory kept" in noted
    assert len(epochs["kept"]) == 3 and epochs["kept"] == epochs["default"]
