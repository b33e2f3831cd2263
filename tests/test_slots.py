"""Device slots, on the CPU with a faked GPU count: runs are spread over every GPU, --per-gpu
runs share one, each run is pinned to the GPU it got and recorded with it, keys unchanged."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from harness import parallel, store
from harness.api import UserError
from harness.slots import DeviceSlots, default_jobs
from harness.suite import load as load_suite

TEST_PLUGINS = Path(__file__).resolve().parent / "plugins"


def test_slots_spread_over_every_gpu_and_share_with_per_gpu():
    slots = DeviceSlots("cuda", per_gpu=2, count=3)
    assert slots.size == 6
    first = [slots.acquire() for _ in range(3)]
    assert first == ["cuda:0", "cuda:1", "cuda:2"]          # one per GPU before sharing
    second = [slots.acquire() for _ in range(3)]
    assert sorted(second) == ["cuda:0", "cuda:1", "cuda:2"]
    got = []
    waiter = threading.Thread(target=lambda: got.append(slots.acquire()))
    waiter.start()
    time.sleep(0.2)
    assert not got                                           # all six busy: it waits
    slots.release("cuda:1")
    waiter.join(2)
    assert got == ["cuda:1"]


def test_slot_defaults_and_mistakes():
    assert default_jobs("cuda", 4, None, count=2) == 8
    assert default_jobs("cuda", 1, 3, count=8) == 3          # --jobs wins
    assert default_jobs("cpu", 4, None) == 1
    assert not DeviceSlots("cpu").pooled and DeviceSlots("cpu").acquire() == "cpu"
    assert DeviceSlots("cuda:2").acquire() == "cuda:2"       # one named GPU: no pool
    with pytest.raises(UserError, match="no CUDA device"):
        DeviceSlots("cuda", count=0)
    with pytest.raises(UserError, match="--per-gpu"):
        DeviceSlots("cuda", per_gpu=0, count=1)


def test_runs_are_pinned_to_their_slot_and_recorded(blob_suite, monkeypatch):
    """Four runs, two faked GPUs, two per GPU: each run records the GPU it was given (the
    runs themselves run on the CPU here), and the keys are those of --device cuda."""
    import harness.worker as worker
    from harness.registry import discover
    discover([TEST_PLUGINS])
    path = blob_suite("  bp: {lr: 0.01}", seeds=4, epochs=1, name="slotted")
    suite = load_suite(path, device="cuda")
    from dataclasses import replace
    seen = []
    real = worker.supervise

    def on_cpu(spec, *args):              # run on the CPU, but keep the device it was given
        seen.append(spec.device)
        result = real(replace(spec, device="cpu"), *args)
        result.spec = spec
        return result
    monkeypatch.setattr(worker, "supervise", on_cpu)
    summary = parallel.run(list(suite.specs), suite.store_path, jobs=4, data_dir=Path("data"),
                           plugin_paths=(str(TEST_PLUGINS),), progress=False,
                           suite_name=suite.name, structure=suite.structure(), per_gpu=2,
                           gpu_count=2)
    assert summary.counts["ok"] == 4
    assert sorted(seen) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    runs = store.load(suite.store_path).runs
    assert sorted(runs.device) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert set(runs.key) == {s.key() for s in suite.specs}   # the GPU index is not in the key
