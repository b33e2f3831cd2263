"""Verified equivalences of code (`bench.py equate`, harness/fingerprint.py): a change that
leaves a configuration's numbers equal keeps its stored runs current; one that moves them does
not, and an equivalence checked for one configuration says nothing of another."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import fingerprint
from conftest import EDITABLE_PLUGIN

ROOT = Path(__file__).resolve().parent.parent
TEST_PLUGINS = Path(__file__).resolve().parent / "plugins"
BASE = "tasks: {blobs: {archs: [mlp], params: {n_train: 128, n_test: 64}}}\n"


def test_resolve_follows_a_chain_per_configuration(tmp_path, monkeypatch):
    path = tmp_path / "eq.yaml"
    path.write_text(yaml.safe_dump([
        {"algorithm": "a", "task": "t", "arch": "mlp", "config": "c1", "from": "d1", "to": "d2"},
        {"algorithm": "a", "task": "t", "arch": "mlp", "config": "c1", "from": "d2", "to": "d3"},
    ]))
    monkeypatch.setenv("BENCH_EQUIVALENCES", str(path))
    assert fingerprint.resolve("c1", "d1") == "d3"
    assert fingerprint.resolve("c2", "d1") == "d1"          # another configuration: no entry
    assert fingerprint.resolve("c1", "d9") == "d9"
    monkeypatch.setattr(fingerprint, "_as_dict", lambda spec: spec)
    monkeypatch.setattr(fingerprint, "config_of", lambda spec: spec)
    monkeypatch.setattr(fingerprint, "device_of", lambda spec: "cpu")
    assert fingerprint.is_current("c1", "d1", "d3")
    assert not fingerprint.is_current("c2", "d1", "d3")
    assert not fingerprint.is_current("c1", "d1", "d2")     # d2 was itself superseded
    assert fingerprint.is_current("c1", "d1", None)          # unknown current: not stale
    assert fingerprint.resolve("c1", "d1", "cuda") == "d1"   # checked on the CPU only


def test_config_is_the_identity_without_seed_or_labels():
    spec = {"algorithm": "dll", "params": {"lr": 1e-3}, "seed": 0, "label": "a", "suite": "s",
            "device": "cpu", "task_label": "x", "skip_reason": None, "epochs": 20}
    same = dict(spec, seed=3, label="b", suite="t", device="cuda:1", task_label="y")
    assert fingerprint.config_of(spec) == fingerprint.config_of(same)
    assert fingerprint.config_of(spec) != fingerprint.config_of(
        dict(spec, params={"lr": 1e-3, "variant": "released"}))
    assert fingerprint.config_of(spec) != fingerprint.config_of(dict(spec, epochs=10))


@pytest.mark.parametrize("text,expected", [
    ("- {algorithm: a}\n", "entry 1 lacks task, arch, config, from, to"),
    ("{a: 1}\n", "must be a list of entries"),
    ("- [unclosed\n", "not readable as YAML"),
])
def test_a_malformed_equivalences_file_is_one_line(tmp_path, cli, write_suite, monkeypatch,
                                                   text, expected):
    path = tmp_path / "eq.yaml"
    path.write_text(text)
    monkeypatch.setenv("BENCH_EQUIVALENCES", str(path))
    suite = write_suite(BASE + f"store: {tmp_path / 'st.sqlite'}\nepochs: 1\n"
                        "algorithms: {bp: {}}\n", "st")
    (tmp_path / "st.sqlite").write_bytes(b"")
    status, out, err = cli("equate", suite)
    assert status == 2 and len(err.strip().splitlines()) == 1, (out, err)
    assert str(path) in err and expected in err, err


def _editable_suite(tmp_path, write_suite, name: str, rows: str, epochs: int, seeds: int):
    """A plugin a test edits (``name``, in a folder of its own), a suite of ``rows`` on it
    (YAML lines under ``algorithms:``), and ``bench(*args)``: bench.py with both plugin folders
    and the test's own equivalences file. (plugin file, suite path, equivalences path, bench)"""
    folder = tmp_path / "mine" / "algorithms"
    folder.mkdir(parents=True)
    plugin = folder / f"{name}.py"
    plugin.write_text(EDITABLE_PLUGIN.format(name=name, init="params.init_std"))
    equivalences = tmp_path / "equivalences.yaml"
    path = write_suite(BASE + f"store: {tmp_path / 'st.sqlite'}\nepochs: {epochs}\n"
                       f"seeds: {seeds}\nalgorithms:\n{rows}", "st")
    plugins = ("--plugins", str(tmp_path / "mine"), "--plugins", str(TEST_PLUGINS))
    env = dict(os.environ, BENCH_EQUIVALENCES=str(equivalences))

    def bench(*args):
        return subprocess.run([sys.executable, str(ROOT / "bench.py"), *map(str, args),
                               *plugins], capture_output=True, text=True, cwd=ROOT, env=env)
    return plugin, path, equivalences, bench


