"""Equal tuning budgets: a tune: suite gives every rule the same number of trials (Optuna,
seeded), each an ordinary stored run selected on validation, then its chosen settings with
the suite's seeds; tuning resumes like any run, and the report draws a curve per rule."""
from __future__ import annotations

import json

import pytest

from harness import suite as suite_mod

SUITE = """
name: tuned
store: {store}
seeds: 2
epochs: 2
tune:
  trials: 4
  epochs: 1
  seeds: [0]
  space:
    lr: {{log_uniform: [1.0e-3, 3.0e-2]}}
tasks:
  blobs: {{archs: [mlp], params: {{n_train: 256, n_test: 64}}}}
algorithms:
  bp: {{}}
  fa: {{}}
"""


def test_every_rule_gets_the_same_trials_then_its_final_runs(write_suite, cli, tmp_path,
                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_suite(SUITE.format(store=tmp_path / "t.sqlite"), "tuned")
    status, out, err = cli("run", path, "--device", "cpu", "--no-progress", "--jobs", "2")
    assert status == 0 and "ok 12" in out, err           # 2 rules × (4 trials + 2 seeds)
    lines = (tmp_path / "reports" / "tuned" / "runs.jsonl").read_text().splitlines()
    plan = json.loads(lines[0])["structure"]["plan"]
    trials = [p for p in plan if p.get("role") == "trial"]
    finals = [p for p in plan if p.get("role") == "final"]
    for row in ("bp", "fa"):
        assert len([p for p in trials if p["label"].startswith(row + " · trial")]) == 4
        assert sorted(p["seed"] for p in finals if p["label"] == row) == [0, 1]
    assert len({p["params"]["lr"] for p in trials}) == 8      # sampled, not a fixed grid
    report = (tmp_path / "reports" / "tuned" / "report.md").read_text()
    tuning = report.split("## Tuning")[1].split("\n## ")[0]
    assert "| bp " in tuning and "| fa " in tuning and "4 of 4" in tuning
    assert "](tuning.png)" in report and (tmp_path / "reports" / "tuned" / "tuning.png").exists()
    chosen = {p["label"]: p["params"]["lr"] for p in finals}
    runs = [json.loads(l)["run"] for l in lines if l.startswith('{"run"')]
    for row in ("bp", "fa"):                    # the final runs use the best trial's settings
        mine = [r for r in runs if any(p["key"] == r["key"] and p["label"].startswith(row + " ·")
                                       for p in trials)]
        top = max(mine, key=lambda r: r["clean_val"])
        assert chosen[row] in {r["params"]["lr"] for r in mine
                               if r["clean_val"] == top["clean_val"]}
    status, out, _ = cli("run", path, "--device", "cpu", "--no-progress", "--no-report")
    assert status == 0 and "already stored 12" in out and "ok 0" in out   # resumes: same trials
    status, out, err = cli("run", path, "--device", "cpu", "--dry-run")
    assert status == 0 and ("the last run's plan (recorded in the store) has 12 trial and final "
                            "runs, 12 of them stored") in out, out
    status, out, err = cli("report", path)      # from the YAML: the plan its run recorded
    assert status == 0, err
    again = (tmp_path / "reports" / "tuned" / "report.md").read_text()
    assert "12 of 12 planned runs stored" in again and "## Tuning" in again


@pytest.mark.parametrize("block,expected", [
    ("tune: {trials: 0, space: {lr: {uniform: [0.1, 0.2]}}}", "tune.trials"),
    ("tune: {trials: 2, space: {lr: {normal: [0.1, 0.2]}}}", "unknown distribution 'normal'"),
    ("tune: {trials: 2, space: {lr: {log_uniform: [0, 0.1]}}}", "low > 0"),
    ("tune: {trials: 2, space: {lr: {uniform: [-1, 0.1]}}}", "below the minimum"),
    ("tune: {trials: 2, space: {colour: {choice: [red]}}}", "no parameter of the space"),
    ("tune: {trials: 2, sampler: grid, space: {lr: {uniform: [0.1, 0.2]}}}", "tune.sampler"),
    ("tune: {trials: 2, space: {lr: {uniform: [0.1, 0.2]}}, space_per_algorithm: {xx: {}}}",
     "unknown algorithm 'xx'"),
])
def test_bad_tune_blocks_are_one_line(write_suite, cli, block, expected):
    path = write_suite(block + "\ntasks: {blobs: {}}\nalgorithms: {bp: {}}\n", "badtune")
    status, _, err = cli("validate", path)
    assert status == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


def test_dry_run_says_what_tuning_adds(write_suite, cli, tmp_path):
    path = write_suite(SUITE.format(store=tmp_path / "d.sqlite"), "tuned_dry")
    status, out, err = cli("run", path, "--device", "cpu", "--dry-run")
    assert status == 0, err
    assert "tune: first 2 studies × 4 trials × 1 seed(s) = 8 trial runs of 1 epochs" in out
    assert not (tmp_path / "d.sqlite").exists()                    # a dry run runs nothing


def test_include_defaults_makes_each_rules_own_settings_its_first_trial(write_suite, cli,
                                                                       tmp_path, monkeypatch):
    from harness.params import default_of, fields
    from harness.registry import algorithms
    monkeypatch.chdir(tmp_path)
    text = (SUITE.format(store=tmp_path / "own.sqlite")
            .replace("name: tuned", "name: tuned_own").replace("seeds: 2\n", "seeds: [1]\n")
            .replace("  trials: 4\n", "  trials: 3\n  include_defaults: true\n")
            .replace("  fa: {}", "  fa: {lr: 0.02}"))
    path = write_suite(text, "tuned_own")
    status, out, err = cli("run", path, "--device", "cpu", "--no-progress")
    assert status == 0 and "ok 8" in out, err            # 2 rules × (3 trials + 1 seed)
    lines = (tmp_path / "reports" / "tuned_own" / "runs.jsonl").read_text().splitlines()
    plan = json.loads(lines[0])["structure"]["plan"]
    first = {p["label"].split(" · ")[0]: p["params"]["lr"] for p in plan
             if p.get("role") == "trial" and p["trial"] == 0}
    bp_default = next(default_of(f) for f in fields(algorithms.get("bp").Params)
                      if f.name == "lr")
    assert first == {"bp": bp_default, "fa": 0.02}
    later = [p["params"]["lr"] for p in plan if p.get("role") == "trial" and p["trial"] > 0]
    assert len(later) == 4 and not set(later) & {bp_default, 0.02}     # then the sampler's
    report = (tmp_path / "reports" / "tuned_own" / "report.md").read_text()
    tuning = report.split("## Tuning")[1].split("\n## ")[0]
    assert "own settings" in tuning and "Trial 0 of every rule was its own settings" in tuning


@pytest.mark.parametrize("row,expected", [
    ("bp: {lr: 0.5}", "its lr 0.5 lies outside the space lr {uniform: [0.001, 0.2]}"),
    ("bp: {lr: [0.01, 0.02]}", "lr is a grid axis [0.01, 0.02]"),
])
def test_include_defaults_needs_own_settings_inside_the_space(write_suite, cli, row, expected):
    path = write_suite("tune: {trials: 2, include_defaults: true, space: {lr: {uniform: "
                       "[0.001, 0.2]}}}\ntasks: {blobs: {}}\nalgorithms: {" + row + "}\n",
                       "badown")
    status, _, err = cli("validate", path)
    assert status == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    assert "tune.include_defaults (bp)" in err


def test_a_tie_goes_to_the_earliest_trial():
    """A later trial that only matches the best does not displace it (with include_defaults,
    trial 0 is the row's own settings) and does not read as still improving."""
    from harness.tune import first_best
    assert first_best([(0, 85.1), (1, 82.8), (4, 85.1), (5, 85.1)], "max") == 0
    assert first_best([(0, 0.30), (1, 0.20), (2, 0.20)], "min") == 1
    assert first_best([(0, None), (1, 80.0), (2, 81.0)], "max") == 2
    assert first_best([(0, None)], "max") is None
