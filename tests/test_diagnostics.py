"""Alignment diagnostics: BP's update is its own gradient (0°), DLL with Θ = W frozen is BP
(0°), FA's hidden updates start near 90° on wide layers and fall as it aligns (Lillicrap et
al. 2016); diagnostics change nothing of the run; a suite stores them per epoch."""
from __future__ import annotations

import pytest
import torch

from harness import diagnostics
from harness.api import Arch, Dense, Flatten, RunContext, TaskInfo
from harness.registry import algorithms
from harness.runner import Stepper

ARCH = Arch("wide", (1, 16, 16), (Flatten(), Dense(256), Dense(256), Dense(10, "linear")), 10)
INFO = TaskInfo("cross_entropy", 10, (1, 16, 16))


def _teacher_data(n=2048):
    torch.manual_seed(0)
    teacher = torch.nn.Linear(256, 10)
    x = torch.randn(n, 1, 16, 16)
    with torch.no_grad():
        y = teacher(x.flatten(1)).argmax(-1)
    return x, y


def _learner(name, **params):
    alg = algorithms.get(name)
    p = alg.Params(**{"lr": 1e-3, **params})
    torch.manual_seed(0)
    return alg.build(ARCH, INFO, p, RunContext(epochs=3)), p


def _angles(values, kind):
    return {k.split("/")[1]: v for k, v in values.items() if k.startswith(kind)}


def test_bp_update_is_its_gradient():
    x, y = _teacher_data(256)
    learner, p = _learner("bp")
    angles = _angles(diagnostics.alignment(learner, ARCH, INFO, x, y), "update_angle")
    assert set(angles) == {"layer0", "layer1", "layer2"} and max(angles.values()) < 1e-3


def test_dll_with_theta_equal_w_frozen_is_bp():
    x, y = _teacher_data(256)
    learner, p = _learner("dll", theta="frozen")
    with torch.no_grad():
        for _, w, theta, _ in learner.layers:
            if theta is not None:
                theta.copy_(w)
    found = diagnostics.alignment(learner, ARCH, INFO, x, y, p.label_smoothing)
    assert max(_angles(found, "update_angle").values()) < 1e-2
    assert max(_angles(found, "feedback_angle").values()) < 1e-2       # Θ = W: aligned
    assert all(abs(v - 1.0) < 1e-6 for v in _angles(found, "norm_ratio").values())


def test_fa_starts_near_90_degrees_and_aligns():
    x, y = _teacher_data()
    learner, p = _learner("fa", lr=3e-3)
    stepper = Stepper(learner, p, 3)
    first = _angles(diagnostics.alignment(learner, ARCH, INFO, x[:256], y[:256]), "update_angle")
    for step in range(100):
        i = (step * 64) % len(y)
        stepper.step(x[i:i + 64], y[i:i + 64])
    last = _angles(diagnostics.alignment(learner, ARCH, INFO, x[:256], y[:256]), "update_angle")
    for layer in ("layer0", "layer1"):                 # hidden layers: random feedback at first
        assert 80 < first[layer] < 100, first
        assert last[layer] < first[layer] - 20, (first, last)
    assert first["layer2"] < 1e-3                      # the output layer's update is the true one


def test_diagnostics_change_nothing_of_the_run(tmp_path):
    """The same run with and without diagnostics gives the same numbers (the probe works on a
    copy, the random state restored), and stores the angles under 'diagnostics'."""
    from harness import params as P
    from harness.api import RunSpec
    from harness.registry import tasks
    from harness.runner import execute
    task = tasks.get("blobs")
    task_params = P.resolve(task.Params, {"n_train": 256, "n_test": 64})
    arch = task.presets(P.build(task.Params, task_params), RunContext())["mlp"]
    base = dict(algorithm="dtp", params=P.resolve(algorithms.get("dtp").Params, {"lr": 1e-2}),
                task="blobs", task_params=task_params, arch=arch, seed=1, epochs=3,
                batch_size=32)
    plain = execute(RunSpec(**base), str(tmp_path))
    probed = execute(RunSpec(**base, diagnostics=("alignment",)), str(tmp_path))
    assert plain.status == probed.status == "ok"
    assert [e.train_loss for e in plain.epochs] == [e.train_loss for e in probed.epochs]
    assert all("diagnostics" in e.metrics and "update_angle/layer0" in e.metrics["diagnostics"]
               for e in probed.epochs)
    assert RunSpec(**base).key() != RunSpec(**base, diagnostics=("alignment",)).key()


def test_a_suite_asks_for_diagnostics(write_suite, cli, tmp_path):
    from harness import store
    path = write_suite(f"""
        store: {tmp_path / 'al.sqlite'}
        epochs: 2
        diagnostics: [alignment]
        tasks: {{blobs: {{archs: [mlp], params: {{n_train: 256, n_test: 64}}}}}}
        algorithms: {{bp: {{lr: 0.01}}, fa: {{lr: 0.01}}, dll: {{lr: 0.01}}}}
    """, "al")
    status, out, err = cli("run", path, "--device", "cpu", "--no-progress", "--no-report")
    assert status == 0 and "ok 3" in out, err
    epochs = store.load(tmp_path / "al.sqlite").epochs
    assert "diagnostics_update_angle/layer0" in epochs and "diagnostics_feedback_angle/layer1" in epochs
    bp = epochs[epochs.label == "bp"]
    assert (bp["diagnostics_update_angle/layer1"] < 1.0).all()
    status, _, err = cli("validate", write_suite("diagnostics: [angles]\n" + "tasks: {blobs: {}}\n"
                                                  "algorithms: {bp: {}}\n", "bad"))
    assert status == 2 and "diagnostics: a list of alignment" in err
