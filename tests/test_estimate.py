"""Time before running: the steps --dry-run times are taken as the runner takes them, cached
under the code that runs them, and a busy machine is named while it times them."""
from __future__ import annotations

import json

import pytest

from harness import estimate
from harness import suite as suite_mod

SUITE = """
name: est
seeds: 1
epochs: 2
batch_size: 32
store: {store}
tasks:
  blobs: {{archs: [cnn], params: {{n_train: 256, n_test: 64}}}}
algorithms:
  bp: {{}}
"""


def _spec(write_suite, tmp_path):
    return suite_mod.load(write_suite(SUITE.format(store=tmp_path / "e.sqlite"), "est")).specs[0]


def test_timed_steps_lay_conv_tensors_out_as_the_runner_does(write_suite, tmp_path,
                                                           monkeypatch):
    """A rule that asks for channels-last conv tensors is timed with them (timed in the
    contiguous layout, the paper CNN's steps ran 2× slower than its runs)."""
    from harness import nets
    real, calls = nets.prefer_channels_last, []

    def recording(*args):
        calls.append(args)
        return real(*args)
    monkeypatch.setattr(nets, "prefer_channels_last", recording)
    seconds = estimate.timed_epoch(_spec(write_suite, tmp_path), str(tmp_path), 1)
    assert seconds > 0 and len(calls) == 1


def test_timings_are_cached_under_the_code_that_ran_them(write_suite, tmp_path, monkeypatch):
    from harness import fingerprint
    from harness.registry import algorithms, tasks
    spec = _spec(write_suite, tmp_path)
    source = fingerprint.of_plugins(type(algorithms.get("bp")), type(tasks.get("blobs")))["source"]
    assert source in json.loads(estimate._cache_key(spec, 1))
    key = estimate._cache_key(spec, 1)
    monkeypatch.setattr(estimate, "_code", lambda s: "edited")
    assert estimate._cache_key(spec, 1) != key            # older code's timing is not reused


