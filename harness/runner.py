"""One run: load the task's tensors onto the device, build the learner, own the epoch loop.

The harness, not the algorithm, owns the clock: it slices minibatches from tensors already on
the device, times the training epoch (CUDA-synchronised), evaluates validation and test apart
from it, records an :class:`EpochRecord` per epoch, stops early on the selection metric, and
ends a run whose loss is not finite as ``diverged``. Any exception becomes status ``error``
with its traceback: a failed run never stops the suite.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import resource
import sys
import time
import traceback
from typing import Any, Callable, Optional

from harness import fingerprint
from harness import params as params_mod
from harness.api import EpochRecord, RunResult, RunSpec, Selection, Split, Status, UserError
from harness.registry import algorithms, discover, tasks

EVAL_BATCH = 1024


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------

def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ≥ 4.0); False where it can't."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------------------------
# Evaluation and selection
# --------------------------------------------------------------------------------------------

def evaluate(learner, task, info, split, x, y) -> dict[str, float]:
    """The task's metrics and the loss of the learner's predictions on one split (``x``, ``y``
    on the run's device), in batches of EVAL_BATCH, under inference mode."""
    import torch
    from harness.toolkit import loss_value
    if len(y) == 0:
        return {}
    with torch.inference_mode():
        outputs = torch.cat([learner.predict(x[i:i + EVAL_BATCH])
                             for i in range(0, len(x), EVAL_BATCH)])
        metrics = dict(task.evaluate(outputs, y, split))
        metrics["loss"] = float(loss_value(info, outputs, y))
    return metrics


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def select_epoch(epochs: list[EpochRecord], split: str, metric: str, direction: str) -> Optional[EpochRecord]:
    """The epoch whose ``split`` metric is best (earliest on ties); None without that split."""
    scored = [e for e in epochs if _finite(e.metrics.get(split, {}).get(metric))]
    if not scored:
        return None
    sign = 1.0 if direction == "max" else -1.0
    return max(scored, key=lambda e: (sign * e.metrics[split][metric], -e.epoch))


def summarize(epochs: list[EpochRecord], metric: str, direction: str) -> Selection:
    """What each protocol selects: ``clean`` takes the epoch best on validation and reports its
    test value; ``paper`` reports the best test value over epochs (as the DLL paper does)."""
    clean = select_epoch(epochs, Split.VAL, metric, direction)
    paper = select_epoch(epochs, Split.TEST, metric, direction)
    return Selection(metric=metric, direction=direction,
                     clean_epoch=clean.epoch if clean else None,
                     clean_val=clean.metrics[Split.VAL][metric] if clean else None,
                     clean_test=clean.metrics[Split.TEST].get(metric) if clean else None,
                     paper_epoch=paper.epoch if paper else None,
                     paper_test=paper.metrics[Split.TEST][metric] if paper else None)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def execute(spec: RunSpec, data_dir: str, threads: int = 1, plugin_paths: tuple = (),
            on_epoch: Optional[Callable[[RunSpec, EpochRecord], None]] = None) -> RunResult:
    """Run one spec to the end and return its result; never raises for the run's own failures.
    ``on_epoch(spec, record)`` is called after every finished epoch (progress, logging)."""
    import torch
    torch.set_num_threads(max(1, threads))
    result = RunResult(spec=spec, status=Status.OK, threads=threads, started_at=now())
    cuda = spec.device.startswith("cuda")
    try:
        discover(plugin_paths)
        algorithm = algorithms.get(spec.algorithm)
        task = tasks.get(spec.task)
        result.fingerprint = fingerprint.of_plugins(type(algorithm), type(task))
        for kind, plugin, wanted in (("algorithm", algorithm, spec.algorithm_version),
                                     ("task", task, spec.task_version)):
            if plugin.version != wanted:
                raise UserError(f"{kind} {plugin.name} is at version {plugin.version}, but the "
                                f"run was planned for version {wanted}")
        alg_params = params_mod.build(algorithm.Params, spec.params)
        task_params = params_mod.build(task.Params, spec.task_params)
        reason = algorithm.unsupported(spec.arch, alg_params)
        if reason:
            result.status, result.reason = Status.SKIPPED, reason
            return result
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak_rss()
        ctx = spec.context(data_dir, threads)
        _seed_everything(spec.seed)
        data = task.load(task_params, ctx)
        device = torch.device(spec.device)
        result.notes.update(data.notes)
        _seed_everything(spec.seed)
        learner = algorithm.build(spec.arch, data.info, alg_params, ctx)
        channels_last = False
        if algorithm.channels_last:
            from harness.nets import prefer_channels_last
            channels_last = prefer_channels_last(learner, spec.arch, device)
        state = learner.state_dict()
        result.n_parameters = sum(v.numel() for v in state.values() if hasattr(v, "numel"))
        _train(spec, task, data, Stepper(learner, alg_params, spec.epochs), result, device,
               on_epoch, channels_last)
        result.selection = summarize(result.epochs, task.primary_metric,
                                     task.metrics[task.primary_metric])
    except UserError as exc:
        result.status, result.reason = Status.ERROR, str(exc)
    except SystemExit as exc:   # a plugin called sys.exit(): the run failed, not the worker
        result.status = Status.ERROR
        result.reason = f"the run called sys.exit({exc.code!r})"
        result.traceback = traceback.format_exc()
    except Exception as exc:  # the run failed; the suite goes on
        result.status = Status.ERROR
        result.reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        result.traceback = traceback.format_exc()
    finally:
        result.finished_at = now()
        if cuda:
            result.peak_memory_mb = torch.cuda.max_memory_allocated() / 2 ** 20
            result.memory_kind = "cuda_max_allocated"
        else:
            result.peak_memory_mb = _peak_rss_mb()
            result.memory_kind = "process_rss"
    return result


class Stepper:
    """The harness's optimiser around a learner — built by name from the algorithm's params over
    the learner's parameter groups, the same for every algorithm — and one training step as the
    runner takes it: zero the gradients, let the learner set them, step. (Tests and notebooks
    use it to train a learner the way a run does.)"""

    def __init__(self, learner, params, epochs: int = 1):
        from harness.toolkit import make_optimizer
        self.learner, self.params = learner, params
        self.optimizer, self.schedules = make_optimizer(
            learner.parameter_groups(), learner.optimizer_settings(params), epochs)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        stats = self.learner.train_step(x, y)
        self.optimizer.step()
        return stats

    def end_epoch(self) -> None:
        for schedule in self.schedules:
            schedule.step()


def _train(spec, task, data, stepper: Stepper, result, device, on_epoch=None,
           channels_last: bool = False) -> None:
    import torch

    def placed(x):   # batches cut from a channels-last set keep its order (one copy, here)
        x = x.to(device)
        return x.clone(memory_format=torch.channels_last) if channels_last and x.dim() == 4 \
            else x
    metric, direction = task.primary_metric, task.metrics[task.primary_metric]
    info = data.info
    x_train, y_train = placed(data.train.x), data.train.y.to(device)
    evaluated = [(split, placed(split.x), split.y.to(device)) for split in (data.val, data.test)]
    watch_split = Split.VAL if spec.protocol == "clean" and len(data.val) else Split.TEST
    probe = None
    if spec.diagnostics:                 # a fixed batch of the training split, every epoch
        from harness import diagnostics
        probe = diagnostics.probe_batch(x_train, y_train, spec.seed)
    generator = torch.Generator(device="cpu").manual_seed(spec.seed)
    n, batch = len(y_train), spec.batch_size
    best, since_best = None, 0
    learner = stepper.learner
    for epoch in range(1, spec.epochs + 1):
        lr = stepper.lr
        _sync(spec.device)
        start = time.perf_counter()
        order = torch.randperm(n, generator=generator).to(device)
        sums: dict[str, Any] = {}
        steps = 0
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            stats = stepper.step(x_train[idx], y_train[idx])
            for name, value in stats.items():     # summed on the device: no step waits
                sums[name] = sums[name] + value if name in sums else _detached(value)
            steps += 1
        stepper.end_epoch()
        _sync(spec.device)
        train_time = time.perf_counter() - start
        means = {name: float(total) / max(1, steps) for name, total in sums.items()}
        train_loss = means.pop("loss", math.nan)

        start = time.perf_counter()
        metrics = {str(split.name): evaluate(learner, task, info, split, x, y)
                   for split, x, y in evaluated}
        _sync(spec.device)
        eval_time = time.perf_counter() - start
        non_finite = [split for split, values in metrics.items()
                      if metric in values and not _finite(values[metric])]
        if means:                                  # what train_step returned beside the loss
            metrics[Split.TRAIN.value] = means
        if probe is not None and epoch % spec.diagnostics_every == 0:
            found = diagnostics.alignment(learner, spec.arch, info, *probe,
                                          getattr(stepper.params, "label_smoothing", 0.0))
            if found:
                metrics[Split.DIAGNOSTICS.value] = found
        metrics = {split: {name: (value if _finite(value) else None)   # a secondary metric
                           for name, value in values.items()}           # that is not finite
                   for split, values in metrics.items()}                # is stored as null
        record = EpochRecord(epoch=epoch, train_time_s=train_time, eval_time_s=eval_time,
                             train_loss=train_loss, metrics=metrics, lr=lr, warmup=epoch == 1)
        result.epochs.append(record)
        if on_epoch is not None:
            on_epoch(spec, record)
        if not math.isfinite(train_loss) or non_finite:
            result.status = Status.DIVERGED
            what = (f"training loss {train_loss}" if not math.isfinite(train_loss) else
                    " and ".join(f"{split} {metric}" for split in non_finite))
            result.reason = f"non-finite {what} at epoch {epoch}"
            return
        score = metrics[watch_split].get(metric)
        if score is not None:
            better = best is None or (score > best if direction == "max" else score < best)
            best, since_best = (score, 0) if better else (best, since_best + 1)
            if spec.patience is not None and since_best >= spec.patience:
                result.reason = f"early stop at epoch {epoch}: no {watch_split} {metric} " \
                                f"improvement for {spec.patience} epochs"
                return


def _detached(value):
    """A scalar a step returned, as something to add to: a detached tensor or a float."""
    detach = getattr(value, "detach", None)
    return detach().clone() if detach is not None else float(value)


def epoch_line(spec: RunSpec, record: EpochRecord, metric: str) -> str:
    """``dll mnist/cnn seed 0: epoch 3/50 loss 0.41 accuracy val 97.1 test 97.0 (12.3 s)``"""
    scores = " ".join(f"{split} {record.metrics[split][metric]:.4g}"
                      for split in ("val", "test")
                      if _finite(record.metrics.get(split, {}).get(metric)))
    return (f"{spec.label or spec.algorithm} {spec.task_label or spec.task}/{spec.arch.name} "
            f"seed {spec.seed}: epoch {record.epoch}/{spec.epochs} loss {record.train_loss:.4g} "
            f"{metric} {scores} ({record.train_time_s:.1f} s)")


def threads_for(jobs: int, cores: Optional[int] = None) -> int:
    """Torch threads per worker so that jobs × threads ≤ cores."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, jobs))
