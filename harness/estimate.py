"""How long runs will take on this machine, before they run: ``--dry-run`` prints it, and the
progress bar's ETA counts in the same seconds.

A run's estimate is its epochs × the time of one epoch (training and evaluation) of the same
rule, task and architecture at the same batch size, taken from the epochs already stored by the
current code (median over runs of their median epoch after the first; stale runs are left out),
or — where none is stored — from a
few training steps and one evaluation timed here, on the task's real data, laid out as the
runner lays it (channels-last conv tensors where the rule asks for them), scaled to the epoch.
Timed figures are cached in ``.cache/epoch_times.json`` (keyed by machine, threads and the
digest of the code that runs it), so a second dry run answers at once; a figure timed while
other work held the cores (or cached before that was recorded) is marked so, and the first
dry run on a quiet machine times it again. Timing steps needs the
data and torch; a run whose data is missing gets no estimate (and says so).

Timed steps say how long an epoch takes alone; the runs a suite really makes take longer
(evaluation's first batches, the other jobs beside them, the memory they share). So a quiet
machine's timed figure is calibrated by the store itself: over the suite's cells that have
both stored epochs (at the same threads per run and device kind) and a cached quiet timing
(same machine, threads and code digest), the median ratio of recorded to timed epoch — the
architecture's own cells where it has MIN_CELLS, else the median of each architecture's median
— multiplies the timed figure, and the dry run prints the factor. The factor carries the load
the stored runs had (made at ``--jobs 2``, it overestimates a ``--jobs 1`` plan a little). A
busy machine's figure has its load in it already: it is scaled only by the pairs whose
timing was also taken under load, where MIN_CELLS of them are stored. A dry run times only
cells with nothing stored, so the pairs come from cells it timed before their runs landed, or
from benchmarks/estimate_accuracy.py, which times the stored cells (and checks the
calibration, leaving each cell out of its own).
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

from harness.api import RunSpec, device_kind
from harness.fingerprint import is_current

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
    busy: bool = False              # timed on a busy machine (calibrated by busy pairs)


def _cell(spec: RunSpec) -> tuple:
    """What an epoch's time depends on: the row (rule and its settings), the task entry, the
    architecture and the batch size."""
    return (spec.label, spec.task_label, spec.arch.name, spec.batch_size)


def _loose(spec: RunSpec) -> tuple:
    return (spec.algorithm, spec.task, spec.arch.name, spec.batch_size)


def cell_medians(runs: Iterable[tuple[tuple, list[float]]]) -> dict[tuple, float]:
    """Cell → the median over its runs of each run's median epoch; ``runs``: (cell, the
    seconds of the run's epochs after the first). The dry run's stored figure and its
    calibration, and benchmarks/estimate_accuracy.py's, are this one computation."""
    by: dict[tuple, list[float]] = {}
    for cell, seconds in runs:
        if seconds:
            by.setdefault(cell, []).append(statistics.median(seconds))
    return {cell: statistics.median(v) for cell, v in by.items()}


