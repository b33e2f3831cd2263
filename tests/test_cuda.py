"""The CUDA path: every rule trains every architecture it supports for an epoch on a GPU, and a
few steps on the GPU match the same steps on the CPU to a tolerance. Skipped, with the reason,
where no GPU is visible."""
from __future__ import annotations

import pytest
import torch

from harness import params as P
from harness.api import Arch, Conv, Dense, Flatten, Pool, Recurrent, RunContext, RunSpec, TaskInfo
from harness.registry import algorithms, discover
from harness.runner import Stepper, execute

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device is visible on this machine")

RULES = ("bp", "fa", "dfa", "pc", "dtp", "dll", "dll_fa")
ARCHS = {
    "mlp": (Arch("mlp", (1, 8, 8), (Flatten(), Dense(32), Dense(16), Dense(4, "linear")), 4),
            TaskInfo("cross_entropy", 4, (1, 8, 8))),
    "cnn": (Arch("cnn", (1, 8, 8), (Conv(4, 3, 1), Pool("max", 2), Conv(6, 3), Pool("avg", 2),
                                    Flatten(), Dense(8), Dense(4, "linear")), 4),
            TaskInfo("cross_entropy", 4, (1, 8, 8))),
    "rnn": (Arch("rnn", (6, 5), (Recurrent(12), Dense(3, "linear")), 3),
            TaskInfo("cross_entropy", 3, (6, 5), sequence=True)),
}


def _batch(arch, info, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((16, *arch.input_shape), generator=g)
    shape = (16, arch.input_shape[0]) if info.sequence else (16,)
    return x.to(device), torch.randint(0, info.output_size, shape, generator=g).to(device)


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("kind", list(ARCHS))
def test_a_few_cuda_steps_match_the_cpu(name, kind):
    discover()
    arch, info = ARCHS[kind]
    alg = algorithms.get(name)
    params = alg.Params(lr=1e-2)
    if alg.unsupported(arch, params):
        pytest.skip(alg.unsupported(arch, params))
    results = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        learner = alg.build(arch, info, params, RunContext(device=device, epochs=2))
        stepper = Stepper(learner, params, epochs=2)
        x, y = _batch(arch, info, device)
        for _ in range(3):
            loss = stepper.step(x, y)["loss"]
        torch.cuda.synchronize()
        results[device] = ({k: v.detach().float().cpu() for k, v in learner.state_dict().items()
                            if hasattr(v, "cpu")}, float(loss))
    cpu, cuda = results["cpu"], results["cuda"]
    assert abs(cpu[1] - cuda[1]) < 1e-3 * max(1.0, abs(cpu[1]))
    for key, value in cpu[0].items():
        torch.testing.assert_close(cuda[0][key], value, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("name", RULES)
def test_every_rule_trains_an_epoch_on_cuda(name, tmp_path):
    from pathlib import Path

    from harness.registry import tasks
    plugins = Path(__file__).resolve().parent / "plugins"
    discover([plugins])
    task = tasks.get("blobs")
    task_params = P.resolve(task.Params, {"n_train": 256, "n_test": 128})
    alg = algorithms.get(name)
    for arch_name in ("mlp", "cnn"):
        arch = task.presets(P.build(task.Params, task_params), RunContext())[arch_name]
        if alg.unsupported(arch, alg.Params()):
            continue
        spec = RunSpec(algorithm=name, params=P.resolve(alg.Params, {"lr": 1e-2}), task="blobs",
                       task_params=task_params, arch=arch, seed=0, epochs=1, batch_size=32,
                       device="cuda")
        result = execute(spec, str(tmp_path), plugin_paths=(str(plugins),))
        assert result.status == "ok", result.traceback
        assert result.memory_kind == "cuda_max_allocated" and result.peak_memory_mb > 0