def test_a_busy_machine_is_named_while_steps_are_timed(write_suite, tmp_path, monkeypatch):
    monkeypatch.setattr(estimate, "CACHE_FILE", tmp_path / "cache" / "epoch_times.json")
    monkeypatch.setattr(estimate.os, "getloadavg", lambda: (7.5, 7.0, 6.0))
    monkeypatch.setattr(estimate.os, "cpu_count", lambda: 2)
    lines: list[str] = []
    found = estimate.estimate([_spec(write_suite, tmp_path)], tmp_path / "none.sqlite",
                              str(tmp_path), 1, log=lines.append)
    assert lines[0].startswith("note: the machine is busy (load 7.5 on 2 cores)")
    assert [e.source for e in found.values()] == ["timed"]
    monkeypatch.setattr(estimate.os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert estimate._busy() is None


def test_a_busy_machines_timing_is_taken_again_on_a_quiet_one(write_suite, tmp_path,
                                                             monkeypatch):
    """Steps timed under load are cached as such and timed again by the first dry run on a
    quiet machine; a quiet figure is kept whatever the load later."""
    monkeypatch.setattr(estimate, "CACHE_FILE", tmp_path / "cache" / "epoch_times.json")
    monkeypatch.setattr(estimate.os, "cpu_count", lambda: 2)
    timings = iter([20.0, 10.0, 99.0])
    monkeypatch.setattr(estimate, "timed_epoch", lambda spec, data_dir, threads: next(timings))
    spec = _spec(write_suite, tmp_path)

    def epoch_s(load):
        monkeypatch.setattr(estimate.os, "getloadavg", lambda: (load, load, load))
        found = estimate.estimate([spec], tmp_path / "none.sqlite", str(tmp_path), 1)
        return next(iter(found.values())).epoch_s
    assert epoch_s(4.0) == 20.0                      # timed under load
    assert epoch_s(4.0) == 20.0                      # still busy: the busy figure stands
    assert epoch_s(0.1) == 10.0                      # quiet: timed again
    assert epoch_s(4.0) == 10.0 and epoch_s(0.1) == 10.0   # the quiet figure is kept
    cached = json.loads(estimate.CACHE_FILE.read_text())
    assert list(cached.values()) == [{"seconds": 10.0, "busy": False}]
    assert estimate._cached(12.5) == (12.5, True)    # written before the flag: timed again


def test_a_dry_run_cut_short_keeps_the_cells_it_timed(write_suite, tmp_path, monkeypatch):
    """Each timed cell is cached as soon as it is timed: a dry run stopped in the next cell
    (Ctrl-C, a time limit) does not lose it, and the next dry run does not time it again."""
    monkeypatch.setattr(estimate, "CACHE_FILE", tmp_path / "cache" / "epoch_times.json")
    monkeypatch.setattr(estimate.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    first = _spec(write_suite, tmp_path)
    second = suite_mod.load(write_suite(SUITE.format(store=tmp_path / "e.sqlite").replace(
        "bp: {}", "fa: {}"), "est2")).specs[0]
    calls = []

    def timed(spec, data_dir, threads):
        calls.append(spec.algorithm)
        if spec.algorithm == "fa":
            raise KeyboardInterrupt
        return 3.0
    monkeypatch.setattr(estimate, "timed_epoch", timed)
    with pytest.raises(KeyboardInterrupt):
        estimate.estimate([first, second], tmp_path / "none.sqlite", str(tmp_path), 1)
    cached = json.loads(estimate.CACHE_FILE.read_text())
    assert list(cached.values()) == [{"seconds": 3.0, "busy": False}]
    calls.clear()
    found = estimate.estimate([first], tmp_path / "none.sqlite", str(tmp_path), 1)
    assert calls == [] and next(iter(found.values())).epoch_s == 3.0


def test_a_busy_figure_stands_where_timing_again_fails(write_suite, tmp_path, monkeypatch):
    monkeypatch.setattr(estimate, "CACHE_FILE", tmp_path / "cache" / "epoch_times.json")
    monkeypatch.setattr(estimate.os, "cpu_count", lambda: 2)
    spec = _spec(write_suite, tmp_path)
    estimate._write_cache({estimate._cache_key(spec, 1): {"seconds": 20.0, "busy": True}})

    def fails(spec, data_dir, threads):
        raise OSError("the data went away")
    monkeypatch.setattr(estimate, "timed_epoch", fails)
    lines: list[str] = []
    monkeypatch.setattr(estimate.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    found = estimate.estimate([spec], tmp_path / "none.sqlite", str(tmp_path), 1,
                              log=lines.append)
    assert [(e.epoch_s, e.source) for e in found.values()] == [(20.0, "timed")]
    assert any("could not time it: OSError" in line for line in lines)
    monkeypatch.setattr(estimate.os, "getloadavg", lambda: (4.0, 4.0, 4.0))   # still busy:
    lines.clear()                                                              # said so
    estimate.estimate([spec], tmp_path / "none.sqlite", str(tmp_path), 1, log=lines.append)
    assert lines == ["note: 1 run(s) are estimated from steps timed on a busy machine (slower "
                     "than alone); a dry run on a quiet machine times them again"]


def test_estimate_accuracy_compares_the_dry_run_with_the_runs(blob_suite, cli, tmp_path,
                                                              monkeypatch, capfd):
    """benchmarks/estimate_accuracy.py: per cell, the timed estimate beside the runs' real
    time, and their ratio over all cells; a store that is not there is one line, exit 2."""
    import importlib.util
    import sys

    from conftest import ROOT
    path = blob_suite(seeds=2, epochs=2)
    status, _, err = cli("run", path, "--no-progress", "--no-report", "--device", "cpu")
    assert status == 0, err
    spec = importlib.util.spec_from_file_location(
        "estimate_accuracy", ROOT / "benchmarks" / "estimate_accuracy.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(estimate, "CACHE_FILE", tmp_path / "cache" / "epoch_times.json")
    monkeypatch.setattr(estimate, "timed_epoch", lambda spec, data_dir, threads: 0.5)
    monkeypatch.setattr(estimate.os, "getloadavg", lambda: (0.1, 0.1, 0.1))   # quiet here
    monkeypatch.setattr(sys, "argv", ["estimate_accuracy.py", str(path)])
    capfd.readouterr()
    assert script.main() == 0
    out = capfd.readouterr().out
    import sqlite3
    with sqlite3.connect(tmp_path / "blobsuite.sqlite") as conn:
        taken = conn.execute("SELECT SUM(train_time_s + eval_time_s) FROM epochs").fetchone()[0]
    row = next(line for line in out.splitlines() if line.startswith("bp "))
    assert row.split()[1:3] == ["blobs/mlp", "2"]
    assert float(row.split()[-3]) == round(2 * 0.5 / 60, 2)     # 2 epochs of the timed 0.5 s
    assert float(row.split()[-2]) == pytest.approx(2.0 / taken, abs=0.006)   # 2 runs × 1 s
    assert row.split()[-1] == row.split()[-2]       # one cell: no other to calibrate it
    assert "1 calibrated" not in out and "1 with fewer than 2 others" in out
    assert f"2 s estimated, {estimate.human(taken)} taken: {2.0 / taken:.2f}x" in out
    monkeypatch.setattr(sys, "argv", ["estimate_accuracy.py", str(path), "--device", "cuda"])
    assert script.main() == 2
    assert "no finished cuda run" in capfd.readouterr().err
    monkeypatch.setattr(sys, "argv", ["estimate_accuracy.py", str(path),
                                      "--store", str(tmp_path / "none.sqlite")])
    assert script.main() == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "none.sqlite: no such store" in err


def test_the_calibration_factor_is_the_median_of_the_architectures_cells():
    pairs = {("a",): ("mlp", 1.5), ("b",): ("mlp", 2.5), ("c",): ("mlp", 9.0),
             ("d",): ("rnn", 3.0)}
    assert estimate.factor(pairs, "mlp") == (2.5, 3, "own")
    assert estimate.factor(pairs, "mlp", leave_out=("c",)) == (2.0, 2, "own")
    # one rnn cell: pooled, each architecture's median counting once (not 3 mlp cells to 1)
    assert estimate.factor(pairs, "rnn") == (2.75, 4, "pooled")
    assert estimate.factor(pairs, "cnn", leave_out=("b",)) == (4.125, 3, "pooled")
    assert estimate.factor({("d",): ("rnn", 3.0)}, "rnn") == (1.0, 0, "")   # too few: none
    assert estimate.factor(pairs, "rnn", leave_out=("d",)) == (2.5, 3, "pooled")


def _three_rules(blob_suite, cli, run: str):
    path = blob_suite(algorithms="  bp: {lr: 0.01}\n  fa: {lr: 0.01}\n  dfa: {lr: 0.01}",
                      epochs=3)
    status, _, err = cli("run", path, "--no-progress", "--no-report", "--device", "cpu",
                         "--threads", "1", "--only", f"algorithm={run}")
    assert status == 0, err
    suite = suite_mod.load(path, device="cpu")
    return path, suite, {s.algorithm: s for s in suite.specs}


def test_timed_figures_are_calibrated_by_the_stores_recorded_epochs(blob_suite, cli, tmp_path,
                                                                    monkeypatch):
    """A cell with nothing stored is estimated from its timed steps × the median recorded ÷
    timed epoch of the suite's stored cells; a figure timed on a busy machine is scaled only
    by pairs timed busy too (an entry from before the flag is a pair of neither kind), and the
    dry run says the factor."""
    _, suite, specs = _three_rules(blob_suite, cli, "bp,fa")
    _, _, by_setting = estimate.stored_epoch_times(suite.store_path)

    def recorded(name):
        return by_setting[(*estimate._cell(specs[name]), "cpu", 1)]
    monkeypatch.setattr(estimate, "CACHE_FILE", tmp_path / "cache" / "epoch_times.json")
    estimate._write_cache({   # recorded ÷ timed: 2 for bp, 4 for fa → × 3
        estimate._cache_key(specs["bp"], 1): {"seconds": recorded("bp") / 2, "busy": False},
        estimate._cache_key(specs["fa"], 1): {"seconds": recorded("fa") / 4, "busy": False}})
    monkeypatch.setattr(estimate, "timed_epoch", lambda spec, data_dir, threads: 0.5)
    monkeypatch.setattr(estimate.os, "cpu_count", lambda: 2)

    def dfa(load, reference, threads=1):
        monkeypatch.setattr(estimate.os, "getloadavg", lambda: (load, load, load))
        lines: list[str] = []
        found = estimate.estimate([specs["dfa"]], suite.store_path, str(tmp_path), threads,
                                  log=lines.append, reference=reference)
        return found[specs["dfa"].key()], lines
    busy, lines = dfa(4.0, suite.specs)             # timed under load: no busy pairs to scale it
    assert (busy.epoch_s, busy.factor, busy.busy) == (0.5, 1.0, True)
    assert lines[0].startswith("note: the machine is busy")
    assert not any(line.startswith("note: 1 run(s)") for line in lines)   # said once, above
    quiet, lines = dfa(0.1, suite.specs)            # timed again, quiet: × 3
    assert quiet.epoch_s == pytest.approx(1.5) and quiet.factor == pytest.approx(3.0)
    assert quiet.seconds == pytest.approx(4.5) and not quiet.busy
    assert ("timed steps calibrated by the store's recorded ÷ timed epochs: × 3.00 for mlp "
            "(the median over 2 mlp cells with stored epochs and a quiet timing here at 1 "
            "thread(s))") in lines
    alone, lines = dfa(0.1, [])                     # no reference: the figure as timed
    assert alone.epoch_s == 0.5 and not any("calibrated" in line for line in lines)
    # fa's timing taken on a busy machine: one pair left, too few — and the dry run says why
    estimate._write_cache({**estimate._read_cache(), estimate._cache_key(specs["fa"], 1): {
        "seconds": recorded("fa") / 4, "busy": True}})
    few, lines = dfa(0.1, suite.specs)
    assert few.epoch_s == 0.5 and few.factor == 1.0
    assert ("timed steps not calibrated: 2 of the suite's cells have stored epochs at 1 "
            "thread(s), but fewer than 2 have a quiet timing of the current code here "
            "(benchmarks/estimate_accuracy.py times them)") in lines
    # bp's timing too taken under load: two busy pairs (× 3) calibrate a busy figure, not a
    # quiet one
    cache = estimate._read_cache()
    cache[estimate._cache_key(specs["bp"], 1)]["busy"] = True
    del cache[estimate._cache_key(specs["dfa"], 1)]
    estimate._write_cache(cache)
    loaded, lines = dfa(4.0, suite.specs)
    assert (loaded.epoch_s, loaded.busy) == (pytest.approx(1.5), True)
    assert any("× 3.00 for mlp, timed on a busy machine (the median over 2 mlp cells with "
               "stored epochs and a busy machine's timing here" in line for line in lines)
    cache = estimate._read_cache()
    del cache[estimate._cache_key(specs["dfa"], 1)]
    estimate._write_cache(cache)
    quiet_again, _ = dfa(0.1, suite.specs)          # a quiet figure: no quiet pair left
    assert (quiet_again.epoch_s, quiet_again.factor) == (0.5, 1.0)
    # bp's entry written before the flag (a bare number): no busy pair of two, so the busy
    # figure stands unscaled, and the note says why
    cache = estimate._read_cache()
    cache[estimate._cache_key(specs["bp"], 1)] = recorded("bp") / 2
    del cache[estimate._cache_key(specs["dfa"], 1)]
    estimate._write_cache(cache)
    legacy, lines = dfa(4.0, suite.specs)
    assert (legacy.epoch_s, legacy.factor) == (0.5, 1.0)
    legacy, lines = dfa(4.0, suite.specs)           # the cached busy figure stands, and says
    assert any("not calibrated: fewer than 2 stored cells have a busy machine's timing" in line
               for line in lines)
    # runs stored at 1 thread calibrate nothing at 2 (and a fresh store says nothing)
    other, lines = dfa(0.1, suite.specs, threads=2)
    assert other.factor == 1.0 and not any("calibrated" in line for line in lines)


def test_estimate_accuracy_calibrates_each_cell_by_the_others(blob_suite, cli, tmp_path,
                                                              monkeypatch, capfd):
    """The benchmark's calibrated column: each cell's timed estimate × the median recorded ÷
    timed epoch of the two other cells (never its own)."""
    import importlib.util
    import sqlite3
    import sys

    from conftest import ROOT
    path, suite, specs = _three_rules(blob_suite, cli, "bp,fa,dfa")
    timed = {"bp": 0.5, "fa": 0.25, "dfa": 1.0}
    monkeypatch.setattr(estimate, "CACHE_FILE", tmp_path / "cache" / "epoch_times.json")
    monkeypatch.setattr(estimate, "timed_epoch", lambda spec, d, t: timed[spec.algorithm])
    monkeypatch.setattr(estimate.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    _, _, by_setting = estimate.stored_epoch_times(suite.store_path)
    ratio = {a: by_setting[(*estimate._cell(specs[a]), "cpu", 1)] / timed[a] for a in timed}
    with sqlite3.connect(suite.store_path) as conn:
        actual = dict(conn.execute("SELECT r.algorithm, SUM(e.train_time_s + e.eval_time_s) "
                                   "FROM epochs e JOIN runs r ON r.key = e.run_key "
                                   "GROUP BY r.algorithm").fetchall())
    spec = importlib.util.spec_from_file_location(
        "estimate_accuracy", ROOT / "benchmarks" / "estimate_accuracy.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", ["estimate_accuracy.py", str(path)])
    capfd.readouterr()
    assert script.main() == 0
    out = capfd.readouterr().out
    for name in timed:
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        others = [ratio[a] for a in timed if a != name]
        guess = timed[name] * 3                           # 3 epochs of the timed figure
        assert float(row.split()[-2]) == pytest.approx(guess / actual[name], abs=0.006)
        calibrated = guess * sum(others) / 2 / actual[name]    # the median of two: their mean
        assert float(row.split()[-1]) == pytest.approx(calibrated, abs=0.006)
    assert ("cells: 3 calibrated by the others, 0 with fewer than 2 others to calibrate them "
            "(not scaled); 0 timed on a busy machine") in out


def test_stale_runs_do_not_estimate_the_current_code(blob_suite, cli, tmp_path, monkeypatch):
    """Stored epochs of runs made with other source are not the current code's speed (a rule
    made 2× faster was estimated at its old speed): the cell is timed instead."""
    from harness import fingerprint
    _, suite, specs = _three_rules(blob_suite, cli, "bp")
    spec = specs["bp"]
    current = fingerprint.current_source()
    assert estimate.stored_epoch_times(suite.store_path, current)[0]          # current: kept
    assert estimate.stored_epoch_times(suite.store_path, lambda a, t: "edited") == ({}, {}, {})
    assert estimate.stored_epoch_times(suite.store_path, lambda a, t: None)[0]   # unknown: kept
    monkeypatch.setattr(estimate, "CACHE_FILE", tmp_path / "cache" / "epoch_times.json")
    monkeypatch.setattr(estimate, "timed_epoch", lambda spec, data_dir, threads: 0.25)
    monkeypatch.setattr(estimate.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    found = estimate.estimate([spec], suite.store_path, str(tmp_path), 1)[spec.key()]
    assert found.source == "stored"
    monkeypatch.setattr(fingerprint, "current_source", lambda *a: (lambda alg, task: "edited"))
    found = estimate.estimate([spec], suite.store_path, str(tmp_path), 1)[spec.key()]
    assert found.source == "timed" and found.epoch_s == 0.25
