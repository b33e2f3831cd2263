"""Discovery: plugins in folders, broken plugins listed with their error, did-you-mean."""
from __future__ import annotations


import pytest

from harness.api import UserError
from harness.registry import algorithms, discover, tasks

PLUGIN = '''
"""Sign-SGD: BP whose gradients are replaced by their sign (a test plugin)."""
from dataclasses import dataclass
from harness.api import Algorithm, TrainParams, param
from harness.nets import build_sequential
from harness.registry import algorithms
from harness.toolkit import ModuleLearner


@dataclass(frozen=True)
class SignParams(TrainParams):
    scale: float = param(1.0, "multiplier of the sign", min=0.0)


@algorithms.register("signsgd_{tag}")
class SignSGD(Algorithm):
    """Sign of the BP gradient (written by a test)."""
    supports = frozenset({{"mlp"}})
    Params = SignParams

    def build(self, arch, info, params, ctx):
        return ModuleLearner(build_sequential(arch, params.init_std), info, params)
'''


def test_plugin_in_a_folder_is_discovered_and_listed(tmp_path, cli):
    folder = tmp_path / "myplugins" / "algorithms"
    folder.mkdir(parents=True)
    (folder / "signsgd.py").write_text(PLUGIN.format(tag="a"))
    status, out, _ = cli("list", "algorithms", "--plugins", tmp_path / "myplugins")
    assert status == 0
    assert "signsgd_a" in out and "Sign of the BP gradient" in out
    assert "scale (float, default 1.0)" in out
    assert "signsgd_a" in algorithms


def test_flat_plugin_folder(tmp_path):
    (tmp_path / "flat_signsgd.py").write_text(PLUGIN.format(tag="b"))
    discover([tmp_path])
    assert algorithms.get("signsgd_b").supports == frozenset({"mlp"})


def test_broken_plugin_is_listed_with_its_error(tmp_path, cli):
    folder = tmp_path / "broken" / "algorithms"
    folder.mkdir(parents=True)
    (folder / "halfdone.py").write_text("import torch\nraise ImportError('needs numpy 3')\n")
    status, out, _ = cli("list", "--plugins", tmp_path / "broken")
    assert status == 0
    assert "BROKEN" in out and "halfdone.py" in out and "needs numpy 3" in out


def test_suite_naming_a_broken_plugin_gets_its_error(tmp_path, blob_suite, cli):
    folder = tmp_path / "broken2" / "algorithms"
    folder.mkdir(parents=True)
    (folder / "wobbly.py").write_text("raise ValueError('bad constant')\n")
    discover([tmp_path / "broken2"])
    with pytest.raises(UserError, match="wobbly.*failed to import.*bad constant"):
        algorithms.canonical("wobbly")


def test_unknown_names_get_did_you_mean_and_the_valid_list():
    with pytest.raises(UserError) as info:
        algorithms.canonical("bq", "suite.yaml: algorithms.bq")
    message = str(info.value)
    assert "did you mean 'bp'" in message and "valid:" in message and "bp" in message
    with pytest.raises(UserError, match="did you mean 'mnist'"):
        tasks.canonical("mnsit")


def test_aliases_resolve_to_the_registered_name():
    assert algorithms.canonical("backprop") == "bp"
    assert tasks.canonical("fmnist") == "fashion_mnist"


def test_register_rejects_non_plugins():
    with pytest.raises(TypeError):
        algorithms.register("notaclass")(object)


def test_list_catalogue_is_rebuilt_when_a_plugin_changes(tmp_path, cli):
    folder = tmp_path / "grow" / "algorithms"
    folder.mkdir(parents=True)
    (folder / "one.py").write_text(PLUGIN.format(tag="c"))
    _, out, _ = cli("list", "algorithms", "--plugins", tmp_path / "grow")
    assert "signsgd_c" in out and "signsgd_d" not in out
    (folder / "two.py").write_text(PLUGIN.format(tag="d"))
    _, out, _ = cli("list", "algorithms", "--plugins", tmp_path / "grow")
    assert "signsgd_d" in out


def test_the_readme_worked_example_is_a_working_plugin(tmp_path):
    """The README's 'Adding an algorithm' example, run as written."""
    import re
    from pathlib import Path

    from harness import params as P
    from harness.api import RunContext, RunSpec
    from harness.runner import execute

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(# algorithms/signbp.py\n.*?)```", readme, re.S).group(1)
    folder = tmp_path / "readme" / "algorithms"
    folder.mkdir(parents=True)
    (folder / "signbp.py").write_text(code)
    discover([tmp_path / "readme"])
    alg = algorithms.get("signbp")
    task = tasks.get("blobs")
    task_params = P.resolve(task.Params, {})
    spec = RunSpec(algorithm="signbp", params=P.resolve(alg.Params, {"lr": 1e-3}), task="blobs",
                   task_params=task_params,
                   arch=task.presets(P.build(task.Params, task_params), RunContext())["mlp"], seed=0,
                   epochs=3, batch_size=32)
    result = execute(spec, str(tmp_path))
    assert result.status == "ok", result.traceback
    assert result.epochs[-1].metrics["test"]["accuracy"] > 60


def test_entry_point_plugins_from_an_installed_package(tmp_path, monkeypatch):
    """A separate package adds an algorithm through the plausible_bench.algorithms group."""
    (tmp_path / "extbench_plugin.py").write_text(PLUGIN.format(tag="ext"))
    dist = tmp_path / "extbench-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: extbench\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[plausible_bench.algorithms]\nsignsgd_ext = extbench_plugin\n"
        "[plausible_bench.tasks]\nbroken_task = extbench_missing_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    discover()
    assert "signsgd_ext" in algorithms
    assert any("extbench_missing_module" in key for key in tasks.broken)