def stored_epoch_times(store_path: Path, current: Optional[Callable[[str, str], Optional[str]]]
                       = None) -> tuple[dict, dict, dict]:
    """(per row cell, per plugin cell, per row cell and setting) → median seconds of one epoch
    (train + eval), from the epochs after the first of every finished run in the store; the
    setting is (device kind, threads per run), the cell (label, task label, arch, batch).
    ``current(algorithm, task)``: the source digest the code here gives such runs
    (:func:`harness.fingerprint.current_source`); runs made with other source (stale) are left
    out, as a timing of older code is (a rule made faster would be estimated at its old speed)."""
    import sqlite3
    if not Path(store_path).exists():
        return {}, {}, {}
    try:
        conn = sqlite3.connect(f"file:{Path(store_path).resolve()}?mode=ro", uri=True)
        runs = conn.execute("SELECT key, label, task_label, arch, algorithm, task, spec, device, "
                            "threads, source FROM runs WHERE status IN ('ok', 'diverged')"
                            ).fetchall()
        epochs = conn.execute("SELECT run_key, train_time_s + eval_time_s FROM epochs "
                              "WHERE warmup = 0").fetchall()
        conn.close()
    except sqlite3.Error:
        return {}, {}, {}
    per_run: dict[str, list[float]] = {}
    for key, seconds in epochs:
        if seconds is not None:
            per_run.setdefault(key, []).append(seconds)
    cells, loose, settings = [], [], []
    for key, label, task_label, arch, algorithm, task, spec, device, threads, source in runs:
        now = current(algorithm, task) if current is not None else None
        if not is_current(spec, source, now):
            continue
        seconds = per_run.get(key, [])
        batch = json.loads(spec).get("batch_size")
        cells.append(((label, task_label, arch, batch), seconds))
        loose.append(((algorithm, task, arch, batch), seconds))
        settings.append(((label, task_label, arch, batch, device_kind(device or "cpu"), threads),
                         seconds))
    return cell_medians(cells), cell_medians(loose), cell_medians(settings)


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


def calibration_pairs(reference: Iterable[RunSpec], by_setting: dict, cache: dict,
                      threads: int, busy: bool = False) -> dict[tuple, tuple[str, float]]:
    """Cell → (its architecture, recorded ÷ timed epoch) for the cells of ``reference`` that
    have stored epochs at ``threads`` threads per run on the device kind of their spec, and a
    cached timing of the same code, machine and threads taken on a quiet machine (``busy``: on
    a busy one — those calibrate the figures timed under load)."""
    pairs: dict[tuple, tuple[str, float]] = {}
    for spec in reference:
        cell = _cell(spec)
        recorded = by_setting.get((*cell, device_kind(spec.device), threads))
        if cell in pairs or recorded is None:
            continue
        entry = cache.get(_cache_key(spec, threads))
        timed, timed_busy = _cached(entry)
        # an entry cached before the flag is timed again, as a busy one is, but its load is
        # unknown: it is a pair of neither kind
        if timed and timed > 0 and timed_busy == busy and isinstance(entry, dict):
            pairs[cell] = (spec.arch.name, recorded / timed)
    return pairs


def factor(pairs: dict[tuple, tuple[str, float]], arch: str,
           leave_out: Optional[tuple] = None) -> tuple[float, int, str]:
    """(factor, cells behind it, "own" or "pooled") for a timed figure of ``arch``: the median
    ratio over that architecture's cells where it has MIN_CELLS of them; else, where there are
    MIN_CELLS cells in all, the median of each architecture's median (no architecture outweighs
    the others by its number of cells); else (1.0, 0, ""). ``leave_out``: a cell not to count
    (benchmarks/estimate_accuracy.py: no cell is calibrated by its own runs)."""
    by_arch: dict[str, list[float]] = {}
    for cell, (a, ratio) in pairs.items():
        if cell != leave_out:
            by_arch.setdefault(a, []).append(ratio)
    own = by_arch.get(arch, [])
    if len(own) >= MIN_CELLS:
        return statistics.median(own), len(own), "own"
    cells = sum(len(v) for v in by_arch.values())
    if cells >= MIN_CELLS:
        return statistics.median(statistics.median(v) for v in by_arch.values()), cells, "pooled"
    return 1.0, 0, ""


def _said(arch: str, busy: bool, found: tuple[float, int, str], threads: int) -> str:
    value, cells, how = found
    timing = "a busy machine's timing" if busy else "a quiet timing"
    what = f"{arch}, timed on a busy machine" if busy else arch
    if how == "own":
        return (f"× {value:.2f} for {what} (the median over {cells} {arch} cells with stored "
                f"epochs and {timing} here at {threads} thread(s))")
    return (f"× {value:.2f} for {what} (pooled: fewer than {MIN_CELLS} {arch} cells have stored "
            f"epochs and {timing} here, so the median of each architecture's median, "
            f"over {cells} cells)")


