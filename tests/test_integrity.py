"""Results that cannot be silently wrong: typed suites (duplicate keys, grids in overrides,
hostile files), run identity (versions in the key, stale source, a plugin that shadows another),
stores that refuse what is not theirs, and statuses that mean what they say."""
from __future__ import annotations

import os
import random
import re
import sqlite3
import textwrap
import time
from pathlib import Path

import pytest

from harness import store
from harness import suite as suite_mod
from harness.api import UserError

ROOT = Path(__file__).resolve().parent.parent
TEST_PLUGINS = Path(__file__).resolve().parent / "plugins"
BASE = "tasks: {blobs: {archs: [mlp], params: {n_train: 128, n_test: 64}}}\n"


def _one_line_exit_2(cli, path, command="validate"):
    started = time.monotonic()
    status, out, err = cli(command, path) if command == "validate" else cli(
        command, path, "--device", "cpu", "--dry-run")
    assert time.monotonic() - started < 5
    assert status == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(path) in lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------
# Typed suites
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    (BASE + "algorithms: {bp: {lr: 0.1}}\nepochs: 2\nepochs: 3\n", "duplicate key 'epochs'"),
    (BASE + "algorithms:\n  bp: {lr: 0.1}\n  bp: {lr: 0.2}\n", "duplicate key 'bp'"),
    (BASE + "algorithms: {bp: {lr: 0.1, lr: 0.2}}\n", "duplicate key 'lr'"),
    ("x: &a [1, 2]\ny: *a\n" + BASE + "algorithms: {bp: {}}\n", "anchors and aliases"),
    (BASE + "algorithms: {bp: {}}\n1: 2\n", "is not a name"),
    (BASE + "algorithms: {bp: {}}\n? [a, b]\n: 3\n", "is not a name"),
    (BASE + "algorithms: {bp: {}}\nextra: !!python/object/apply:os.system [echo hi]\n",
     "not valid YAML"),
    ("", "the file is empty"),
])
def test_hostile_and_ambiguous_suites_are_one_line(write_suite, cli, text, expected):
    line = _one_line_exit_2(cli, write_suite(text, "bad"))
    assert expected in line, line


def test_files_that_are_not_yaml_text_are_one_line(cli, tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    assert "binary file" in _one_line_exit_2(cli, binary)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in _one_line_exit_2(cli, latin)
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    assert "is a directory" in _one_line_exit_2(cli, folder)
    huge = tmp_path / "huge.yaml"
    huge.write_text("name: x\n" + "#" * (300 * 1024) + "\n")
    assert "at most 256 KB" in _one_line_exit_2(cli, huge)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    _one_line_exit_2(cli, deep)
    laughs = tmp_path / "laughs.yaml"     # the "billion laughs": aliases nested ten deep
    laughs.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n"
        for i in range(9)))
    assert "anchors and aliases" in _one_line_exit_2(cli, laughs)


def test_a_corpus_of_mutated_suites_is_refused_cleanly(cli, tmp_path):
    """Every byte-level mutation of a real suite either validates or is one line, exit 2."""
    source = (ROOT / "suites" / "quick.yaml").read_bytes()
    rng = random.Random(0)
    for i in range(60):
        raw = bytearray(source)
        for _ in range(rng.randint(1, 6)):
            position = rng.randrange(len(raw))
            choice = rng.random()
            if choice < 0.4:
                raw[position] = rng.choice(b"{}[]:,&*!|>-'\"\t\n#%@` 0123456789abcxyz\xff\x00")
            elif choice < 0.7:
                del raw[position:position + rng.randint(1, 40)]
            else:
                raw[position:position] = raw[rng.randrange(len(raw)):][:rng.randint(1, 40)]
        path = tmp_path / f"mutant{i}.yaml"
        path.write_bytes(bytes(raw))
        status, out, err = cli("validate", path)
        assert status in (0, 2), (i, err)
        assert "Traceback" not in err, (i, err)
        if status == 2:
            assert len(err.strip().splitlines()) == 1, (i, err)


