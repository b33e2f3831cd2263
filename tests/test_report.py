"""Reports come from the store alone — without the YAML, the plugins or torch — with a 95%
interval and n in every cell, "best" only where the seeds tell rows apart, differences to the
baseline, every figure drawing one rule in one colour, and skipped/failed runs by reason."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import store as store_mod
from harness.api import EpochRecord, RunResult, RunSpec, Selection, Status
from harness.report import Layout, render

ROOT = Path(__file__).resolve().parent.parent
SUITE = """
name: rep
seeds: 2
epochs: 3
batch_size: 32
store: {store}
tasks:
  blobs: {{archs: [mlp, cnn], params: {{n_train: 256, n_test: 128}}}}
algorithms:
  bp: {{lr: 0.01}}
  raises: {{}}
reference:
  source: "made up for the test"
  values: {{bp: {{blobs: {{mlp: [99.5, 0.1]}}}}}}
"""


def test_report_from_a_real_suite(write_suite, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_suite(SUITE.format(store=tmp_path / "rep.sqlite"), "rep")
    status, out, _ = cli("run", path, "--device", "cpu", "--no-progress")
    assert status == 0
    report_path = tmp_path / "reports" / "rep" / "report.md"
    assert "report: reports/rep/report.md" in out
    text = report_path.read_text()
    headline = text.split("## Results (clean protocol)")[1].split("\n## ")[0]
    assert "blobs/mlp accuracy ↑" in headline and "99.50 ± 0.10" in headline
    bp_line = next(l for l in headline.splitlines() if l.startswith("| bp "))
    assert "[" in bp_line and "(2)" in bp_line          # mean [95% CI] (n)
    assert text.index("## Results (clean protocol)") < text.index("## Results (paper protocol)")
    assert "## Time per epoch and memory" in text and "1.00×" in text
    problems = text.split("## Skipped, failed and diverged runs, by reason")[1].split("\n## ")[0]
    assert "does not support cnn" in problems and "deliberate failure" in problems
    assert problems.count("deliberate failure") == 1     # one row per reason, with its count
    assert "## Environment" in text and "## Settings" in text and "lr=0.01" in text
    metrics_part = text.split("## Every test metric")[1].split("\n## ")[0]
    assert "**blobs/mlp**" in metrics_part and "majority_accuracy" in metrics_part
    assert "32.81 [32.81, 32.81] (2)" in metrics_part
    for png in ("curves.png", "metric_vs_time.png", "time_ratio.png"):
        data = (report_path.parent / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({png})" in text
    assert not any(p in text for p in ("/work/", "/tmp/", "/root/", "/home/"))


def _fake_store(path: Path, values: dict[str, list[float]], times: dict[str, float],
                logs: tuple = ()):
    """A store of synthetic finished runs: row → test accuracies by seed (clean protocol);
    the rows in ``logs`` return a scalar (``inverse_loss``) from their training steps."""
    from harness import params as P
    from harness.registry import algorithms, tasks
    task = tasks.get("blobs")
    task_params = P.resolve(task.Params, {})
    from harness.api import RunContext
    arch = task.presets(P.build(task.Params, task_params), RunContext())["mlp"]
    specs = []
    for row, (label, accs) in enumerate(values.items()):
        params = P.resolve(algorithms.get("bp").Params, {"lr": 0.01 * (row + 1)})  # one key each
        for seed, _ in enumerate(accs):
            specs.append(RunSpec(algorithm="bp", params=params, task="blobs",
                                 task_params=task_params, arch=arch, seed=seed, epochs=3,
                                 batch_size=32, label=label, task_label="blobs", suite="fake"))
    structure = {"name": "fake", "path": "suites/fake.yaml", "description": "", "protocol":
                 "clean", "baseline": "bp", "seeds": [0, 1, 2, 3], "epochs": 3,
                 "batch_size": 32, "validation": 0.1, "patience": None,
                 "rows": [{"label": r, "algorithm": "bp"} for r in values],
                 "columns": [{"task": "blobs", "arch": "mlp"}],
                 "tasks": {"blobs": {"task": "blobs", "metrics": [["accuracy", "max"]],
                                     "params": {}}},
                 "references": [], "reference_source": "",
                 "plan": [{"key": s.key(), "label": s.label, "algorithm": "bp", "task": "blobs",
                           "arch": "mlp", "seed": s.seed, "epochs": 3, "batch_size": 32,
                           "params": dict(s.params), "skip_reason": None} for s in specs]}
    with store_mod.Store(path) as store:
        store.record_suite("fake", structure)
        for spec in specs:
            acc = values[spec.label][spec.seed]
            epochs = [EpochRecord(e, times[spec.label], 0.1, 1.0 / e,
                                  {"val": {"accuracy": acc - 3 + e}, "test": {"accuracy": acc - 3 + e},
                                   **({"train": {"inverse_loss": 5.0 / e}}
                                      if spec.label in logs else {})},
                                  lr=0.01, warmup=e == 1) for e in (1, 2, 3)]
            store.save(RunResult(spec=spec, status=Status.OK, epochs=epochs,
                                 selection=Selection("accuracy", "max", 3, acc, acc, 3, acc),
                                 fingerprint={"source": "x"}), None)
    return Layout.of(structure)


def test_best_only_where_seeds_tell_rows_apart(tmp_path):
    layout = _fake_store(tmp_path / "f.sqlite", {
        "bp": [98.1, 98.3, 98.2, 98.0],
        "close": [98.2, 98.1, 98.3, 98.0],      # overlaps bp: never told apart
        "gap": [96.0, 96.1, 95.9, 96.05],       # a real gap below
        "single": [98.9]},                      # one seed: no test, never best
        {"bp": 1.0, "close": 1.2, "gap": 2.0, "single": 1.0})
    with store_mod.Store(tmp_path / "f.sqlite", readonly=True) as store:
        runs = store_mod.frames(store).runs
    table = render.results_table(layout, runs, "clean")
    line = {l.split("|")[1].strip(): l for l in table.splitlines()[2:]}
    assert "**" not in table                                  # nobody is distinguishable best
    for tied in ("bp", "close"):
        assert f"| *{tied}" not in line[tied] and "*98" in line[tied], line[tied]  # italic: tied
    assert "*" not in line["gap"].split("|")[2]               # the gap is not tied for best
    assert "*" not in line["single"].split("|")[2]            # one seed: never marked
    diffs = render.differences_table(layout, runs, "clean")
    gap = next(l for l in diffs.splitlines() if l.startswith("| gap"))
    close = next(l for l in diffs.splitlines() if l.startswith("| close"))
    assert "paired, 4" in gap and " *" in gap                 # significant after Holm
    assert "paired, 4" in close and " *" not in close
    ok = {"bp": [99.0, 99.05, 98.95, 99.02], "worse": [97.0, 97.05, 96.95, 97.02]}
    layout2 = _fake_store(tmp_path / "g.sqlite", ok, {"bp": 1.0, "worse": 1.0})
    with store_mod.Store(tmp_path / "g.sqlite", readonly=True) as store:
        runs2 = store_mod.frames(store).runs
    table2 = render.results_table(layout2, runs2, "clean")
    assert "| bp" in table2 and "**99.00" in table2           # a real gap: best, in bold
    # a row with one seed as good as bp's seeds: bp is only tied, with two rows or three (the
    # single seed stays unmarked); one far below them: bp stays bold
    for name, rows in (("h", {**ok, "single": [99.0]}), ("i", {"bp": ok["bp"], "single": [99.0]}),
                       ("j", {**ok, "single": [90.0]})):
        layout3 = _fake_store(tmp_path / f"{name}.sqlite", rows, {r: 1.0 for r in rows})
        with store_mod.Store(tmp_path / f"{name}.sqlite", readonly=True) as store:
            runs3 = store_mod.frames(store).runs
        line = {l.split("|")[1].strip(): l for l in
                render.results_table(layout3, runs3, "clean").splitlines()[2:]}
        if name == "j":
            assert "**99.00" in line["bp"], line["bp"]
        else:
            assert "**" not in line["bp"] and "*99.00" in line["bp"], (name, line["bp"])
        assert all("*" not in line[r].split("|")[2] for r in rows if r != "bp")


def test_report_needs_neither_the_plugins_nor_torch(write_suite, cli, tmp_path, monkeypatch):
    """The committed data alone, in a process where the plugin folders are moved away and torch
    cannot be imported, gives the same report."""
    monkeypatch.chdir(tmp_path)
    path = write_suite(SUITE.format(store=tmp_path / "np.sqlite").replace("name: rep",
                                                                           "name: noplug"), "np")
    cli("run", path, "--device", "cpu", "--no-progress")
    data = tmp_path / "reports" / "noplug" / "runs.jsonl"
    before = (tmp_path / "reports" / "noplug" / "report.md").read_text()
    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in ("bench.py", "harness"):
        subprocess.run(["cp", "-r", str(ROOT / name), str(copy / name)], check=True)
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is not installed here')\n")
    env = dict(os.environ, PYTHONPATH=str(blocker))
    done = subprocess.run([sys.executable, str(copy / "bench.py"), "report", str(data),
                           "--out", str(tmp_path / "again")], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    after = (tmp_path / "again" / "noplug" / "report.md").read_text()
    strip = lambda t: t.split("regenerate with")[1].split("\n", 1)[1].split("## Environment")[0]
    assert strip(after) == strip(before)
    assert not (copy / "algorithms").exists()


def test_every_figure_draws_a_rule_in_one_colour(tmp_path):
    """Read the plotted artists: a row's lines have one colour in every panel of every figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from harness.report import plots
    layout = _fake_store(tmp_path / "c.sqlite", {
        "bp": [98.1, 98.3, 98.2], "close": [98.2, 98.1, 98.3], "gap": [96.0, 96.1, 95.9]},
        {"bp": 1.0, "close": 1.3, "gap": 2.0})
    with store_mod.Store(tmp_path / "c.sqlite", readonly=True) as store:
        frames = store_mod.frames(store)
    colours = plots.palette(layout.row_order)
    assert len({to_hex(c) for c in colours.values()}) == 3
    drawn: dict[str, set] = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def capture(fig, *args, **kwargs):
        for ax in fig.axes:
            for line in ax.get_lines():
                hexed = to_hex(line.get_color())
                if hexed in {to_hex(c) for c in colours.values()}:
                    drawn.setdefault(fig.number if hasattr(fig, "number") else id(fig),
                                     set()).add(hexed)
        return real_savefig(fig, *args, **kwargs)
    matplotlib.figure.Figure.savefig = capture
    try:
        made = plots.learning_curves(layout, frames.epochs, tmp_path, colours)
        made += plots.metric_vs_time(layout, frames.epochs, tmp_path, colours)
    finally:
        matplotlib.figure.Figure.savefig = real_savefig
        plt.close("all")
    assert len(made) == 2 and drawn
    wanted = {to_hex(c) for c in colours.values()}
    for colours_in_figure in drawn.values():
        assert colours_in_figure == wanted       # every rule drawn, each in its own colour


