"""The runner: statuses (ok, diverged, error, skipped), determinism, early stopping,
records per epoch, and BP actually learning."""
from __future__ import annotations

import math

from harness import params as P
from harness.api import RunContext, RunSpec
from harness.registry import algorithms, tasks
from harness.runner import execute, select_epoch, threads_for


def spec_for(algorithm="bp", arch="mlp", epochs=3, seed=0, patience=None, protocol="clean",
             **params) -> RunSpec:
    task = tasks.get("blobs")
    task_params = P.resolve(task.Params, {"n_train": 256, "n_test": 128})
    alg = algorithms.get(algorithm)
    return RunSpec(algorithm=algorithm, params=P.resolve(alg.Params, params), task="blobs",
                   task_params=task_params,
                   arch=task.presets(P.build(task.Params, task_params), RunContext())[arch], seed=seed,
                   epochs=epochs, batch_size=32, protocol=protocol, patience=patience)


def test_bp_learns_and_records_every_epoch(tmp_path):
    result = execute(spec_for(lr=0.01, epochs=4), str(tmp_path))
    assert result.status == "ok", result.traceback
    assert [e.epoch for e in result.epochs] == [1, 2, 3, 4]
    assert result.epochs[0].warmup and not result.epochs[1].warmup
    last = result.epochs[-1]
    assert last.train_time_s > 0 and last.eval_time_s > 0
    assert set(last.metrics) == {"val", "test"}
    assert last.metrics["test"]["accuracy"] > 80.0
    assert result.epochs[-1].train_loss < result.epochs[0].train_loss
    assert result.peak_memory_mb and result.peak_memory_mb > 10
    assert result.n_parameters == 64 * 32 + 32 * 4
    assert result.selection.metric == "accuracy"
    assert result.selection.paper_test == max(e.metrics["test"]["accuracy"] for e in result.epochs)


def test_cnn_runs(tmp_path):
    result = execute(spec_for(arch="cnn", lr=0.01, epochs=2), str(tmp_path))
    assert result.status == "ok", result.traceback


def test_nan_loss_is_diverged_and_stops(tmp_path):
    result = execute(spec_for("nan_after", epochs=5, nan_after=2), str(tmp_path))
    assert result.status == "diverged"
    assert "non-finite" in result.reason
    assert len(result.epochs) == 1 and math.isnan(result.epochs[0].train_loss)


def test_exception_is_error_with_traceback(tmp_path):
    result = execute(spec_for("raises"), str(tmp_path))
    assert result.status == "error"
    assert "deliberate failure" in result.reason
    assert "Traceback" in result.traceback and "boom" in result.traceback


def test_unsupported_architecture_is_skipped(tmp_path):
    result = execute(spec_for("raises", arch="cnn"), str(tmp_path))
    assert result.status == "skipped" and "does not support cnn" in result.reason


def test_same_seed_same_numbers_on_cpu(tmp_path):
    a = execute(spec_for(lr=0.01, seed=3), str(tmp_path), threads=1)
    b = execute(spec_for(lr=0.01, seed=3), str(tmp_path), threads=1)
    c = execute(spec_for(lr=0.01, seed=4), str(tmp_path), threads=1)
    assert [e.train_loss for e in a.epochs] == [e.train_loss for e in b.epochs]
    assert [e.metrics for e in a.epochs] == [e.metrics for e in b.epochs]
    assert [e.train_loss for e in a.epochs] != [e.train_loss for e in c.epochs]


def test_early_stopping_on_validation(tmp_path):
    result = execute(spec_for(lr=0.0, epochs=10, patience=2), str(tmp_path))
    assert result.status == "ok"
    assert len(result.epochs) == 3  # epoch 1 sets the best; 2 and 3 do not improve
    assert "early stop" in result.reason


def test_linear_decay_reaches_the_paper_schedule(tmp_path):
    result = execute(spec_for(lr=0.01, epochs=4, lr_decay="linear"), str(tmp_path))
    assert [round(e.lr, 6) for e in result.epochs] == [0.01, 0.0075, 0.005, 0.0025]


def test_selection_per_protocol():
    from harness.api import EpochRecord
    epochs = [EpochRecord(i, 1, 1, 1, {"val": {"accuracy": v}, "test": {"accuracy": t}})
              for i, (v, t) in enumerate([(50, 60), (70, 55), (65, 80)], start=1)]
    assert select_epoch(epochs, "val", "accuracy", "max").epoch == 2
    assert select_epoch(epochs, "test", "accuracy", "max").epoch == 3
    assert select_epoch(epochs, "test", "accuracy", "min").epoch == 2


def test_threads_never_oversubscribe():
    assert threads_for(1, cores=8) == 8
    assert threads_for(3, cores=8) == 2
    assert threads_for(16, cores=8) == 1
