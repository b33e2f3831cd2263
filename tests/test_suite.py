"""Suites: expansion of grids, seeds, overrides, excludes, references; every kind of mistake
gives one line naming the file and the key, exit status 2, no traceback."""
from __future__ import annotations

import pytest

from harness import suite as suite_mod

GOOD = """
name: grid
seeds: [0, 1]
epochs: 4
batch_size: 32
tasks:
  blobs:
    archs: [mlp, cnn]
    params: {n_train: 128}
algorithms:
  bp: {lr: [1e-2, 1e-3], optimizer: adam}
  bp-sgd: {algorithm: bp, optimizer: sgd, lr: 0.1}
overrides:
  - {match: {algorithm: bp-sgd, arch: cnn}, params: {lr: 0.05}, batch_size: 16, epochs: 2}
exclude:
  - {algorithm: bp-sgd, arch: mlp, seed: 1}
reference:
  source: test
  values: {bp: {blobs: {mlp: [90.0, 1.0], cnn: 91}}, bp-sgd: {blobs: {mlp: [88.5, null]}}}
"""


def test_expansion(write_suite):
    suite = suite_mod.load(write_suite(GOOD))
    # bp: 2 lrs × 2 archs × 2 seeds = 8; bp-sgd: 2 archs × 2 seeds − 1 excluded = 3
    assert len(suite.specs) == 11
    labels = {s.label for s in suite.specs}
    assert labels == {"bp (lr=0.01)", "bp (lr=0.001)", "bp-sgd"}
    sgd_cnn = [s for s in suite.specs if s.label == "bp-sgd" and s.arch.name == "cnn"]
    assert all(dict(s.params)["lr"] == 0.05 and s.batch_size == 16 and s.epochs == 2
               for s in sgd_cnn)
    sgd_mlp = [s for s in suite.specs if s.label == "bp-sgd" and s.arch.name == "mlp"]
    assert [s.seed for s in sgd_mlp] == [0]
    assert all(dict(s.params)["optimizer"] == "sgd" for s in sgd_mlp)
    assert suite.references[("bp", "blobs", "cnn")] == (91.0, None)
    assert suite.references[("bp-sgd", "blobs", "mlp")] == (88.5, None)   # std not published
    assert len({s.key() for s in suite.specs}) == 11
    assert suite.store_path.name == "grid.sqlite"


def test_keys_are_stable_and_ignore_labels(write_suite):
    a = suite_mod.load(write_suite(GOOD, "a")).specs
    b = suite_mod.load(write_suite(GOOD.replace("bp-sgd", "sgd-row"), "b")).specs
    assert [s.key() for s in a] == [s.key() for s in b]


def test_unsupported_architecture_becomes_a_skipped_run(write_suite):
    suite = suite_mod.load(write_suite("""
        tasks: {blobs: {archs: [cnn]}}
        algorithms: {raises: {}}
    """))
    assert len(suite.specs) == 1
    assert "does not support cnn" in suite.specs[0].skip_reason


def test_custom_architecture(write_suite):
    suite = suite_mod.load(write_suite("""
        tasks:
          blobs:
            archs:
              tiny: {layers: [flatten, {dense: 8}, {dense: {units: 4, act: linear}}]}
        algorithms: {bp: {}}
    """))
    assert suite.specs[0].arch.describe() == "1x8x8 > flatten > dense8 > dense4(linear)"


