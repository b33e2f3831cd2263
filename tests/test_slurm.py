"""--backend slurm: the options' checks (anywhere), and suites sent to a real single-node Slurm
cluster that the ``slurm_cluster`` fixture starts — munged, slurmctld and slurmd in the
foreground, as root, with every file in a temporary folder. Where Debian's ``slurm-wlm`` and
``munge`` are not installed (``apt-get install slurm-wlm munge``), or the daemons cannot start,
the cluster tests skip with the reason."""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from harness import parallel, store
from harness import slurm as slurm_mod
from harness.api import UserError
from harness.suite import load as load_suite

TEST_PLUGINS = Path(__file__).resolve().parent / "plugins"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scancel", "srun")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])

SLURM_CONF = """\
ClusterName=benchtest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
KillWait=2
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _die_with_parent() -> None:
    """In a daemon's process: SIGTERM when the test process goes (prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A private one-node Slurm cluster (partition ``debug``) for this test session: yields
    the folder of its files; SLURM_CONF points the clients at it meanwhile."""
    missing = [name for name in DAEMONS + CLIENTS if not shutil.which(name, path=SBIN_PATH)]
    if missing:
        pytest.skip(f"Slurm is not installed (no {', '.join(missing)}): "
                    "apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the Slurm tests start slurmctld and slurmd, which needs root")
    base = Path(tempfile.mkdtemp(prefix="bench-slurm-"))
    base.chmod(0o755)                      # munged wants its socket's folder open to all
    for sub, mode in (("munge", 0o700), ("run", 0o755), ("state", 0o755), ("spool", 0o755)):
        (base / sub).mkdir(mode=mode)
    key = base / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = base / "slurm.conf"
    conf.write_text(SLURM_CONF.format(
        base=base, ctld_port=_free_port(), d_port=_free_port(),
        munge_socket=base / "run" / "munge.socket",
        cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    daemons: list[tuple[str, subprocess.Popen]] = []

    def start(name: str, *args: str) -> None:
        out = (base / f"{name}.out").open("w")
        daemons.append((name, subprocess.Popen(
            [shutil.which(name, path=SBIN_PATH), *args], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)))

    def wait(what: str, ready, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for name, process in daemons:
                if process.poll() is not None:
                    stop()
                    pytest.skip(f"{name} could not start (status {process.returncode}): "
                                f"{_tail(base / f'{name}.out')} {_tail(base / f'{name}.log')}")
            if ready():
                return
            time.sleep(0.2)
        stop()
        pytest.skip(f"the test Slurm cluster did not come up ({what} after {seconds:g} s): "
                    f"{_tail(base / 'slurmctld.log')} {_tail(base / 'slurmd.log')}")

    def stop() -> None:
        if any(name == "slurmctld" and p.poll() is None for name, p in daemons):
            subprocess.run(["scancel", f"--user={os.geteuid()}"], capture_output=True)
            for _ in range(50):          # let the node clean up its jobs' processes
                if not subprocess.run(["squeue", "--noheader"], capture_output=True,
                                      text=True).stdout.strip():
                    break
                time.sleep(0.2)
        for _, process in reversed(daemons):
            if process.poll() is None:
                process.terminate()
        for _, process in reversed(daemons):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        daemons.clear()
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved

    start("munged", "--foreground", f"--socket={base / 'run' / 'munge.socket'}",
          f"--key-file={key}", f"--log-file={base / 'munge' / 'munged.log'}",
          f"--pid-file={base / 'munge' / 'munged.pid'}",
          f"--seed-file={base / 'munge' / 'munged.seed'}")
    wait("munged's socket", lambda: (base / "run" / "munge.socket").exists(), 10)
    start("slurmctld", "-D", "-i")
    start("slurmd", "-D", "-N", "localhost")

    def idle() -> bool:
        done = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%t"],
                              capture_output=True, text=True)
        return done.returncode == 0 and done.stdout.strip() == "idle"
    wait("the node idle in sinfo", idle, 30)
    try:
        yield base
    finally:
        stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fast_polls(monkeypatch):
    monkeypatch.setattr(slurm_mod, "POLL_S", 0.3)
    monkeypatch.setattr(slurm_mod, "RESULT_GRACE_S", 0.5)


def _suite(write_suite, tmp_path, name: str, algorithms: str, seeds: str = "[0]"):
    return write_suite(textwrap.dedent(f"""\
        name: {name}
        seeds: {seeds}
        epochs: 1
        batch_size: 64
        store: {tmp_path / f'{name}.sqlite'}
        tasks:
          blobs: {{archs: [mlp], params: {{n_train: 256, n_test: 128}}}}
        algorithms:
        """) + textwrap.indent(textwrap.dedent(algorithms), "  "), name)


def _run_args(path, tmp_path, *more):
    return ("run", path, "--backend", "slurm", "--device", "cpu", "--no-progress",
            "--no-report", "--plugins", TEST_PLUGINS, "--slurm-partition", "debug",
            "--slurm-cpus-per-task", "1", "--slurm-time", "5",
            "--slurm-folder", tmp_path / "jobs", *more)


def _jobs_named(name: str) -> list[tuple[str, str]]:
    done = subprocess.run(["squeue", "--noheader", "--array", "--states=all",
                           f"--name=bench-{name}", "--format=%i|%T"],
                          capture_output=True, text=True)
    return [tuple(line.split("|", 1)) for line in done.stdout.split()]


def _when_queued(name: str, action) -> threading.Thread:
    """Run ``action(job_id)`` in a thread as soon as a job of suite ``name`` is queued."""
    def watch() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            jobs = _jobs_named(name)
            if jobs:
                action(jobs[0][0])
                return
            time.sleep(0.2)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# -- without a cluster -------------------------------------------------------------------------

def test_slurm_backend_is_listed_in_run_help(capfd):
    from harness.cli import main
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capfd.readouterr().out
    assert "slurm (job arrays" in out and "--slurm-partition" in out and "--slurm-extra" in out


@pytest.mark.parametrize("args, message", [
    (["--slurm-time", "4h"], "--slurm-time: '4h' is not a time"),
    (["--slurm-time", "1:75"], "--slurm-time"),
    (["--slurm-partition", "gpu;rm -rf"], "--slurm-partition"),
    (["--slurm-mem", "lots"], "--slurm-mem"),
    (["--slurm-cpus-per-task", "0"], "--slurm-cpus-per-task: must be ≥ 1"),
    (["--slurm-extra=--array=0-9"], "--array is set by the harness"),
    (["--slurm-extra=--time=10"], "has an option of its own: --slurm-time"),
    (["--slurm-extra=-A abc"], "write it as --slurm-extra=--account=abc"),
])
def test_slurm_bad_options_are_one_line_before_anything(blob_suite, cli, tmp_path, args,
                                                        message):
    path = blob_suite(name="badopt")
    status, _, err = cli("run", path, "--backend", "slurm", "--no-progress", *args)
    assert status == 2 and message in err and err.count("\n") == 1, err
    assert not load_suite(path).store_path.exists()


def test_slurm_options_are_for_the_slurm_backend_only(blob_suite, cli):
    status, _, err = cli("run", blob_suite(name="notslurm"), "--device", "cpu",
                         "--slurm-mem", "8G")
    assert status == 2 and "--slurm-mem: for --backend slurm only" in err


def test_slurm_without_sbatch_is_a_user_error(blob_suite, cli, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    path = blob_suite(name="nosbatch")
    status, _, err = cli("run", path, "--backend", "slurm", "--device", "cpu")
    assert status == 2 and "no `sbatch` on PATH" in err
    assert not load_suite(path).store_path.exists()


def test_slurm_option_values():
    assert [slurm_mod.parse_time(t) for t in ("30", "04:00:00", "90:30", "1-0", "1-2:30")] == \
        [30, 240, 91, 1440, 1590]
    options = slurm_mod.SlurmOptions(partition="gpu,gpu2", gpus_per_task=1, mem="16g",
                                     time="04:00:00", extra=("--account=abc", "--exclusive"))
    options.check(need_sbatch=False)
    params = options.parameters(jobs=32, name="paper_table")
    assert params["time"] == 240 and params["mem"] == "16G" and params["gpus_per_task"] == 1
    assert params["array_parallelism"] == 32 and params["job_name"] == "bench-paper_table"
    assert params["additional_parameters"] == {"account": "abc", "exclusive": True}
    assert slurm_mod.SlurmOptions(time=None).parameters(1, "")["time"] is None  # never 5 min
    assert options.device("auto") == "cuda" and options.threads() == 1
    assert slurm_mod.SlurmOptions(cpus_per_task=4).threads() == 4
    assert slurm_mod.SlurmOptions().device("auto") == "cpu"
    with pytest.raises(UserError):
        slurm_mod.SlurmOptions().device("cuda")


# -- on a real (single-node) Slurm cluster -----------------------------------------------------

def test_slurm_suite_runs_ok_then_resumes(slurm_cluster, write_suite, cli, tmp_path,
                                          fast_polls):
    path = _suite(write_suite, tmp_path, "slurmok", "bp: {lr: 0.01}\n", seeds="[0, 1]")
    status, out, err = cli(*_run_args(path, tmp_path, "--jobs", "2"))
    assert status == 0 and "ok 2, diverged 0, error 0" in out, err
    assert "submitted 2 run(s) as Slurm job array" in err
    frames = store.load(load_suite(path).store_path)
    assert list(frames.runs["status"]) == ["ok", "ok"]
    assert set(frames.sessions["backend"]) == {"slurm"}
    logs = sorted((tmp_path / "jobs").glob("*_*/*_log.err"))
    assert len(logs) == 2 and "epoch 1/1" in logs[0].read_text()   # each run's epochs, logged

    status, out, err = cli(*_run_args(path, tmp_path))
    assert status == 0 and "ok 0" in out and "already stored 2" in out, err
    assert "submitted" not in err
    assert len(store.load(load_suite(path).store_path).runs) == 2


def test_slurm_run_that_dies_in_its_job_is_an_error(slurm_cluster, write_suite, cli, tmp_path,
                                                    fast_polls):
    path = _suite(write_suite, tmp_path, "slurmdies", "dies: {how: os_exit, after: 2}\n")
    status, out, err = cli(*_run_args(path, tmp_path))
    assert status == 0 and "error 1" in out, err
    run = store.load(load_suite(path).store_path).runs.iloc[0]
    assert run["status"] == "error" and "exited with status 3" in run["reason"]


def test_slurm_unknown_partition_is_sbatchs_one_line(slurm_cluster, write_suite, cli,
                                                     tmp_path):
    path = _suite(write_suite, tmp_path, "slurmnopart", "bp: {lr: 0.01}\n")
    status, _, err = cli(*_run_args(path, tmp_path), "--slurm-partition", "nosuch")
    assert status == 2 and "sbatch refused" in err and "nosuch" in err, err
    assert err.strip().splitlines()[-1].startswith("error: --backend slurm")
    assert _jobs_named("slurmnopart") == []
    assert not list(tmp_path.rglob("*.pkl"))          # nothing of the refused job is left
    with store.Store(load_suite(path).store_path, readonly=True) as stored:
        assert not stored.statuses() and not stored.query("SELECT key FROM claims")


def test_slurm_job_cancelled_on_the_cluster_is_an_error(slurm_cluster, write_suite, cli,
                                                        tmp_path, fast_polls):
    path = _suite(write_suite, tmp_path, "slurmcancelled", "bp: {lr: 0.01}\n")
    # held: the job waits in the queue until someone (here: the thread) cancels it
    watcher = _when_queued("slurmcancelled", lambda job: subprocess.run(["scancel", job]))
    status, out, err = cli(*_run_args(path, tmp_path, "--slurm-extra=--hold"))
    watcher.join()
    assert status == 0 and "error 1" in out, err
    run = store.load(load_suite(path).store_path).runs.iloc[0]
    assert run["status"] == "error" and "ended CANCELLED" in run["reason"], run["reason"]


def test_slurm_sigterm_cancels_the_submitted_jobs(slurm_cluster, write_suite, cli, tmp_path,
                                                  fast_polls):
    path = _suite(write_suite, tmp_path, "slurmstopped", "bp: {lr: 0.01}\n")

    def stop(job: str) -> None:
        if signal.getsignal(signal.SIGTERM) is parallel._raise_stop:   # the suite's handler
            os.kill(os.getpid(), signal.SIGTERM)
    watcher = _when_queued("slurmstopped", stop)
    status, out, err = cli(*_run_args(path, tmp_path, "--slurm-extra=--hold"))
    watcher.join()
    assert status == 130 and "cancelled Slurm job array" in err, err
    for _ in range(25):
        if [state for _, state in _jobs_named("slurmstopped")] == ["CANCELLED"]:
            break
        time.sleep(0.2)
    assert [state for _, state in _jobs_named("slurmstopped")] == ["CANCELLED"]
    frames = store.load(load_suite(path).store_path)
    assert len(frames.runs) == 0                    # nothing stored: a re-run does it
