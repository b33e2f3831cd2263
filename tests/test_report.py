"""Reports come from the store alone: tables with mean ± std, references and Δ, timing,
skipped/failed runs with reasons, the environment, and PNG plots."""
from __future__ import annotations

from harness import report
from harness.suite import load as load_suite

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


def test_report_from_store(write_suite, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_suite(SUITE.format(store=tmp_path / "rep.sqlite"), "rep")
    status, out, _ = cli("run", path, "--device", "cpu", "--no-progress")
    assert status == 0
    report_path = tmp_path / "reports" / "rep" / "report.md"
    assert "report: reports/rep/report.md" in out
    text = report_path.read_text()
    assert "## Results (clean protocol)" in text and "## Results (paper protocol)" in text
    assert "blobs/mlp accuracy ↑" in text
    assert "99.50 ± 0.10" in text and "made up for the test" in text
    bp_line = next(l for l in text.splitlines() if l.startswith("| bp ") and "(2)" in l)
    assert "±" in bp_line and "**" in bp_line
    assert "## Time per epoch and memory" in text and "1.00×" in text
    assert "does not support cnn" in text           # the skipped run, with its reason
    assert "deliberate failure" in text             # the failed run, with its reason
    assert "## Environment" in text and "torch" in text
    assert "## Every test metric at the clean protocol's epoch" in text
    metrics_part = text.split("## Every test metric")[1].split("## Time per epoch")[0]
    assert "**blobs/mlp**" in metrics_part and "majority_accuracy" in metrics_part
    assert "32.81 ± 0.00 (2)" in metrics_part
    for png in ("curves.png", "metric_vs_time.png", "time_ratio.png"):
        data = (report_path.parent / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({png})" in text

    # regenerate from the store alone: same tables
    (report_path.parent / "report.md").unlink()
    status, out, _ = cli("report", path)
    assert status == 0
    assert report_path.read_text().split("## Environment")[0] == text.split("## Environment")[0]


def test_report_numbers_match_the_store(write_suite, cli, tmp_path, monkeypatch):
    from harness import store
    monkeypatch.chdir(tmp_path)
    path = write_suite(SUITE.format(store=tmp_path / "rep2.sqlite"), "rep2")
    cli("run", path, "--device", "cpu", "--no-progress", "--no-report")
    runs = store.load(tmp_path / "rep2.sqlite").runs
    ok = runs[(runs.label == "bp") & (runs.arch == "mlp")]
    expected = f"{ok.clean_test.mean():.2f} ± {ok.clean_test.std(ddof=1):.2f} (2)"
    table = report.results_table(load_suite(path), runs, "clean")
    assert expected in table


def test_validation_table_bolds_each_plugins_best_validation_mean(write_suite, cli, tmp_path,
                                                                  monkeypatch):
    from harness import store
    monkeypatch.chdir(tmp_path)
    path = write_suite(f"""
name: sweep
seeds: 2
epochs: 2
batch_size: 32
store: {tmp_path / 'sweep.sqlite'}
tasks:
  blobs: {{archs: [mlp], params: {{n_train: 256, n_test: 128}}}}
algorithms:
  bp: {{lr: [0.05, 1.0e-5]}}
  raises: {{}}
""", "sweep")
    cli("run", path, "--device", "cpu", "--no-progress", "--no-report")
    runs = store.load(tmp_path / "sweep.sqlite").runs
    means = runs[runs.status == "ok"].groupby("label").clean_val.mean()
    assert means.nunique() == 2                       # the two learning rates differ
    table = report.validation_table(load_suite(path), runs)
    bold = [line for line in table.splitlines() if "**" in line]
    assert len(bold) == 1 and f"**{means.idxmax()}**" in bold[0]
    worse = next(line for line in table.splitlines() if means.idxmin() in line)
    assert "**" not in worse and f"{means.min():.2f}" in worse
    assert "raises" not in table                      # failed runs select nothing
    single = runs[runs.label != means.idxmin()]       # one configuration left: nothing chosen
    assert report.validation_table(load_suite(path), single) is None