def test_equate_keeps_equal_configurations_and_only_them(tmp_path, write_suite):
    """Two rows of one plugin; an edit that moves only the `fast` row's numbers. equate keeps
    `slow` current (entry written), reports `fast` as differing (exit 1, no entry); the next
    dry run shows only fast's runs stale, and equate on a current store has nothing to do."""
    plugin, path, equivalences, bench = _editable_suite(
        tmp_path, write_suite, "editable_eq", "  slow: {algorithm: editable_eq, lr: 0.05}\n"
        "  fast: {algorithm: editable_eq, lr: 0.1}\n", epochs=2, seeds=2)
    done = bench("run", path, "--device", "cpu", "--no-progress", "--no-report")
    assert done.returncode == 0 and "ok 4" in done.stdout, done.stderr

    plugin.write_text(EDITABLE_PLUGIN.format(   # `fast` starts from other weights; `slow` not
        name="editable_eq", init="params.init_std * (1.5 if params.lr > 0.06 else 1.0)"))
    listed = bench("equate", path, "--list")
    assert listed.returncode == 0, listed.stderr
    assert "2 configuration(s) with stale runs (4 runs)" in listed.stdout
    assert not equivalences.exists()                         # --list runs and writes nothing

    done = bench("equate", path, "--epochs", "2", "--note", "a test's edit")
    assert done.returncode == 1, (done.stdout, done.stderr)
    out = done.stdout
    assert "slow on blobs/mlp:" in out and "equal over 2 epoch(s)" in out
    fast = out.split("fast on blobs/mlp:\n")[1].split("slow on blobs/mlp:")[0]
    assert "DIFFERS — epoch " in fast and " stored, " in fast and " now" in fast
    entries = yaml.safe_load(equivalences.read_text())
    assert [e["row"] for e in entries] == ["slow"]
    assert entries[0]["max_relative_difference"] == 0.0 and entries[0]["epochs"] == 2
    assert entries[0]["note"] == "a test's edit" and entries[0]["seeds"] == [0]
    assert equivalences.read_text().startswith("# Verified equivalences")

    dry = bench("run", path, "--device", "cpu", "--dry-run")
    assert dry.stdout.count("stored (stale)") == 2, dry.stdout      # fast's two seeds only
    report = bench("report", path, "--out", tmp_path / "reports")   # from the stored JSON specs
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "reports" / "st" / "report.md").read_text()
    assert "**2 of these runs were made with older code (stale)**: fast on blobs/mlp" in text
    assert "2 run(s) made with an older digest count as current" in text
    assert bench("equate", path, "--tolerance", "inf").returncode == 2
    again = bench("equate", path)
    assert again.returncode == 1 and "1 configuration(s) with stale runs (2 runs)" in again.stdout
    assert len(yaml.safe_load(equivalences.read_text())) == 1       # nothing added for fast
    rerun = bench("run", path, "--device", "cpu", "--no-progress", "--no-report",
                  "--rerun-stale")
    assert rerun.returncode == 0 and "ok 2" in rerun.stdout, rerun.stderr
    assert "stale" not in bench("run", path, "--device", "cpu", "--dry-run").stdout
    assert "nothing to check" in bench("equate", path).stdout


def test_a_rerun_that_kills_its_process_fails_its_check_not_equate(tmp_path, write_suite):
    """Each re-run is a process of its own: one that dies of a signal (here SIGSEGV, as a crash
    in native code would) is that configuration's failure, with its cause, and equate goes on
    to the next configuration and records it. A plugin folder named relative to where equate
    runs reaches the re-runs."""
    plugin, path, equivalences, bench = _editable_suite(
        tmp_path, write_suite, "editable_crash", "  crashes: {algorithm: editable_crash, lr: 0.1}\n"
        "  holds: {algorithm: editable_crash, lr: 0.05}\n", epochs=1, seeds=1)
    done = bench("run", path, "--device", "cpu", "--no-progress", "--no-report")
    assert done.returncode == 0 and "ok 2" in done.stdout, done.stderr
    plugin.write_text(EDITABLE_PLUGIN.format(   # no core file: RLIMIT_CORE 0, then SIGSEGV
        name="editable_crash", init="((__import__('resource').setrlimit(__import__('resource')"
                                    ".RLIMIT_CORE, (0, 0)), __import__('os').kill(__import__("
                                    "'os').getpid(), 11)) if params.lr > 0.06 "
                                    "else params.init_std)"))
    # run from the plugin folder's parent, named there relatively in $BENCH_PLUGIN_PATH: the
    # re-runs (processes in the project's folder) must still find it
    done = subprocess.run([sys.executable, str(ROOT / "bench.py"), "equate", str(path),
                           "--plugins", str(TEST_PLUGINS)], capture_output=True, text=True,
                          cwd=tmp_path, env=dict(os.environ, BENCH_PLUGIN_PATH="mine",
                                                 BENCH_EQUIVALENCES=str(equivalences)))
    assert done.returncode == 1, (done.stdout, done.stderr)
    crashed = done.stdout.split("crashes on blobs/mlp:\n")[1].split("holds on blobs/mlp:")[0]
    assert "ended without a result" in crashed and "SIGSEGV" in crashed, done.stdout
    assert "equal over 1 epoch(s)" in done.stdout.split("holds on blobs/mlp:\n")[1]
    assert [e["row"] for e in yaml.safe_load(equivalences.read_text())] == ["holds"]


