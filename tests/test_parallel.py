"""Parallel dispatch: loky workers with capped threads, and a local Dask cluster through the
same suite (what a user does with --backend dask --scheduler ADDRESS)."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness import store
from harness.suite import load as load_suite

TEST_PLUGINS = Path(__file__).resolve().parent / "plugins"


def test_two_local_workers(blob_suite, cli):
    path = blob_suite("  bp: {lr: 0.01}", seeds=3, epochs=2, name="par")
    status, out, err = cli("run", path, "--jobs", "2", "--device", "cpu", "--no-progress",
                           "--no-report", "--plugins", TEST_PLUGINS)
    assert status == 0 and "ok 3" in out, err
    runs = store.load(load_suite(path).store_path).runs
    assert len(runs) == 3 and set(runs["threads"]) == {1}  # 2 cores / 2 jobs on CI


def test_local_dask_cluster(blob_suite, cli):
    distributed = pytest.importorskip("dask.distributed")
    path = blob_suite("  bp: {lr: 0.01}", seeds=2, epochs=2, name="dsk")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        status, out, err = cli("run", path, "--backend", "dask", "--scheduler",
                               cluster.scheduler_address, "--jobs", "2", "--device", "cpu",
                               "--no-progress", "--no-report", "--plugins", TEST_PLUGINS)
    assert status == 0 and "ok 2" in out, err
    frames = store.load(load_suite(path).store_path)
    assert len(frames.runs) == 2 and set(frames.runs["status"]) == {"ok"}
    assert set(frames.sessions["backend"]) == {"dask"}


def test_bad_backend_is_a_user_error(blob_suite, cli):
    status, _, err = cli("run", blob_suite(), "--backend", "mpi", "--device", "cpu")
    assert status == 2 and "--backend" in err and "local, dask" in err


def test_unreachable_scheduler_is_a_user_error(blob_suite, cli):
    pytest.importorskip("dask.distributed")
    status, _, err = cli("run", blob_suite(name="unreach"), "--backend", "dask", "--scheduler",
                         "tcp://127.0.0.1:9", "--device", "cpu", "--no-progress")
    assert status == 2 and "cannot reach a Dask scheduler" in err