def test_a_panel_whose_errors_span_orders_of_magnitude_is_drawn_on_a_log_axis():
    """One row's diverged error (300 beside the others' 0.02) would flatten every other line to
    zero on a linear axis; accuracies, values with a zero or below, and an infinity beside
    values of one magnitude stay linear."""
    from math import inf

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from harness.report import plots
    fig, axes = plt.subplots(1, 4)
    try:
        cases = [[0.02, 0.05, 310.0], [0.5, 99.1, 99.5], [0.0, 0.05, 310.0], [0.5, 0.4, inf]]
        errors = [True, False, True, True]                 # the second: an accuracy
        drawn = [plots._log_if_wide(ax, pd.Series(v, dtype=float), e)
                 for ax, v, e in zip(axes, cases, errors)]
        assert drawn == [True, False, False, False]
        assert [ax.get_yscale() for ax in axes] == ["log", "linear", "linear", "linear"]
        assert plots._wide(pd.Series([0.5, 99.1, 99.5]))  # wide, but an accuracy: linear
    finally:
        plt.close(fig)


def _shifted_copy(source: Path, target: Path, row: str, shift: float) -> None:
    """The same runs with one row's test accuracy moved by ``shift`` (a rule made worse)."""
    import json
    lines = source.read_text().splitlines()
    out = []
    for line in lines:
        obj = json.loads(line)
        run = obj.get("run")
        if run and run["label"] == row and run["status"] == "ok":
            for key in ("clean_test", "paper_test"):
                run[key] = run[key] + shift
        out.append(json.dumps(obj))
    target.write_text("\n".join(out) + "\n")