BAD = [
    ("epochs: 0\ntasks: {blobs: {}}\nalgorithms: {bp: {}}", "epochs"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {lr: fast}}", "algorithms.bp.lr: must be a number"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {lr: -1}}", "below the minimum"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {optimiser: adam}}", "did you mean 'optimizer'"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {optimizer: lbfgs}}", "not one of adam"),
    ("tasks: {blobs: {}}\nalgorithms: {bpp: {}}", "unknown algorithm 'bpp' (did you mean 'bp'"),
    ("tasks: {blobz: {}}\nalgorithms: {bp: {}}", "unknown task 'blobz'"),
    ("tasks: {blobs: {archs: [mpl]}}\nalgorithms: {bp: {}}", "unknown architecture 'mpl'"),
    ("tasks: {blobs: {params: {n_train: many}}}\nalgorithms: {bp: {}}", "must be an integer"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {}}\nprotocol: best", "protocol"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {}}\nseeds: [1, 1]", "repeats a seed"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {}}\nepoch: 3", "unknown key 'epoch' (did you mean 'epochs'"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {}}\nvalidation: 2", "validation"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {}}\nvalidation: 0", "clean protocol selects"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {}}\noverrides: [{match: {task: mnist}}]", "overrides[0].match.task"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {}}\noverrides: [{params: {lr: x}}]", "must be a number"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {}}\nexclude: [{arch: rnn}]", "exclude[0].arch"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {}}\nreference: {values: {fa: {}}}", "reference.values"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {}}\nreference: {values: {bp: {blobs: {mlp: high}}}}", "a number, [mean, std]"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {}}\nreference: {values: {bp: {blobs: {mlp: [null, 1]}}}}", "[mean, null]"),
    ("tasks: {blobs: {archs: {x: {layers: [{dense: 8}]}}}}\nalgorithms: {bp: {}}", "output layer has 8 units"),
    ("tasks: {blobs: {archs: {x: {layers: [{conv: {filters: 2, kernel: 20}}, flatten, {dense: 4}]}}}}\nalgorithms: {bp: {}}", "empty output"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {lr: [0.1, 0.1]}}", "same run"),
    ("tasks: {blobs: {}\nalgorithms", "not valid YAML"),
    ("- just\n- a list", "a suite is a mapping"),
    ("algorithms: {bp: {}}", "tasks:"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: [1, 2]}", "algorithms.bp: a mapping"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {}}\nreference: {values: {bp: {blobs: [1]}}}", "a mapping arch"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {}}\nreference: {values: {bp: 98}}", "a mapping task"),
    ("tasks: {blobs: {archs: {x: 5}}}\nalgorithms: {bp: {}}", "tasks.blobs.archs.x"),
    ("tasks: {blobs: {archs: {x: {layers: [{conv: {filters: 4}}]}}}}\nalgorithms: {bp: {}}", "conv"),
    ("tasks: {blobs: {archs: {x: {layers: [{dense: {units: 4, act: gelu}}]}}}}\nalgorithms: {bp: {}}", "act"),
    ("tasks: {blobs: {params: [1]}}\nalgorithms: {bp: {}}", "tasks.blobs.params"),
    ("tasks: [blobs]\nalgorithms: {bp: {}}", "tasks: a mapping"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {}}\nname: 'my suite!'", "name"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {}}\noverrides: {lr: 1}", "overrides: a list"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {}}\noverrides: [{params: {lr: 1}, why: 3}]", "overrides[0].why: a sentence"),
    ("tasks: {blobs: {}}\nalgorithms: {bp: {}}\nexclude: [{seed: 1, colour: red}]", "unknown key 'colour'"),
]


@pytest.mark.parametrize("text,expected", BAD, ids=[b[1][:30] for b in BAD])
def test_invalid_suites_give_one_line_and_status_2(write_suite, cli, text, expected):
    path = write_suite(text, "bad")
    status, out, err = cli("validate", path)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert str(path) in lines[0]
    assert expected in lines[0], lines[0]


def test_missing_suite_file(cli, tmp_path):
    status, _, err = cli("validate", tmp_path / "nope.yaml")
    assert status == 2 and "no such suite file" in err


def test_run_validates_before_starting_anything(write_suite, cli, tmp_path):
    path = write_suite(f"store: {tmp_path / 'x.sqlite'}\ntasks: {{blobs: {{}}}}\n"
                       "algorithms: {bp: {lr: oops}}", "bad")
    status, _, err = cli("run", path, "--device", "cpu")
    assert status == 2 and "algorithms.bp.lr" in err
    assert not (tmp_path / "x.sqlite").exists()


def test_valid_suite_reports_run_count(write_suite, cli):
    status, out, _ = cli("validate", write_suite(GOOD))
    assert status == 0 and "11 runs" in out


def test_a_rule_naming_an_entry_label_matches_that_row_only(write_suite):
    """`bp` names the bp row; the other rows built on bp are named by their labels (or by `bp`
    only where no row is labelled bp)."""
    suite = suite_mod.load(write_suite("""
        tasks: {blobs: {}}
        algorithms:
          bp: {}
          bp-sgd: {algorithm: bp, optimizer: sgd}
        exclude: [{algorithm: bp, arch: cnn}]
    """))
    rows = {(s.label, s.arch.name) for s in suite.specs}
    assert rows == {("bp", "mlp"), ("bp-sgd", "mlp"), ("bp-sgd", "cnn")}
    suite = suite_mod.load(write_suite("""
        tasks: {blobs: {}}
        algorithms:
          bp-adam: {algorithm: bp}
          bp-sgd: {algorithm: bp, optimizer: sgd}
        exclude: [{algorithm: bp, arch: cnn}]
    """, "b"))
    assert {s.arch.name for s in suite.specs} == {"mlp"}
