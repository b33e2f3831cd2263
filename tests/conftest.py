"""Shared fixtures: the test plugins (a synthetic task and misbehaving algorithms) and helpers
to write suites and run the command line in-process."""
from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TEST_PLUGINS = Path(__file__).resolve().parent / "plugins"

# An algorithm plugin a test writes and then edits: BP, registered as {name}, its initial
# weights' scale the expression {init} (tests change it to change, or keep, the numbers).
EDITABLE_PLUGIN = textwrap.dedent('''
    """An algorithm a test edits."""
    from harness.api import Algorithm, TrainParams
    from harness.nets import build_sequential
    from harness.registry import algorithms
    from harness.toolkit import ModuleLearner


    @algorithms.register("{name}")
    class Editable(Algorithm):
        """BP, as written by a test."""
        supports = frozenset({{"mlp"}})
        Params = TrainParams

        def build(self, arch, info, params, ctx):
            network = build_sequential(arch, {init})
            return ModuleLearner(network, info, params)
''')
os.environ.setdefault("BENCH_OFFLINE", "1")   # tests never fetch data from the network

import tempfile  # noqa: E402

from harness import registry  # noqa: E402

# the test plugins must never reach the user's `bench.py list` cache
registry.CACHE_FILE = Path(tempfile.mkdtemp(prefix="bench-test-cache-")) / "plugins.json"
registry.discover([TEST_PLUGINS])


@pytest.fixture
def write_suite(tmp_path):
    """write_suite(text, name="s") -> path of a YAML suite in a temp folder."""
    def write(text: str, name: str = "s") -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(textwrap.dedent(text))
        return path
    return write


@pytest.fixture
def cli(capfd):
    """cli(*args) -> (exit status, stdout, stderr) of bench.py, in-process (the output of the
    run processes it starts included)."""
    from harness.cli import main

    def run(*args: str):
        capfd.readouterr()
        status = main([str(a) for a in args] + [])
        out = capfd.readouterr()
        return status, out.out, out.err
    return run


BLOB_SUITE = """
name: {name}
seeds: {seeds}
epochs: {epochs}
batch_size: 64
store: {store}
tasks:
  blobs: {{archs: [mlp], params: {{n_train: 256, n_test: 128}}}}
algorithms:
{algorithms}
"""


@pytest.fixture
def blob_suite(write_suite, tmp_path):
    def make(algorithms: str = "  bp: {lr: 0.01}", seeds: int = 1, epochs: int = 3,
             name: str = "blobsuite") -> Path:
        text = BLOB_SUITE.format(name=name, seeds=seeds, epochs=epochs,
                                 store=tmp_path / f"{name}.sqlite", algorithms=algorithms)
        return write_suite(text, name)
    return make


@pytest.fixture
def read_only(tmp_path):
    """read_only(folder) -> a read-only view of ``folder``: a read-only bind mount where this
    process may mount (root: permissions alone would not stop it), else the folder itself
    with its write permissions removed. Skips where neither makes it read-only."""
    import contextlib
    import os
    import shutil
    import stat
    import subprocess
    mounts, chmodded = [], []

    def make(folder: Path) -> Path:
        if os.geteuid() == 0 and shutil.which("mount"):
            view = tmp_path / f"ro-{len(mounts)}"
            view.mkdir()
            done = subprocess.run(["mount", "--bind", str(folder), str(view)],
                                  capture_output=True)
            if done.returncode == 0:
                mounts.append(view)
                done = subprocess.run(["mount", "-o", "remount,bind,ro", str(view)],
                                      capture_output=True)
                if done.returncode == 0:
                    return view
        for path in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
            path.chmod(stat.S_IRUSR | stat.S_IXUSR)
            chmodded.append(path)
        if os.access(folder, os.W_OK):
            pytest.skip("cannot make a folder read-only here (no mount, permissions ignored)")
        return folder

    yield make
    for view in reversed(mounts):
        subprocess.run(["umount", str(view)], capture_output=True)
    for path in chmodded:
        with contextlib.suppress(OSError):
            path.chmod(stat.S_IRWXU)
