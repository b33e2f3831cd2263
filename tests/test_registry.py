"""Discovery: plugins in folders, broken plugins listed with their error, did-you-mean."""
from __future__ import annotations

import textwrap

import pytest

from harness.api import UserError
from harness.registry import algorithms, discover, tasks

PLUGIN = '''
"""Sign-SGD: BP whose gradients are replaced by their sign (a test plugin)."""
from dataclasses import dataclass
from algorithms.bp import BPLearner
from harness.api import Algorithm, param
from harness.registry import algorithms
from harness.toolkit import TrainParams, build_sequential


@dataclass(frozen=True)
class SignParams(TrainParams):
    scale: float = param(1.0, "multiplier of the sign", min=0.0)


@algorithms.register("signsgd_{tag}")
class SignSGD(Algorithm):
    """Sign of the BP gradient (written by a test)."""
    supports = frozenset({{"mlp"}})
    Params = SignParams

    def build(self, arch, info, params, ctx):
        return BPLearner(build_sequential(arch, params.init_std), info, params, ctx.epochs)
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
