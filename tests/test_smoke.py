"""The CI smoke suite on real MNIST, as a user runs it: a subprocess from another folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.data import DATASETS, default_data_dir, verify

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not verify(DATASETS["mnist"], default_data_dir())[0],
                    reason="real MNIST is not prepared (make data)")
def test_smoke_suite_on_real_mnist(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "BENCH_OFFLINE"}
    done = subprocess.run([sys.executable, str(ROOT / "bench.py"), str(ROOT / "suites/smoke.yaml"),
                           "--no-progress"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ok 1" in done.stdout and done.stdout.strip().endswith("reports/smoke/report.md")
    from harness.store import load
    runs = load(tmp_path / "results" / "smoke.sqlite").runs
    assert runs["status"].tolist() == ["ok"]
    assert runs["clean_test"].iloc[0] > 80.0   # 2 epochs on 2,000 real digits
    assert (tmp_path / "reports" / "smoke" / "curves.png").exists()
    assert (tmp_path / "reports" / "smoke" / "runs.jsonl").exists()