def estimate(specs: Iterable[RunSpec], store_path: Path, data_dir: str, threads: int,
             measure: bool = True, ready: Callable[[RunSpec], bool] = lambda s: True,
             log: Callable[[str], None] = lambda m: None,
             reference: Iterable[RunSpec] = (),
             current: Optional[Callable[[str, str], Optional[str]]] = None
             ) -> dict[str, Estimate]:
    """Run key → its :class:`Estimate`. ``measure``: time steps where nothing is stored;
    ``ready(spec)``: whether its data is there to time on; ``reference``: the runs whose stored
    cells calibrate timed figures (the whole suite); ``current(algorithm, task)``: the source
    digest the code gives runs now (harness.fingerprint.current_source with the suite's
    plugin folders; by default without them), stored runs of other source being no estimate."""
    from harness.fingerprint import current_source
    specs = list(specs)
    by_cell, by_loose, by_setting = stored_epoch_times(
        store_path, current if current is not None else current_source())
    cache, timed_now = _read_cache(), {}
    reference = list(reference)
    pairs = {busy: calibration_pairs(reference, by_setting, cache, threads, busy)
             for busy in (False, True)}
    factors: dict[tuple, tuple[float, int, str]] = {}   # (arch, busy) → factor()
    load: list[str] = []                 # the busy-machine note ("" quiet), asked once

    def busy() -> str:
        if not load:
            load.append(_busy() or "")
        return load[0]
    out: dict[str, Estimate] = {}
    stood = 0                            # runs estimated from a busy machine's figure
    for spec in specs:
        epoch = by_setting.get((*_cell(spec), device_kind(spec.device), threads),
                               by_cell.get(_cell(spec), by_loose.get(_loose(spec))))
        source = STORED if epoch is not None else UNKNOWN
        figure_busy = False                # a timed figure taken under load
        if epoch is None:
            key = _cache_key(spec, threads)
            cached, cached_busy = _cached(cache.get(key))
            timeable = measure and not spec.skip_reason and ready(spec)
            # a figure timed on a busy machine stands until a dry run on a quiet one
            if cached is not None and not (cached_busy and timeable and not busy()):
                epoch, source, figure_busy = cached, TIMED, cached_busy
                stood += cached_busy
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
                    _write_cache(cache)      # kept at once: a dry run cut short keeps its work
                elif cached is not None:     # timing it again failed: the busy figure stands
                    epoch, source, figure_busy = cached, TIMED, cached_busy
        scale = 1.0          # a busy figure by busy figures' pairs: its load is in it already
        if source == TIMED and epoch is not None:
            which = (spec.arch.name, figure_busy)
            if which not in factors:
                factors[which] = factor(pairs[figure_busy], spec.arch.name)
            scale = factors[which][0]
            epoch *= scale
        out[spec.key()] = Estimate(None if epoch is None else epoch * spec.epochs, epoch, source,
                                   scale, figure_busy)
    said = [_said(arch, b, found, threads) for (arch, b), found in sorted(factors.items())
            if found[1]]
    if said:
        log("timed steps calibrated by the store's recorded ÷ timed epochs: " + "; ".join(said))
    # cells to calibrate by (stored here at these threads), if a kind of figure was left as timed
    stored_cells = {_cell(r) for r in reference
                    if (*_cell(r), device_kind(r.device), threads) in by_setting}
    if stored_cells and any(not b and not found[1] for (_, b), found in factors.items()):
        log(f"timed steps not calibrated: {len(stored_cells)} of the suite's cells have "
            f"stored epochs at {threads} thread(s), but fewer than {MIN_CELLS} have a quiet "
            "timing of the current code here (benchmarks/estimate_accuracy.py times them)")
    unscaled = stored_cells and any(b and not found[1] for (_, b), found in factors.items())
    if stood:
        log(f"note: {stood} run(s) are estimated from steps timed on a busy machine (slower "
            "than alone" + (f"; not calibrated: fewer than {MIN_CELLS} stored cells have a busy "
                            "machine's timing" if unscaled else "")
            + "); a dry run on a quiet machine times them again")
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