def test_a_list_in_an_override_shows_in_the_row_label(write_suite):
    suite = suite_mod.load(write_suite(BASE + textwrap.dedent("""
        algorithms: {bp: {lr: 0.01}, fa: {}}
        overrides:
          - {match: {algorithm: bp}, params: {lr: [1.0e-2, 1.0e-3]}}
    """)))
    labels = sorted({s.label for s in suite.specs})
    assert labels == ["bp (lr=0.001)", "bp (lr=0.01)", "fa"]
    by_label = {s.label: dict(s.params)["lr"] for s in suite.specs}
    assert by_label["bp (lr=0.001)"] == 1e-3 and by_label["bp (lr=0.01)"] == 1e-2


def test_an_override_can_settle_an_entry_grid_on_one_task(write_suite):
    suite = suite_mod.load(write_suite(textwrap.dedent("""
        tasks:
          blobs: {archs: [mlp]}
          other: {task: blobs, archs: [mlp], params: {noise: 0.5}}
        algorithms: {bp: {lr: [0.1, 0.01]}}
        overrides: [{match: {task: other}, params: {lr: 0.05}}]
    """)))
    cells = sorted((s.task_label, s.label) for s in suite.specs)
    assert cells == [("blobs", "bp (lr=0.01)"), ("blobs", "bp (lr=0.1)"),
                     ("other", "bp (lr=0.05)")]


def test_versions_are_in_the_run_key(write_suite, monkeypatch):
    from harness.registry import algorithms
    path = write_suite(BASE + "algorithms: {bp: {}}\n")
    before = suite_mod.load(path).specs[0]
    monkeypatch.setattr(type(algorithms.get("bp")), "version", 99)
    after = suite_mod.load(path).specs[0]
    assert after.algorithm_version == 99 and after.key() != before.key()


def test_a_plugin_registering_a_taken_name_is_an_error(tmp_path, cli):
    folder = tmp_path / "shadow" / "algorithms"
    folder.mkdir(parents=True)
    (folder / "bp.py").write_text(textwrap.dedent('''
        """A plugin that tries to replace the built-in bp, with the same class name."""
        from algorithms.bp import BPParams
        from harness.api import Algorithm
        from harness.registry import algorithms


        @algorithms.register("bp")
        class Backprop(Algorithm):
            """Not backprop at all."""
            supports = frozenset({"mlp"})
            Params = BPParams
    '''))
    status, _, err = cli("list", "--plugins", tmp_path / "shadow")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "algorithm 'bp' is registered twice: by algorithms/bp.py and by" in err
    assert "shadow/algorithms/bp.py" in err


def test_a_plugin_edited_after_its_import_keeps_the_digest_it_was_imported_with(tmp_path):
    """A run records the code its process imported: a plugin file edited while a suite runs
    (a worker imported the old one) does not lend the new digest to the old code's runs."""
    import sys

    from harness import fingerprint, registry
    folder = tmp_path / "lateplug"
    folder.mkdir()
    source = folder / "late_edit.py"
    source.write_text("VALUE = 1\n")
    registry._import_folder(folder, None, registry.algorithms)
    name = "bench_plugin_lateplug_late_edit"
    assert name in sys.modules
    probe = type("Probe", (), {"__module__": name})
    before = fingerprint.plugin_digest(probe)
    source.write_text("VALUE = 2\n")
    assert fingerprint.digest(fingerprint.module_files(source)) != before   # the file changed
    assert fingerprint.plugin_digest(probe) == before                       # the code did not