def test_show_export_and_compare(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout = _fake_store(tmp_path / "s.sqlite", {
        "bp": [98.1, 98.3, 98.2, 98.0], "close": [98.2, 98.1, 98.3, 98.05]},
        {"bp": 1.0, "close": 1.2})
    status, out, err = cli("report", tmp_path / "s.sqlite", "--out", tmp_path / "reports")
    assert status == 0, err
    data = tmp_path / "reports" / "fake" / "runs.jsonl"
    status, out, _ = cli("show", data)
    assert status == 0 and "| bp" in out and "[" in out and "(4)" in out
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- headline:fake -->\nOLD TABLE\n<!-- /headline:fake -->\nend\n")
    status, out, _ = cli("show", data, "--into", readme)
    text = readme.read_text()
    assert status == 0 and "OLD TABLE" not in text and "| close" in text and text.endswith("end\n")
    assert "clean protocol (the test metric at the best-validation epoch)" in text
    assert "– no result" in text and "not told apart from the best" in text
    assert "Not shown" not in text                  # its one column has runs
    status, out, _ = cli("show", data, "--into", readme)
    assert status == 0 and "already up to date" in out and readme.read_text() == text
    import json
    lines = data.read_text().splitlines()           # a planned column nothing has run in yet
    first = json.loads(lines[0])
    first["structure"]["columns"].append({"task": "blobs", "arch": "cnn"})
    wider = tmp_path / "wider.jsonl"
    wider.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    status, out, _ = cli("show", wider)
    assert status == 0 and "Not shown, no finished run yet" in out and ": blobs/cnn;" in out
    status, out, _ = cli("export", data, "--format", "csv", "--out", tmp_path / "csv")
    import pandas as pd
    runs = pd.read_csv(tmp_path / "csv" / "runs.csv")
    epochs = pd.read_csv(tmp_path / "csv" / "epochs.csv")
    assert status == 0 and len(runs) == 8 and len(epochs) == 24 and "test_accuracy" in epochs
    status, _, err = cli("export", data, "--format", "xls", "--out", tmp_path / "x")
    assert status == 2 and "csv, parquet, json" in err
    status, out, _ = cli("compare", data, data)
    assert status == 0 and "REGRESSION" not in out             # itself: nothing changed
    worse = tmp_path / "worse.jsonl"
    _shifted_copy(data, worse, "close", -2.0)
    status, out, err = cli("compare", data, worse, "--threshold", "0.5")
    assert status == 1 and "REGRESSION" in out and "significantly worse" in err
    assert next(l for l in out.splitlines() if l.startswith("| close")).endswith("REGRESSION |")
    import json
    broken = tmp_path / "broken.jsonl"               # every seed of one rule diverged in B
    broken.write_text("".join(
        json.dumps({"run": dict(json.loads(l)["run"], status="diverged")}) + "\n"
        if l.startswith('{"run"') and json.loads(l)["run"]["label"] == "close" else l + "\n"
        for l in data.read_text().splitlines()))
    status, out, err = cli("compare", data, broken)
    assert status == 1 and "close on blobs/mlp has no ok run in B (diverged 4)" in out, out
    other = tmp_path / "other.jsonl"                 # another suite's data: refused, or --force
    other.write_text(data.read_text().replace('"name": "fake"', '"name": "other"')
                     .replace('"suite": "fake"', '"suite": "other"'))
    status, _, err = cli("compare", data, other)
    assert status == 2 and "holds suite 'fake'" in err and "--force" in err
    status, out, _ = cli("compare", data, other, "--force")
    assert status == 0 and "| close" in out
    status, out, _ = cli("compare", data, worse, "--threshold", "3")   # beyond what moved
    assert status == 0


def test_time_to_target(write_suite, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_suite(f"""
        name: ttt
        store: {tmp_path / 'ttt.sqlite'}
        seeds: 2
        epochs: 3
        tasks:
          blobs: {{archs: [mlp], params: {{n_train: 256, n_test: 64}}, target: 90}}
        algorithms: {{bp: {{lr: 0.01}}, slow: {{algorithm: bp, lr: 1.0e-7}}}}
    """, "ttt")
    status, _, err = cli("run", path, "--device", "cpu", "--no-progress")
    assert status == 0, err
    text = (tmp_path / "reports" / "ttt" / "report.md").read_text()
    part = text.split("## Time to target")[1].split("\n## ")[0]
    bp = next(l for l in part.splitlines() if l.startswith("| bp"))
    slow = next(l for l in part.splitlines() if l.startswith("| slow"))
    assert "2 of 2" in bp and "not reached (0 of 2)" in slow
    status, _, err = cli("validate", write_suite(
        "tasks: {blobs: {target: high}}\nalgorithms: {bp: {}}\n", "badttt"))
    assert status == 2 and "tasks.blobs.target" in err


def test_stale_cells_count_tuning_trials_once_per_run():
    """A tuning trial of older code is stale too (a selection may rest on it); a run that is
    both a trial and a final run counts once; unknown or recorded-by-supervisor sources do
    not count."""
    import pandas as pd
    from harness.report import stale_cells
    runs = pd.DataFrame([
        # key, role, label, algorithm, task plugin, task label, arch, status, source
        ("k1", "trial", "fa", "fa", "mnist", "mnist", "mlp", "ok", "old"),
        ("k1", "", "fa", "fa", "mnist", "mnist", "mlp", "ok", "old"),
        ("k2", "trial", "dfa · trial 3", "dfa", "mnist", "mnist", "mlp", "ok", "old"),
        ("k3", "", "bp", "bp", "mnist", "mnist", "mlp", "ok", "new"),
        ("k4", "", "bp", "bp", "mnist", "mnist", "mlp", "killed", None),
        ("k5", "", "mine", "mine", "mnist", "mnist", "mlp", "ok", "old"),
        ("k6", "", "fa", "fa", "mnist", "mnist", "mlp", "skipped", "old"),
    ], columns=["key", "role", "label", "algorithm", "task", "task_label", "arch", "status",
                "source"])
    current = {"fa": "new", "dfa": "new", "bp": "new"}
    count, cells = stale_cells(runs, lambda algorithm, task: current.get(algorithm))
    assert count == 2
    assert cells == ["dfa (tuning) on mnist/mlp", "fa (tuning) on mnist/mlp", "fa on mnist/mlp"]
    assert stale_cells(runs, None) == (0, [])


def test_a_rule_keeps_its_colour_across_reports():
    """bp and dtp are drawn in the same colour in a two-row report as in the paper table's
    eight; a row of a rule's plugin under another label has the rule's colour when it is the
    rule's only row; other rows get colours no present rule has."""
    from matplotlib.colors import to_hex

    from harness.report import plots

    def hexed(rows, algorithms=None):
        return {r: to_hex(c) for r, c in plots.palette(rows, algorithms).items()}
    table = hexed(["bp", "dll", "dll-released", "dll_fa", "fa", "dfa", "pc", "dtp"])
    pair = hexed(["dtp", "bp"])
    assert pair == {"dtp": table["dtp"], "bp": table["bp"]}
    tuned = hexed(["bp", "fa (tuned)"], {"bp": "bp", "fa (tuned)": "fa"})
    assert tuned["fa (tuned)"] == table["fa"]
    two_pc = hexed(["pc-one-step", "pc-fixed", "bp"], {"pc-one-step": "pc", "pc-fixed": "pc",
                                                        "bp": "bp"})
    assert table["pc"] not in (two_pc["pc-one-step"], two_pc["pc-fixed"])
    assert len(set(two_pc.values())) == 3
    mixed = hexed(["mine", "bp", "theirs", "dtp"])
    assert len(set(mixed.values())) == 4 and mixed["bp"] == table["bp"]
    assert mixed["mine"] not in table.values()           # olive and cyan before a rule's
    many = hexed([f"r{i}" for i in range(14)] + ["bp"])
    assert len(set(many.values())) == 15 and many["bp"] == table["bp"]


def test_logged_scalars_show_only_the_rules_that_log(tmp_path):
    """The logged-scalars figure has a line, and a legend entry, for the rule that logs and
    none for the rules that do not; a store where no rule logs has no such figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from harness.report import plots
    layout = _fake_store(tmp_path / "l.sqlite", {"bp": [98.0, 98.1], "gap": [96.0, 96.2]},
                         {"bp": 1.0, "gap": 1.5}, logs=("gap",))
    with store_mod.Store(tmp_path / "l.sqlite", readonly=True) as store:
        frames = store_mod.frames(store)
    colours = plots.palette(layout.row_order)
    seen = []
    real_savefig = matplotlib.figure.Figure.savefig

    def capture(fig, *args, **kwargs):
        seen.append(([len(ax.get_lines()) for ax in fig.axes],
                     [t.get_text() for legend in fig.legends for t in legend.get_texts()]))
        return real_savefig(fig, *args, **kwargs)
    matplotlib.figure.Figure.savefig = capture
    try:
        made = plots.logged(layout, frames.epochs, tmp_path, colours)
    finally:
        matplotlib.figure.Figure.savefig = real_savefig
        plt.close("all")
    assert made == [("Logged scalars", "logged.png")]
    assert seen == [([1], ["gap"])]
    quiet = _fake_store(tmp_path / "q.sqlite", {"bp": [98.0, 98.1]}, {"bp": 1.0})
    with store_mod.Store(tmp_path / "q.sqlite", readonly=True) as store:
        assert plots.logged(quiet, store_mod.frames(store).epochs, tmp_path, colours) == []


def test_runs_note_their_cpu_share_and_the_report_shows_it(blob_suite, cli, tmp_path):
    """A run process notes the share of its cores it had (CPU seconds ÷ wall × threads) and
    the load as it ended; the time table shows the cell's median beside its timings."""
    import json
    import sqlite3
    path = blob_suite(seeds=2, epochs=2)
    status, _, err = cli("run", path, "--no-progress", "--no-report", "--device", "cpu",
                         "--threads", "1")
    assert status == 0, err
    with sqlite3.connect(tmp_path / "blobsuite.sqlite") as conn:
        notes = [json.loads(n) for (n,) in conn.execute("SELECT notes FROM runs")]
    assert len(notes) == 2
    for note in notes:
        assert 0.05 < note["cpu_share"] < 4.0 and note["load_per_core"] >= 0
    status, _, err = cli("report", path, "--out", tmp_path / "reports")
    assert status == 0, err
    lines = (tmp_path / "reports" / "blobsuite" / "report.md").read_text().splitlines()
    header = next(line for line in lines if "train s/epoch" in line)
    cells = [c.strip() for c in header.split("|")]
    column = cells.index("CPU share")
    row = next(line for line in lines[lines.index(header):] if line.startswith("| bp "))
    median = (notes[0]["cpu_share"] + notes[1]["cpu_share"]) / 2
    assert [c.strip() for c in row.split("|")][column] == f"{median:.2f}"


def test_missing_cells_name_their_command_and_fold_a_column_every_rule_misses():
    """Each missing cell comes with the command that runs exactly it; a column where every
    rule misses runs is one line with the column's command (a dataset this machine cannot
    have); a cell whose runs are all stored is not listed."""
    import pandas as pd

    from harness.report import coverage
    plan = [{"key": f"{row}-{task}-{seed}", "label": row, "task": task, "arch": "mlp",
             "seed": seed} for row in ("bp", "fa") for task in ("mnist", "svhn", "fmnist")
            for seed in (0, 1)]
    layout = Layout.of({"name": "m", "path": "suites/m.yaml", "rows": [
        {"label": "bp", "algorithm": "bp"}, {"label": "fa", "algorithm": "fa"}],
        "columns": [{"task": t, "arch": "mlp"} for t in ("mnist", "svhn", "fmnist")],
        "plan": plan})
    stored = ["bp-mnist-0", "bp-mnist-1", "fa-mnist-0", "bp-fmnist-0"]
    missing = coverage.missing_cells(layout, pd.DataFrame({"key": stored}))
    assert [(m.row, m.task, m.seeds) for m in missing] == [
        ("fa", "mnist", (1,)), ("bp", "svhn", (0, 1)), ("fa", "svhn", (0, 1)),
        ("bp", "fmnist", (1,)), ("fa", "fmnist", (0, 1))]
    assert missing[0].command == ("python bench.py suites/m.yaml --only algorithm=fa "
                                  "--only task=mnist --only arch=mlp --only seed=1")
    lines = coverage.grouped_missing(layout, missing)
    assert lines == [
        ("fa", "mnist/mlp", "1 of 2", missing[0].command),
        ("every rule (2)", "svhn/mlp", "4 of 4",
         "python bench.py suites/m.yaml --only task=svhn --only arch=mlp"),
        ("every rule (2)", "fmnist/mlp", "3 of 4",
         "python bench.py suites/m.yaml --only task=fmnist --only arch=mlp")]
    # a rule that tried a dataset this machine lacks (its runs stored as skipped) folds in too
    plan += [{"key": f"pc-svhn-{seed}", "label": "pc", "task": "svhn", "arch": "mlp",
              "seed": seed} for seed in (0, 1)]
    layout = Layout.of({"name": "m", "path": "suites/m.yaml", "rows": [
        {"label": r, "algorithm": r} for r in ("bp", "fa", "pc")],
        "columns": [{"task": t, "arch": "mlp"} for t in ("mnist", "svhn", "fmnist")],
        "plan": plan})
    runs = pd.DataFrame({"key": stored + ["pc-svhn-0", "pc-svhn-1"],
                         "status": ["ok"] * len(stored) + ["skipped", "skipped"]})
    missing = coverage.missing_cells(layout, runs)
    assert ("every rule (3)", "svhn/mlp", "4 of 6",
            "python bench.py suites/m.yaml --only task=svhn --only arch=mlp") in \
        coverage.grouped_missing(layout, missing, runs)
    runs.loc[runs["key"] == "pc-svhn-1", "status"] = "ok"      # a result: the cells stay apart
    assert [line[0] for line in coverage.grouped_missing(layout, missing, runs)
            if line[1] == "svhn/mlp"] == ["bp", "fa"]


def test_cpu_share_is_read_from_cpu_runs_that_finished_only(tmp_path):
    import json
    import sqlite3

    from harness.report import tables
    assert tables.cpu_share('{"cpu_share": 0.8}') == 0.8
    for bad in (None, "", "null", "[1]", "not json", '{"cpu_share": NaN}',
                '{"cpu_share": true}', '{"cpu_share": "0.8"}', "{}"):
        assert tables.cpu_share(bad) is None, bad
    layout = _fake_store(tmp_path / "s.sqlite", {"bp": [98.0, 98.1, 98.2, 98.3]},
                         {"bp": 1.0})
    with sqlite3.connect(tmp_path / "s.sqlite") as conn:
        keys = [k for (k,) in conn.execute("SELECT key FROM runs ORDER BY seed")]
        for key, share, device, status in zip(keys, (0.5, 0.7, 0.9, 0.95),
                                              ("cpu", "cpu", "cuda", "cpu"),
                                              ("ok", "ok", "ok", "error")):
            conn.execute("UPDATE runs SET notes = ?, device = ?, status = ? WHERE key = ?",
                         (json.dumps({"cpu_share": share}), device, status, key))
    with store_mod.Store(tmp_path / "s.sqlite", readonly=True) as store:
        frames = store_mod.frames(store)
    (timing,) = tables.timing(layout, frames.runs, frames.epochs)
    assert timing.cpu_share == 0.6            # the two CPU runs that finished: median


def test_time_ratios_are_like_for_like_or_say_why_not(tmp_path):
    """A run is divided by the baseline's runs made at its own torch threads (a baseline seed
    at two threads no longer halves every ratio); a ratio whose sides had their cores taken,
    whose load was not recorded, or that has no baseline at its threads, is marked ‡ with the
    reason beside the table."""
    import json
    import sqlite3

    from harness.report import render, tables
    layout = _fake_store(tmp_path / "t.sqlite", {"bp": [98.0, 98.1, 98.2, 98.3],
                                                 "fa": [97.0, 97.1, 97.2, 97.3]},
                         {"bp": 1.0, "fa": 1.5})
    with sqlite3.connect(tmp_path / "t.sqlite") as conn:
        runs = conn.execute("SELECT key, label, seed FROM runs").fetchall()
        for key, label, seed in runs:
            two = label == "bp" and seed == 3          # one bp seed at 2 threads, twice as fast
            conn.execute("UPDATE runs SET threads = ?, device = 'cpu', notes = ? WHERE key = ?",
                         (2 if two else 1, json.dumps({"cpu_share": 0.99}), key))
            if two:
                conn.execute("UPDATE epochs SET train_time_s = 0.5 WHERE run_key = ?", (key,))

    def timings():
        with store_mod.Store(tmp_path / "t.sqlite", readonly=True) as store:
            frames = store_mod.frames(store)
        return {t.row: t for t in tables.timing(layout, frames.runs, frames.epochs)}
    found = timings()
    assert found["fa"].ratio.mean == pytest.approx(1.5)        # ÷ bp's one-thread runs only
    assert found["fa"].unlike == () and found["bp"].unlike == ()
    assert "‡" not in render.timing_table(layout, list(found.values()))
    with sqlite3.connect(tmp_path / "t.sqlite") as conn:       # fa starved, then unrecorded
        conn.execute("UPDATE runs SET notes = ? WHERE label = 'fa'",
                     (json.dumps({"cpu_share": 0.6}),))
    found = timings()
    assert found["fa"].unlike == ("starved",) and found["bp"].unlike == ()
    table = render.timing_table(layout, list(found.values()))
    assert "1.50× [1.50, 1.50] ‡" in table and "other work slowed them: fa on blobs/mlp." in table
    with sqlite3.connect(tmp_path / "t.sqlite") as conn:
        conn.execute("UPDATE runs SET notes = '{}' WHERE label = 'fa'")
        conn.execute("UPDATE runs SET threads = 4 WHERE label = 'fa' AND seed = 0")
    found = timings()
    assert set(found["fa"].unlike) == {"threads", "unrecorded"}
    with sqlite3.connect(tmp_path / "t.sqlite") as conn:
        # fa at 2 threads is divided by bp's 2-thread seed alone: bp's starved one-thread
        # runs are not its divisors and do not mark it
        conn.execute("UPDATE runs SET threads = 2 WHERE label = 'fa'")
        conn.execute("UPDATE runs SET notes = ? WHERE label = 'bp' AND threads = 1",
                     (json.dumps({"cpu_share": 0.5}),))
    found = timings()
    assert found["fa"].unlike == () and found["fa"].ratio.mean == pytest.approx(3.0)


def test_rules_are_compared_across_the_cells_they_all_have():
    """A rule that ran only its easy cells is not ranked by them against rules that ran hard
    ones too: the comparison is over the common cells, each rule's own-cells IQM beside it,
    and the profile does not count a cell a rule lacks against it."""
    import pandas as pd

    from harness.report import tables
    rows = []
    for label, cells in (("bp", {"easy": 90.0, "hard": 50.0}),
                         ("good", {"easy": 90.0, "hard": 49.0}),
                         ("easy_only", {"easy": 89.0})):
        for task, value in cells.items():
            for seed in range(3):
                rows.append(dict(label=label, task_label=task, arch="mlp", seed=seed,
                                 status="ok", clean_test=value + 0.1 * seed))
    runs = pd.DataFrame(rows)
    layout = Layout.of({"name": "x", "baseline": "bp", "protocol": "clean",
                        "rows": [{"label": r, "algorithm": "bp"} for r in
                                 ("bp", "good", "easy_only")],
                        "columns": [{"task": t, "arch": "mlp"} for t in ("easy", "hard")],
                        "tasks": {t: {"task": "blobs", "metrics": [["accuracy", "max"]]}
                                  for t in ("easy", "hard")}, "plan": []})
    across = tables.aggregate(layout, runs, "clean")
    assert across.common == (("easy", "mlp"),)
    assert set(across.iqm_common) == {"bp", "good", "easy_only"}
    assert across.iqm_common["good"].iqm > across.iqm_common["easy_only"].iqm
    assert across.iqm_own["good"].n_cells == 2 and across.iqm_own["easy_only"].n_cells == 1
    assert across.profile is None                  # one common cell: no profile
    text = render.aggregate_table(layout, runs, "clean")
    assert "The cells every rule here has: easy/mlp." in text
    assert "IQM over all its cells" in text          # some rule has more: shown beside


def test_the_settings_say_where_each_override_comes_from(write_suite, cli, tmp_path,
                                                        monkeypatch):
    """An override's ``why`` is the report's answer to "where does this learning rate come
    from?": every override is listed with what it matched, what it set and why; a ``why``
    changes no run's key."""
    from harness import suite as suite_mod
    monkeypatch.chdir(tmp_path)
    text = """
        name: why
        seeds: 1
        epochs: 1
        batch_size: 64
        tasks: {blobs: {archs: [mlp], params: {n_train: 256, n_test: 128}}}
        algorithms: {bp: {}, fa: {}}
        overrides:
          - match: {algorithm: bp}
            params: {lr: 0.01}
            why: "the paper's rate, not searched"
          - {match: {algorithm: fa}, epochs: 2}
    """
    path = write_suite(text, "why")
    bare = write_suite(text.replace('            why: "the paper\'s rate, not searched"\n', ""),
                       "bare")
    assert [s.key() for s in suite_mod.load(path).specs] == \
        [s.key() for s in suite_mod.load(bare).specs]
    status, _, err = cli("run", path, "--device", "cpu", "--no-progress")
    assert status == 0, err
    report = (tmp_path / "reports" / "why" / "report.md").read_text()
    assert "| algorithm=bp   | lr=0.01  | the paper's rate, not searched |" in report
    assert "| algorithm=fa   | epochs=2 | –" in report
    again = tmp_path / "again"                    # and from the committed data alone
    status, _, err = cli("report", tmp_path / "reports" / "why" / "runs.jsonl", "--out", again)
    assert status == 0 and "the paper's rate, not searched" in (again / "why" / "report.md") \
        .read_text(), err


def test_a_cell_still_improving_when_its_budget_ended_says_so(tmp_path):
    """↗ where every seed selected the last epoch of its planned budget (the metric was still
    rising: the cell measures speed as much as reach); not where one seed peaked earlier."""
    import sqlite3

    from harness.report import frames_for, render, tables
    layout = _fake_store(tmp_path / "b.sqlite", {"bp": [98.0, 98.1, 98.2]}, {"bp": 1.0})

    def cell():
        with store_mod.Store(tmp_path / "b.sqlite", readonly=True) as store:
            runs = frames_for(store, layout).runs
        return tables.results(layout, runs, "clean")[("bp", "blobs", "mlp")]
    assert cell().at_budget and render.cell_text(cell(), "accuracy").endswith(" ↗")
    with sqlite3.connect(tmp_path / "b.sqlite") as conn:   # one seed peaked at epoch 2
        conn.execute("UPDATE runs SET clean_epoch = 2 WHERE seed = 1")
    assert not cell().at_budget and "↗" not in render.cell_text(cell(), "accuracy")


def test_a_tasks_reference_predictor_is_named_under_the_results():
    """A secondary test metric ``<predictor>_<primary>`` is the task's own reference predictor
    (the chars task's most frequent symbol, the forecast's persistence): listed per cell."""
    import pandas as pd

    from harness.report import tables
    layout = Layout.of({"name": "x", "protocol": "clean", "rows": [{"label": "bp",
                        "algorithm": "bp"}], "columns": [{"task": "chars", "arch": "rnn"},
                                                         {"task": "digits", "arch": "mlp"}],
                        "tasks": {"chars": {"task": "chars", "metrics": [["accuracy", "max"]]},
                                  "digits": {"task": "d", "metrics": [["accuracy", "max"]]}},
                        "plan": []})
    epochs = pd.DataFrame([dict(label="bp", task_label="chars", arch="rnn", status="ok",
                                test_accuracy=40.0, test_baseline_accuracy=15.9, test_bpc=2.0,
                                test_balanced_accuracy=38.0),       # a metric, not a predictor
                           dict(label="bp", task_label="digits", arch="mlp", status="ok",
                                test_accuracy=98.0, test_baseline_accuracy=None, test_bpc=None)])
    assert tables.reference_predictors(layout, epochs) == [
        ("chars", "rnn", "baseline_accuracy", 15.9)]


def test_a_cell_no_better_than_a_constant_predictor_is_marked_as_not_learning(tmp_path):
    """✗ where a row's mean does no better than the task's constant reference predictor (the
    most frequent symbol); never against persistence, which reads what a model may not see."""
    from harness.report import frames_for, render
    layout = _fake_store(tmp_path / "c.sqlite", {"bp": [60.0, 61.0, 62.0],
                                                 "stuck": [40.0, 41.0, 42.0]},
                         {"bp": 1.0, "stuck": 1.0})
    with store_mod.Store(tmp_path / "c.sqlite", readonly=True) as store:
        runs = frames_for(store, layout).runs

    def marked(predictors):
        table = render.results_table(layout, runs, "clean", predictors=predictors)
        return {line.split("|")[1].strip() for line in table.splitlines() if "✗" in line}
    assert marked([("blobs", "mlp", "baseline_accuracy", 50.0)]) == {"stuck"}
    assert marked([("blobs", "mlp", "baseline_accuracy", 61.0)]) == {"bp", "stuck"}  # ≤: no better
    assert marked([("blobs", "mlp", "persistence_accuracy", 50.0)]) == set()
    assert marked([]) == set()
    assert "✗" in render.MARKS


def test_a_rule_that_diverges_is_not_compared_over_fewer_cells():
    """Diverging on every seed of the hard cell does not drop the cell from the comparison:
    the cell stays common, its runs score 0 in the IQM and never within τ in the profile."""
    import pandas as pd

    from harness.report import tables
    rows = []
    for label, cells in (("bp", {"a": 90.0, "b": 80.0, "hard": 50.0}),
                         ("good", {"a": 89.0, "b": 79.0, "hard": 49.0}),
                         ("bad", {"a": 90.5, "b": 80.5, "hard": None})):
        for task, value in cells.items():
            for seed in range(3):
                rows.append(dict(label=label, task_label=task, arch="mlp", seed=seed,
                                 status="ok" if value else "diverged",
                                 clean_test=value + 0.1 * seed if value else None))
    layout = Layout.of({"name": "x", "baseline": "bp", "protocol": "clean",
                        "rows": [{"label": r, "algorithm": "bp"} for r in ("bp", "good", "bad")],
                        "columns": [{"task": t, "arch": "mlp"} for t in ("a", "b", "hard")],
                        "tasks": {t: {"task": "blobs", "metrics": [["accuracy", "max"]]}
                                  for t in ("a", "b", "hard")}, "plan": []})
    across = tables.aggregate(layout, pd.DataFrame(rows), "clean")
    assert across.common == (("a", "mlp"), ("b", "mlp"), ("hard", "mlp"))
    assert across.iqm_common["bad"].iqm < across.iqm_common["good"].iqm
    assert across.iqm_common["bad"].n_runs == 9                 # its 3 failures counted
    hard = across.profile.cells.index(("hard", "mlp"))
    assert across.profile.ratios["bad"][hard] == float("inf")


def test_a_failed_rules_curve_does_not_set_the_panels_scale():
    """A row far outside the others (Tukey's far-out fences over four or more rows) is left off
    the y axis, which fits the others, and the title says so; with three rows, or none far,
    the axis is matplotlib's own."""
    import pandas as pd
    from matplotlib.figure import Figure

    from harness.report import plots
    finals = {"bp": 98.4, "dll": 98.1, "fa": 98.0, "pc": 98.3, "released": 60.0}
    assert plots._far_rows(finals) == ["released"]
    assert plots._far_rows({k: finals[k] for k in ("bp", "dll", "released")}) == []
    assert plots._far_rows({k: v for k, v in finals.items() if k != "released"}) == []
    group = pd.DataFrame([dict(label=row, epoch=e, acc=value - (3 - e)) for row, value in
                          finals.items() for e in (1, 2, 3)])
    ax = Figure().subplots()
    assert plots._fit_to(ax, group, "acc", ["released"], list(finals)) == \
        " (released off the axis)"
    low, high = ax.get_ylim()
    assert 95.0 - 0.5 < low < 96.0 and 98.4 < high < 98.6      # the others, padded
    assert plots._fit_to(ax, group, "acc", [], list(finals)) == ""
    ax = Figure().subplots()                     # by the runs' last epochs, as the panels do
    group["run_key"] = group["label"]
    assert plots._off_axis(ax, group, "acc", list(finals)) == " (released off the axis)"
