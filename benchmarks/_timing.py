"""Shared helper of the benchmark scripts: time training epochs of any registered algorithm
inside the harness (the runner's own clock), on real MNIST when it is prepared, otherwise on
random tensors of MNIST's shape (the timing is the same; the accuracy is not reported)."""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import params as P  # noqa: E402
from harness.api import RunContext, RunSpec  # noqa: E402
from harness.data import default_data_dir, verify, DATASETS  # noqa: E402
from harness.registry import algorithms, discover, tasks  # noqa: E402
from harness.runner import execute  # noqa: E402


def mnist_ready() -> bool:
    discover()                      # the image task registers the dataset
    return verify(DATASETS["mnist"], default_data_dir())[0]


def harness_epoch_times(algorithm: str, arch: str = "mlp", *, task: str = "mnist",
                        batch_size: int = 128, epochs: int = 3, train_subset: int = 20000,
                        threads: int = 2, seed: int = 0, device: str = "cpu",
                        **params) -> list[float]:
    """Training seconds of each epoch after the first (warm-up), measured by the runner."""
    discover()
    alg = algorithms.get(algorithm)
    task_obj = tasks.get(task)
    task_params = P.resolve(task_obj.Params, {"train_subset": train_subset, "test_subset": 1000})
    arch_spec = task_obj.presets(P.build(task_obj.Params, task_params), RunContext())[arch]
    spec = RunSpec(algorithm=algorithms.canonical(algorithm), params=P.resolve(alg.Params, params),
                   task=task, task_params=task_params, arch=arch_spec, seed=seed, epochs=epochs,
                   batch_size=batch_size, device=device, protocol="clean", validation=0.05,
                   algorithm_version=alg.version, task_version=task_obj.version)
    result = execute(spec, str(default_data_dir()), threads=threads)
    if result.status != "ok":
        raise SystemExit(f"{algorithm} run failed: {result.reason}\n{result.traceback}")
    return [e.train_time_s for e in result.epochs if not e.warmup]


def median(values: list[float]) -> float:
    return statistics.median(values)


def interleaved_epoch_times(names: tuple[str, ...], arch: str = "mlp", *, repeats: int = 3,
                            **kwargs) -> dict[str, list[float]]:
    """Epoch times of several algorithms, interleaved and rotated each repeat, so that drift in
    the machine's load hits them all alike."""
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            times[name] += harness_epoch_times(name, arch, seed=repeat, **kwargs)
    return times