def test_an_edited_plugin_makes_its_stored_runs_stale(tmp_path, cli, write_suite):
    """Runs of a plugin whose code changed are reported stale by --dry-run and the report,
    and --rerun-stale runs them again; a docstring edit is not a change."""
    folder = tmp_path / "mine" / "algorithms"
    folder.mkdir(parents=True)
    plugin = folder / "editable.py"
    from conftest import EDITABLE_PLUGIN as body
    plugin.write_text(body.format(name="editable_s", init="params.init_std"))
    path = write_suite(BASE + f"store: {tmp_path / 'st.sqlite'}\nepochs: 1\nseeds: 2\n"
                       "algorithms: {editable_s: {}}\n", "st")
    args = ("--device", "cpu", "--plugins", tmp_path / "mine")
    status, out, err = cli("run", path, "--no-progress", "--no-report", *args)
    assert status == 0 and "ok 2" in out, err
    _, out, _ = cli("run", path, "--dry-run", *args)
    assert "stale" not in out
    # a different program in a new process (the one that imported the plugin keeps the old)
    import subprocess
    import sys
    plugin.write_text(body.format(name="editable_s", init="params.init_std * 1.0")
                      .replace("as written", "as edited"))
    run = [sys.executable, str(ROOT / "bench.py"), "run", str(path), "--device", "cpu",
           "--plugins", str(tmp_path / "mine"), "--plugins", str(TEST_PLUGINS)]
    done = subprocess.run(run + ["--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert "2 stored run(s) were made with source other than the current code" in done.stdout
    assert done.stdout.count("stored (stale)") == 2
    shown = subprocess.run([sys.executable, str(ROOT / "bench.py"), "report", str(path),
                            "--out", str(tmp_path / "before"), *run[-4:]],
                           capture_output=True, text=True, cwd=ROOT)
    again = subprocess.run([sys.executable, str(ROOT / "bench.py"), "report",     # and from
                            str(tmp_path / "before" / "st" / "runs.jsonl"),        # its data
                            "--out", str(tmp_path / "again"), *run[-4:]],
                           capture_output=True, text=True, cwd=ROOT)
    for out_dir, done_report in (("before", shown), ("again", again)):
        assert done_report.returncode == 0, done_report.stderr
        text = (tmp_path / out_dir / "st" / "report.md").read_text()
        assert "**2 of these runs were made with older code (stale)**: editable_s on " in text
        results = text.split("## Results (clean protocol)")[1].split("##")[0]
        assert len(re.findall(r" § (?:✗ )?\|", results)) == 1   # its cell, marked in the table
    done = subprocess.run(run + ["--no-progress", "--rerun-stale"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode == 0 and "ok 2" in done.stdout, done.stderr
    report = (tmp_path / "reports" / "st" / "report.md").read_text()
    assert report.count("| editable_s  | blobs  |") == 1        # one source: the edited one
    assert " § " not in report.split("## Results (clean protocol)")[1].split("##")[0]
    done = subprocess.run(run + ["--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert "stale" not in done.stdout


# --------------------------------------------------------------------------------------------
# Stores that refuse what is not theirs
# --------------------------------------------------------------------------------------------

def test_a_foreign_sqlite_file_is_refused_and_never_modified(blob_suite, cli, tmp_path):
    foreign = tmp_path / "blobsuite.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER, total REAL)")
        conn.execute("INSERT INTO invoices VALUES (1, 9.5)")
    before = (foreign.read_bytes(), foreign.stat().st_mtime_ns, sorted(os.listdir(tmp_path)))
    path = blob_suite()
    for command in (("run", path, "--device", "cpu", "--no-progress"), ("report", path),
                    ("merge", path, foreign), ("report", foreign)):
        status, _, err = cli(*command)
        assert status == 2 and len(err.strip().splitlines()) == 1, (command, err)
        assert "another program" in err or "cannot merge a store into itself" in err, err
    after = (foreign.read_bytes(), foreign.stat().st_mtime_ns,
             sorted(p for p in os.listdir(tmp_path) if p != "blobsuite.yaml"))
    assert before[0] == after[0] and before[1] == after[1]
    assert [p for p in after[2] if "sqlite" in p] == ["blobsuite.sqlite"]


def test_a_corrupt_store_is_one_line(blob_suite, cli, tmp_path):
    path = blob_suite()
    target = tmp_path / "blobsuite.sqlite"
    status, _, _ = cli("run", path, "--device", "cpu", "--no-progress", "--no-report")
    assert status == 0
    raw = bytearray(target.read_bytes())
    raw[200:4000] = os.urandom(3800)      # the schema page, overwritten
    target.write_bytes(bytes(raw))
    for command in (("report", path), ("run", path, "--device", "cpu", "--no-progress")):
        status, _, err = cli(*command)
        assert status == 2 and len(err.strip().splitlines()) == 1, err
        assert str(target) in err and "Traceback" not in err
    target.write_text("not sqlite at all, a text file")
    status, _, err = cli("report", path)
    assert status == 2 and "not an SQLite database" in err


def test_read_only_results_folder_and_unwritable_reports(blob_suite, cli, tmp_path,
                                                         monkeypatch, read_only, write_suite):
    path = blob_suite(name="ro")
    status, _, _ = cli("run", path, "--device", "cpu", "--no-progress", "--no-report")
    assert status == 0
    frozen = read_only(tmp_path)
    moved = write_suite((frozen / "ro.yaml").read_text().replace(str(tmp_path), str(frozen)),
                        "ro_moved")
    status, _, err = cli("run", moved, "--device", "cpu", "--no-progress", "--rerun")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "read-only" in err and "--store" in err
    monkeypatch.chdir(tmp_path)           # a store on a read-only medium can still be reported
    out_dir = tmp_path / "out"
    status, out, err = cli("report", frozen / "ro.sqlite", "--out", out_dir)
    assert status == 0, err
    status, _, err = cli("report", frozen / "ro.sqlite", "--out", frozen / "reports")
    assert status == 2 and "cannot write the report" in err and "--out" in err


def test_merge_is_idempotent_and_refuses_another_suites_store(blob_suite, cli, tmp_path):
    path = blob_suite("  bp: {lr: 0.01}", seeds=2, epochs=1, name="mine")
    other = blob_suite("  bp: {lr: 0.02}", seeds=1, epochs=1, name="theirs")
    part = tmp_path / "part.sqlite"
    cli("run", path, "--device", "cpu", "--no-progress", "--no-report", "--only", "seed=0")
    cli("run", path, "--device", "cpu", "--no-progress", "--no-report", "--only", "seed=1",
        "--store", part)
    cli("run", other, "--device", "cpu", "--no-progress", "--no-report")
    target = load_store_path = suite_mod.load(path).store_path
    for attempt in range(2):
        status, out, err = cli("merge", path, part)
        assert status == 0, err
        assert ("1 runs copied" if attempt == 0 else "0 runs copied, 1 already") in out
    frames = store.load(target)
    assert len(frames.runs) == 2 and len(frames.sessions) == 2     # no session added twice
    status, _, err = cli("merge", path, tmp_path / "theirs.sqlite")
    assert status == 2 and "runs of suite 'theirs', not 'mine'" in err and "--force" in err
    assert len(store.load(load_store_path).runs) == 2
    status, out, _ = cli("merge", path, tmp_path / "theirs.sqlite", "--force")
    assert status == 0 and "1 runs copied" in out


def test_committed_run_data_rebuilds_the_store_and_the_report(blob_suite, cli, tmp_path,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = blob_suite("  bp: {lr: 0.01}\n  raises: {}", seeds=2, epochs=2, name="kept")
    status, out, _ = cli("run", path, "--device", "cpu", "--no-progress")
    assert status == 0
    data = tmp_path / "reports" / "kept" / "runs.jsonl"
    text = data.read_text()                             # no machine path in committed data:
    assert str(ROOT) not in text and "tests/plugins/" in text    # the failing run's traceback
    assert '"command": "' in text
    from harness.exchange import without_machine_paths
    assert without_machine_paths("run --store /srv/x/p.sqlite --data-dir=/d/data a/b") == \
        "run --store …/p.sqlite --data-dir=…/data a/b"
    once = without_machine_paths('File "/usr/lib/x.py": sum(v)/len(v) from https://h.org/a/b')
    assert once == 'File "…/x.py": sum(v)/len(v) from https://h.org/a/b'
    assert without_machine_paths(once) == once              # shortened text is left alone
    report = (tmp_path / "reports" / "kept" / "report.md").read_text()
    lines = data.read_text().splitlines()
    assert '"format": "plausible-bench-runs"' in lines[0]
    import json
    keys = [json.loads(l)["run"]["key"] for l in lines if l.startswith('{"run"')]
    assert len(keys) == 4 and keys == sorted(keys)
    (tmp_path / "kept.sqlite").unlink()
    status, out, err = cli("report", data)            # the report from the data alone
    assert status == 0, err
    again = (tmp_path / "reports" / "kept" / "report.md").read_text()
    assert again.split("## Environment")[0].split("regenerate")[1].split("\n", 1)[1] == \
        report.split("## Environment")[0].split("regenerate")[1].split("\n", 1)[1]
    status, out, err = cli("merge", path, data)       # and back into a store
    assert status == 0 and "4 runs copied" in out
    status, out, _ = cli("run", path, "--device", "cpu", "--no-progress", "--no-report")
    assert "already stored 4" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "plausible-bench-runs", "version": 1}\n{"run": {"key": 1}\n')
    status, _, err = cli("report", bad)
    assert status == 2 and "line 2 is not JSON" in err


# --------------------------------------------------------------------------------------------
# Statuses that mean what they say
# --------------------------------------------------------------------------------------------

def test_a_nan_secondary_metric_is_null_not_diverged(tmp_path):
    from harness import params as P
    from harness.api import RunContext, RunSpec
    from harness.registry import algorithms, tasks
    from harness.runner import execute
    task = tasks.get("blobs")
    task_params = P.resolve(task.Params, {"n_train": 128, "n_test": 64, "nan_secondary": True})
    spec = RunSpec(algorithm="bp", params=P.resolve(algorithms.get("bp").Params, {"lr": 0.01}),
                   task="blobs", task_params=task_params,
                   arch=task.presets(P.build(task.Params, task_params), RunContext())["mlp"], seed=0,
                   epochs=2, batch_size=32)
    result = execute(spec, str(tmp_path))
    assert result.status == "ok", result.reason
    assert all(e.metrics["test"]["majority_accuracy"] is None for e in result.epochs)
    assert all(e.metrics["test"]["accuracy"] > 0 for e in result.epochs)


def test_diverged_runs_are_never_best_and_labels_are_escaped(write_suite, cli, tmp_path,
                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_suite(BASE + textwrap.dedent(f"""
        name: esc
        store: {tmp_path / 'esc.sqlite'}
        epochs: 3
        batch_size: 16
        algorithms:
          "bp | <b>loud</b>": {{algorithm: bp, lr: 1.0e-6}}
          nan_after: {{nan_after: 10, lr: 0.05}}
    """), "esc")
    status, out, err = cli("run", path, "--device", "cpu", "--no-progress")
    assert status == 0, err
    runs = store.load(tmp_path / "esc.sqlite").runs
    assert set(runs.status) == {"ok", "diverged"}
    diverged = runs[runs.status == "diverged"].iloc[0]
    assert diverged.reason == "non-finite training loss nan at epoch 2"
    assert diverged.clean_test > runs[runs.status == "ok"].clean_test.max()   # it would win
    text = (tmp_path / "reports" / "esc" / "report.md").read_text()
    results = text.split("## Results (clean protocol)")[1].split("##")[0]
    nan_row = next(l for l in results.splitlines() if l.startswith("| nan_after"))
    assert "**" not in nan_row and "†" in nan_row
    assert "bp \\| &lt;b&gt;loud&lt;/b&gt;" in results and "<b>" not in text
    for line in results.strip().splitlines()[2:]:
        assert line.count(" | ") + line.count("|") - line.count("\\|") >= 2