def _checkout(root: Path, into: Path) -> Path:
    """A copy of the project's code (what `git worktree add` would give, minus git)."""
    import shutil
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("harness", "algorithms", "tasks"):
        shutil.copytree(root / name, into / name, ignore=ignore)
    shutil.copy(root / "bench.py", into / "bench.py")
    return into


def test_baseline_compares_with_the_old_code_run_here(tmp_path, write_suite):
    """--baseline DIR: the old code (a checkout) and the new run side by side on this machine;
    an engine edit that computes the same agrees exactly and is recorded as such; a baseline
    whose code is not the stored runs' is refused with its digest; a folder that is no checkout
    is one line, exit 2."""
    old = _checkout(ROOT, tmp_path / "old")
    new = _checkout(ROOT, tmp_path / "new")
    equivalences = tmp_path / "equivalences.yaml"
    env = dict(os.environ, BENCH_EQUIVALENCES=str(equivalences))
    path = write_suite(BASE + f"store: {tmp_path / 'st.sqlite'}\nepochs: 2\nseeds: 1\n"
                       "algorithms: {bp: {lr: 0.05}}\n", "st")

    def bench(where, *args):
        return subprocess.run([sys.executable, "bench.py", *map(str, args), "--plugins",
                               str(TEST_PLUGINS)], capture_output=True, text=True, cwd=where,
                              env=env)
    done = bench(old, "run", path, "--device", "cpu", "--no-progress", "--no-report")
    assert done.returncode == 0 and "ok 1" in done.stdout, done.stderr
    toolkit = new / "harness" / "toolkit.py"                   # the engine, edited: same numbers
    toolkit.write_text(toolkit.read_text() + "\n\nEDITED_BY_A_TEST = True\n")
    assert "1 stored run(s) were made with source other" in \
        bench(new, "run", path, "--device", "cpu", "--dry-run").stdout

    refused = bench(new, "equate", path, "--baseline", tmp_path)
    assert refused.returncode == 2 and "not a checkout of this project" in refused.stderr
    wrong = bench(new, "equate", path, "--baseline", new)       # the new code is no baseline
    assert wrong.returncode == 1 and "check out the commit they were made with" in wrong.stdout

    done = bench(new, "equate", path, "--baseline", old, "--epochs", "2")
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "equal to the old code's re-run over 2 epoch(s)" in done.stdout
    entry, = yaml.safe_load(equivalences.read_text())
    assert entry["compared_with"].startswith("the old code re-run on this machine")
    assert entry["max_relative_difference"] == 0.0 and entry["stored_vs_rerun_max_relative"] == 0.0
    assert "stale" not in bench(new, "run", path, "--device", "cpu", "--dry-run").stdout


def test_numbers_compare_as_the_store_keeps_them():
    """A non-finite number is stored as null: a diverged epoch's NaN loss re-run as NaN (or
    inf) agrees with its stored null; a number against null or another number does not."""
    from harness.equate import _relative
    assert _relative(None, float("nan")) == 0.0 and _relative(float("inf"), None) == 0.0
    assert _relative(1.0, 1.0) == 0.0 and _relative(None, 1.0) == float("inf")
    assert _relative(2.0, 1.0) == 0.5


def test_the_stored_selection_is_checked_against_the_current_choice():
    """equate also asks the current code which epoch each protocol takes over all the stored
    epochs: a stored selection it would not make is a difference."""
    from harness.equate import selection_difference
    from harness.registry import discover

    discover([str(TEST_PLUGINS)])

    class Spec:
        task = "blobs"
    epochs = [{"epoch": e, "train_loss": 1.0 / e, "lr": 0.1,
               "metrics": {"val": {"accuracy": acc, "loss": 1.0},
                           "test": {"accuracy": acc - 1, "loss": 1.0}}}
              for e, acc in ((1, 50.0), (2, 70.0), (3, 60.0))]
    record = {"epochs": epochs, "clean_epoch": 2, "clean_val": 70.0, "clean_test": 69.0,
              "paper_epoch": 2, "paper_test": 69.0}
    assert selection_difference(Spec, record) == (0.0, "")
    worst, where = selection_difference(Spec, dict(record, clean_epoch=3, clean_test=59.0))
    assert worst > 0 and where.startswith("selection clean_")
