"""How long runs will take on this machine, before they run: ``--dry-run`` prints it, and the
progress bar's ETA counts in the same seconds.

A run's estimate is its epochs × the time of one epoch (training and evaluation) of the same
rule, task and architecture at the same batch size, taken from the epochs already stored
(median over runs of their median epoch after the first), or — where none is stored — from a
few training steps and one evaluation timed here, on the task's real data, laid out as the
runner lays it (channels-last conv tensors where the rule asks for them), scaled to the epoch.
Timed figures are cached in ``.cache/epoch_times.json`` (keyed by machine, threads and the
digest of the code that runs it), so a second dry run answers at once; a figure timed while
other work held the cores (or cached before that was recorded) is marked so, and the first
dry run on a quiet machine times it again. Timing steps needs the
data and torch; a run whose data is missing gets no estimate (and says so).

Timed steps say how long an epoch takes alone; the runs a suite really makes take longer
(evaluation's first batches, the other jobs beside them, the memory they share), measured here
up to 2.6× on the RNN and 1.4× on the MLP and CNN. So a timed figure is calibrated by the store
itself: for the cells of the suite that have both stored epochs and a quiet machine's timed
figure, the median ratio of recorded to timed epoch, per architecture where it has two such
cells (else over all of them), multiplies the quiet machine's timed figures (a busy machine's
has its load in it already) — and the dry run prints it.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from harness.api import RunSpec

CACHE_FILE = Path(__file__).resolve().parent.parent / ".cache" / "epoch_times.json"
TIMED_STEPS = 6           # after two warm-up steps
STORED, TIMED, UNKNOWN = "stored", "timed", "unknown"
MIN_CELLS = 2             # cells with both figures behind a calibration factor


@dataclass(frozen=True)
class Estimate:
    seconds: Optional[float]        # the whole run; None: unknown
    epoch_s: Optional[float]        # one epoch, training and evaluation
    source: str                     # stored | timed | unknown
    factor: float = 1.0             # the calibration a timed figure was multiplied by
    busy: bool = False              # timed on a busy machine (so not calibrated)


def _cell(spec: RunSpec) -> tuple:
    """What an epoch's time depends on: the row (rule and its settings), the task entry, the
    architecture and the batch size."""
    return (spec.label, spec.task_label, spec.arch.name, spec.batch_size)


def _loose(spec: RunSpec) -> tuple:
    return (spec.algorithm, spec.task, spec.arch.name, spec.batch_size)


def stored_epoch_times(store_path: Path) -> tuple[dict, dict]:
    """(per row cell, per plugin cell) → median seconds of one epoch (train + eval), from the
    epochs after the first of every finished run in the store."""
    import sqlite3
    if not Path(store_path).exists():
        return {}, {}
    try:
        conn = sqlite3.connect(f"file:{Path(store_path).resolve()}?mode=ro", uri=True)
        runs = conn.execute("SELECT key, label, task_label, arch, algorithm, task, spec FROM runs "
                            "WHERE status IN ('ok', 'diverged')").fetchall()
        epochs = conn.execute("SELECT run_key, train_time_s + eval_time_s FROM epochs "
                              "WHERE warmup = 0").fetchall()
        conn.close()
    except sqlite3.Error:
        return {}, {}
    per_run: dict[str, list[float]] = {}
    for key, seconds in epochs:
        per_run.setdefault(key, []).append(seconds)
    by_cell: dict[tuple, list[float]] = {}
    by_loose: dict[tuple, list[float]] = {}
    for key, label, task_label, arch, algorithm, task, spec in runs:
        if key not in per_run:
            continue
        batch = json.loads(spec).get("batch_size")
        median = statistics.median(per_run[key])
        by_cell.setdefault((label, task_label, arch, batch), []).append(median)
        by_loose.setdefault((algorithm, task, arch, batch), []).append(median)
    return ({k: statistics.median(v) for k, v in by_cell.items()},
            {k: statistics.median(v) for k, v in by_loose.items()})


def _code(spec: RunSpec) -> str:
    """The digest of the code that would run ``spec`` (harness.fingerprint): a timing of older
    code does not estimate this one."""
    try:
        from harness import fingerprint
        from harness.registry import algorithms, tasks
        return fingerprint.of_plugins(type(algorithms.get(spec.algorithm)),
                                      type(tasks.get(spec.task)))["source"]
    except Exception:                      # noqa: BLE001 — a plugin that cannot be had
        return "unknown"


def _cache_key(spec: RunSpec, threads: int) -> str:
    return json.dumps([platform.node(), threads, _code(spec), spec.algorithm, dict(spec.params),
                       spec.task, dict(spec.task_params), spec.arch.to_json(), spec.batch_size,
                       spec.device, spec.protocol, spec.validation], sort_keys=True, default=str)


def _read_cache() -> dict:
    try:
        return json.loads(CACHE_FILE.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict) -> None:
    try:
        CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
        tmp = CACHE_FILE.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(CACHE_FILE)
    except OSError:
        pass


def timed_epoch(spec: RunSpec, data_dir: str, threads: int) -> float:
    """Seconds of one epoch of ``spec`` here: a few training steps on its real data (after
    two warm-up steps) scaled to the epoch's steps, plus one evaluation of both splits."""
    import torch

    from harness import params as P
    from harness.registry import algorithms, tasks
    from harness.runner import EVAL_BATCH, Stepper
    torch.set_num_threads(max(1, threads))
    algorithm, task = algorithms.get(spec.algorithm), tasks.get(spec.task)
    alg_params = P.build(algorithm.Params, spec.params)
    ctx = spec.context(data_dir, threads)
    data = task.load(P.build(task.Params, spec.task_params), ctx)
    torch.manual_seed(spec.seed)
    learner = algorithm.build(spec.arch, data.info, alg_params, ctx)
    device = torch.device(spec.device)
    channels_last = False
    if algorithm.channels_last:          # laid out as the runner lays it (harness.runner)
        from harness.nets import prefer_channels_last
        channels_last = prefer_channels_last(learner, spec.arch, device)

    def placed(t):
        t = t.to(device)
        return t.clone(memory_format=torch.channels_last) if channels_last and t.dim() == 4 \
            else t
    stepper = Stepper(learner, alg_params, spec.epochs)
    x, y = placed(data.train.x), data.train.y.to(device)
    batch = spec.batch_size
    steps_per_epoch = max(1, -(-len(y) // batch))
    for i in range(2):
        stepper.step(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch])
    count = min(TIMED_STEPS, steps_per_epoch)
    start = time.perf_counter()
    for i in range(count):
        j = (i * batch) % max(1, len(y) - batch + 1)
        stats = stepper.step(x[j:j + batch], y[j:j + batch])
    float(stats["loss"])                       # wait for the device
    train = (time.perf_counter() - start) / count * steps_per_epoch
    splits = [placed(split.x) for split in (data.val, data.test) if len(split.x)]
    with torch.inference_mode():
        if splits:                       # the evaluation's first batch, untimed
            learner.predict(splits[0][:EVAL_BATCH])
        start = time.perf_counter()
        for split_x in splits:
            for i in range(0, len(split_x), EVAL_BATCH):
                learner.predict(split_x[i:i + EVAL_BATCH])
    return train + (time.perf_counter() - start)


def calibration_pairs(reference: Iterable[RunSpec], by_cell: dict, cache: dict,
                      threads: int) -> dict[tuple, tuple[str, float]]:
    """Cell → (its architecture, recorded ÷ timed epoch) for the cells of ``reference`` that
    have stored epochs and a cached timing of the same code, taken on a quiet machine."""
    pairs: dict[tuple, tuple[str, float]] = {}
    for spec in reference:
        cell = _cell(spec)
        if cell in pairs or cell not in by_cell:
            continue
        timed, busy = _cached(cache.get(_cache_key(spec, threads)))
        if timed and not busy:
            pairs[cell] = (spec.arch.name, by_cell[cell] / timed)
    return pairs


def factor(pairs: dict[tuple, tuple[str, float]], arch: str,
           leave_out: Optional[tuple] = None) -> tuple[float, int, str]:
    """(factor, cells behind it, what they are: the arch or "all") for a timed figure of
    ``arch``: the median ratio over that architecture's cells where it has MIN_CELLS, else over
    all cells; (1.0, 0, "") where there are fewer. ``leave_out``: a cell not to count (a cell is
    not calibrated by itself when the calibration is checked)."""
    ratios = {cell: pair for cell, pair in pairs.items() if cell != leave_out}
    same = [ratio for a, ratio in ratios.values() if a == arch]
    if len(same) >= MIN_CELLS:
        return statistics.median(same), len(same), arch
    if len(ratios) >= MIN_CELLS:
        return statistics.median(r for _, r in ratios.values()), len(ratios), "all"
    return 1.0, 0, ""


def estimate(specs: Iterable[RunSpec], store_path: Path, data_dir: str, threads: int,
             measure: bool = True, ready: Callable[[RunSpec], bool] = lambda s: True,
             log: Callable[[str], None] = lambda m: None,
             reference: Iterable[RunSpec] = ()) -> dict[str, Estimate]:
    """Run key → its :class:`Estimate`. ``measure``: time steps where nothing is stored;
    ``ready(spec)``: whether its data is there to time on; ``reference``: the runs whose stored
    cells calibrate timed figures (the whole suite)."""
    specs = list(specs)
    by_cell, by_loose = stored_epoch_times(store_path)
    cache, timed_now = _read_cache(), {}
    pairs = calibration_pairs(reference, by_cell, cache, threads)
    factors: dict[str, tuple[float, int, str]] = {}     # arch → factor(), for timed figures
    load: list[str] = []                 # the busy-machine note ("" quiet), asked once

    def busy() -> str:
        if not load:
            load.append(_busy() or "")
        return load[0]
    out: dict[str, Estimate] = {}
    stood = 0                            # runs estimated from a busy machine's figure
    for spec in specs:
        epoch = by_cell.get(_cell(spec), by_loose.get(_loose(spec)))
        source = STORED if epoch is not None else UNKNOWN
        figure_busy = False                # a timed figure taken under load: not calibrated
        if epoch is None:
            key = _cache_key(spec, threads)
            cached, cached_busy = _cached(cache.get(key))
            timeable = measure and not spec.skip_reason and ready(spec)
            # a figure timed on a busy machine stands until a dry run on a quiet one
            if cached is not None and not (cached_busy and timeable and not busy()):
                epoch, source, figure_busy = cached, TIMED, cached_busy
            elif timeable:
                if _cell(spec) not in timed_now:
                    if not timed_now and busy():
                        log(busy())
                    log(f"timing a few steps of {spec.label} on {spec.task_label}/{spec.arch.name}")
                    try:
                        timed_now[_cell(spec)] = timed_epoch(spec, data_dir, threads)
                    except Exception as exc:   # an estimate is never worth a crash
                        log(f"  could not time it: {type(exc).__name__}: {exc}")
                        timed_now[_cell(spec)] = None
                epoch = timed_now[_cell(spec)]
                if epoch is not None:
                    cache[key], source = {"seconds": epoch, "busy": bool(busy())}, TIMED
                    figure_busy = bool(busy())
                elif cached is not None:     # timing it again failed: the busy figure stands
                    epoch, source, figure_busy = cached, TIMED, cached_busy
        stood += figure_busy
        scale = 1.0                          # a busy figure has its load in it already
        if source == TIMED and epoch is not None and not figure_busy:
            if spec.arch.name not in factors:
                factors[spec.arch.name] = factor(pairs, spec.arch.name)
            scale = factors[spec.arch.name][0]
            epoch *= scale
        out[spec.key()] = Estimate(None if epoch is None else epoch * spec.epochs, epoch, source,
                                   scale, figure_busy)
    said = [f"× {f:.2f} for {arch} (median over {n} {'' if over == arch else 'of all '}cells "
            f"with both)" for arch, (f, n, over) in sorted(factors.items()) if n]
    if said:
        log("timed steps calibrated by the store's recorded ÷ timed epochs: " + ", ".join(said))
    elif factors and reference:
        log(f"timed steps not calibrated: fewer than {MIN_CELLS} cells of the suite have both "
            "stored epochs and a quiet machine's timing")
    if stood:
        log(f"note: {stood} run(s) are estimated from steps timed on a busy machine (slower "
            "than alone); a dry run on a quiet machine times them again")
    if timed_now:
        _write_cache(cache)
    return out


def _cached(entry) -> tuple[Optional[float], bool]:
    """(seconds, timed on a busy machine) of a cache entry; (None, False) when there is none."""
    if isinstance(entry, dict) and isinstance(entry.get("seconds"), (int, float)):
        return float(entry["seconds"]), bool(entry.get("busy"))
    if isinstance(entry, (int, float)):      # written before the flag, often under load: timed
        return float(entry), True            # again by the first dry run on a quiet machine
    return None, False


def _busy() -> Optional[str]:
    """A warning when other work holds the cores while steps are timed: they run slower than
    they will alone (measured here: 2× on a 2-core machine at load 4); the cache marks such
    figures, and a dry run on a quiet machine times them again."""
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except (OSError, AttributeError):
        return None
    if load < 0.75 * cores:
        return None
    return (f"note: the machine is busy (load {load:.1f} on {cores} cores): steps timed now run "
            "slower than they will alone; a later dry run on a quiet machine times them again")


def human(seconds: Optional[float]) -> str:
    """``3 h 12 min``, ``12 min``, ``45 s``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"
