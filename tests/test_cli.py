"""The command line as a user meets it: help, list, dry runs, --only, errors without tracebacks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_help_and_list(cli):
    status, out, _ = cli("list")
    assert status == 0
    assert "bp" in out and "Backpropagation" in out and "mnist" in out
    assert "arch mlp: 1x28x28 > flatten > dense1024 > dense512 > dense256 > dense10(linear)" in out
    status, out, _ = cli("list", "tasks")
    assert "Algorithms" not in out and "fashion_mnist" in out


def test_help_runs_as_a_script():
    done = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "validate" in done.stdout and "report" in done.stdout


def test_unknown_suite_file_is_one_line_without_traceback():
    done = subprocess.run([sys.executable, str(ROOT / "bench.py"), "suites/nope.yaml"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: suites/nope.yaml: no such suite file"


def test_dry_run_runs_nothing(blob_suite, cli):
    path = blob_suite("  bp: {lr: [0.1, 0.01]}", seeds=2)
    status, out, _ = cli("run", path, "--dry-run", "--device", "cpu")
    assert status == 0 and "4 runs: 4 to run" in out and "nothing was run" in out
    assert not (path.parent / "blobsuite.sqlite").exists()


def test_only_filters_the_grid(blob_suite, cli):
    path = blob_suite("  bp: {lr: [0.1, 0.01]}", seeds=2)
    status, out, _ = cli("run", path, "--dry-run", "--device", "cpu", "--only", "seed=1")
    assert "2 runs: 2 to run" in out
    status, _, err = cli("run", path, "--dry-run", "--device", "cpu", "--only", "arch=rnn")
    assert status == 2 and "'rnn' names no run" in err and "valid arch values: mlp" in err
    status, _, err = cli("run", path, "--dry-run", "--only", "colour=red")
    assert status == 2 and "KEY=VALUE" in err


def test_data_command_lists_every_dataset(cli):
    status, out, _ = cli("data")
    assert status == 0
    for name in ("mnist", "fashion_mnist", "cifar10", "svhn"):
        assert name in out


def test_every_shipped_suite_is_valid(cli):
    for path in sorted((ROOT / "suites").glob("*.yaml")):
        status, out, err = cli("validate", path)
        assert status == 0, f"{path}: {err}"


def test_report_after_a_slice_covers_the_whole_suite(blob_suite, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = blob_suite("  bp: {lr: 0.01}", seeds=2, epochs=1, name="slice")
    cli("run", path, "--device", "cpu", "--no-progress", "--no-report")
    status, out, _ = cli("run", path, "--device", "cpu", "--no-progress", "--only", "seed=1",
                         "--rerun")
    text = (tmp_path / "reports" / "slice" / "report.md").read_text()
    assert "2 of 2 planned runs stored" in text and "(2)" in text


def test_only_algorithm_names_the_row_not_every_row_of_that_plugin(write_suite, cli, tmp_path):
    path = write_suite(f"""
        store: {tmp_path / 'o.sqlite'}
        tasks: {{blobs: {{archs: [mlp]}}}}
        algorithms:
          bp: {{}}
          bp-sgd: {{algorithm: bp, optimizer: sgd}}
    """, "only")
    _, out, _ = cli("run", path, "--dry-run", "--device", "cpu", "--only", "algorithm=bp")
    assert "1 runs: 1 to run" in out and "bp-sgd" not in out


def test_log_epochs_prints_a_line_per_epoch(blob_suite, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = blob_suite("  bp: {lr: 0.01}", epochs=2, name="logged")
    status, _, err = cli("run", path, "--device", "cpu", "--no-progress", "--no-report",
                         "--log-epochs")
    lines = [line for line in err.splitlines() if ": epoch " in line]
    assert status == 0 and len(lines) == 2
    assert lines[0].startswith("bp blobs/mlp seed 0: epoch 1/2 loss ")
    assert " accuracy val " in lines[1] and " test " in lines[1] and lines[1].endswith(" s)")
    status, _, err = cli("run", path, "--device", "cpu", "--no-progress", "--no-report",
                         "--rerun")
    assert ": epoch " not in err


def test_a_rerun_at_other_threads_or_on_another_cpu_says_so(blob_suite, cli, tmp_path, monkeypatch):
    """Runs to do again that were made at other torch threads are named, with the --threads
    that reproduces them; at their own threads nothing is said."""
    monkeypatch.chdir(tmp_path)
    path = blob_suite("  bp: {lr: 0.01}", seeds=2, epochs=1, name="threads")
    status, _, err = cli("run", path, "--device", "cpu", "--no-progress", "--no-report",
                         "--threads", "1")
    assert status == 0, err
    status, out, _ = cli("run", path, "--dry-run", "--device", "cpu", "--rerun",
                         "--threads", "2")
    assert status == 0
    assert ("note: 2 stored run(s) to run again were made at other torch threads (2 at 1) than "
            "these will have (2)") in out and "--threads 1 reproduces them" in out
    status, out, _ = cli("run", path, "--dry-run", "--device", "cpu", "--rerun",
                         "--threads", "1")
    assert status == 0 and "other torch threads" not in out
    status, _, err = cli("run", path, "--device", "cpu", "--no-progress", "--no-report",
                         "--rerun", "--threads", "2", "--only", "seed=0")
    assert status == 0 and "note: 1 stored run(s) to run again" in err, err
    import sqlite3                                # and runs made on another CPU model
    with sqlite3.connect(tmp_path / "threads.sqlite") as conn:
        conn.execute("UPDATE sessions SET cpu = 'Another CPU 9000'")
    status, out, _ = cli("run", path, "--dry-run", "--device", "cpu", "--rerun",
                         "--threads", "1")
    assert status == 0
    assert ("note: 2 stored run(s) to run again were made on another CPU model (2 on Another "
            "CPU 9000) than this one") in out


def test_dry_run_counts_runs_waiting_for_data_apart(write_suite, cli, tmp_path, monkeypatch):
    """Runs whose data is not prepared are neither 'to run' nor 'skipped' in the dry run's
    count: they run once the data is fetched."""
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "empty"))
    path = write_suite(f"""
        store: {tmp_path / 'w.sqlite'}
        epochs: 1
        tasks:
          blobs: {{archs: [mlp], params: {{n_train: 256, n_test: 128}}}}
          mnist: {{archs: [mlp]}}
        algorithms: {{bp: {{}}, pc: {{}}}}
    """, "waiting")
    status, out, err = cli("run", path, "--dry-run", "--device", "cpu")
    assert status == 0, err
    assert "4 runs: 2 to run, 0 stored, 2 to run once their data is fetched, 0 skipped" in out
