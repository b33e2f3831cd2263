"""Multivariate time-series forecasting with RNNs: the offline sensor-network (8 channels) and
UK electricity-demand (1 channel) series, and loaders for the paper's Electricity (LSTNet text),
METR-LA and PEMS-BAY (pandas HDF5) given a path or URL.

Protocols (``RunContext.protocol``):

* ``clean`` — chronological train / validation / test rows (test = last 20%, validation = the
  last ``validation`` fraction of the rest); z-score fitted on the training rows only; windows
  never cross a split; at every step of a window the target is the target columns ``horizon``
  steps ahead: y has shape (N, T, targets). Training windows slide by ``train_stride``, evaluation
  windows do not overlap.
* ``paper`` — DLL.md §5.8: every column z-scored over the whole series; target = the last column
  at the same step; stride-1 windows, the first 80% of them train (the last ``validation``
  fraction of those held out so the harness has a validation split), the last 20% test. The
  input is every column with the target column set to zero, which is the released code's "all
  columns but the last" (a zero input contributes nothing and its weights get no gradient)
  while keeping the preset's input width.

Metrics on the normalised scale (mse, primary; mae), in original units (mse_orig, mae_orig), and
``persistence_mse``: the forecast "the value at t predicts t + lag" (lag = horizon; 1 under the
paper protocol). Under the clean protocol it is scored on exactly the positions the model is
(every step of every window: with ``predict: change`` the persistence forecast is the output 0;
otherwise load() keeps each split's value at t). Under the paper protocol, whose input lacks the
target column, it is scored where that value is inside the window (all but the first step).

Options of the clean protocol (task params): ``predict: change`` (the network outputs the change
from the current value), ``inputs: change | both`` (it is fed the step-to-step changes, alone or
beside the values: changes stay in the training range when the levels drift out of it), and
``drop_anomalies`` (training windows touching a reading the dataset labels anomalous are left
out; sensor_network only. Validation and test are never filtered).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harness import data
from harness.api import (Arch, Dense, Loss, Recurrent, RunContext, Split, SplitData, Task,
                         TaskData, TaskInfo, UserError, param)
from harness.registry import tasks
from tasks._series import LABELS, READERS, SERIES

TEST_FRACTION = 0.2


# ---------------------------------------------------------------------------------------------
# Task
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForecastParams:
    dataset: str = param("sensor_network", "series by name (the last three need their files: "
                         "see bench.py data)", choices=tuple(SERIES))
    path: Optional[str] = param(None, "read the series from this file (or an https URL on a "
                                "host the dataset names: bench.py data) instead of "
                                "data/<dataset>/, in the dataset's format")
    seq_len: int = param(32, "time steps per window (the paper's 32)", min=1)
    horizon: int = param(1, "clean protocol: predict this many steps ahead", min=1)
    targets: str = param("all", "target columns: all, last, or comma-separated column "
                         "indices (the paper protocol predicts the last column: use last)")
    max_rows: Optional[int] = param(None, "use only the first max_rows time steps (null = all)",
                                    min=10)
    train_stride: int = param(1, "clean protocol: step between training windows (evaluation "
                              "windows never overlap)", min=1)
    predict: str = param("value", "clean protocol: the network outputs the value horizon steps "
                         "ahead, or its change from the current step (differencing: the "
                         "forecast is x_t + output; errors, and so every metric, are the same "
                         "quantity either way, and persistence is the output 0)",
                         choices=("value", "change"))
    inputs: str = param("value", "clean protocol: what the network is fed at each step: the "
                        "normalised values, their change from the previous step (the first "
                        "step of a window gets 0: the row before is outside the window), or "
                        "both side by side (twice the input width). Changes stay in range when "
                        "the test levels lie outside the training levels",
                        choices=("value", "change", "both"))
    drop_anomalies: bool = param(False, "clean protocol: leave out of the training split every "
                                 "window (inputs or targets) that touches a reading the dataset "
                                 "labels anomalous (sensor_network only: its label column). "
                                 "Validation and test windows are all kept")


def target_columns(spec: str, n_columns: int) -> list[int]:
    if spec == "all":
        return list(range(n_columns))
    if spec == "last":
        return [n_columns - 1]
    try:
        cols = [int(c) for c in spec.split(",")]
    except ValueError:
        raise UserError(f"targets: {spec!r} is not all, last or column indices like 0,3") from None
    bad = [c for c in cols if not 0 <= c < n_columns]
    if bad or not cols:
        raise UserError(f"targets: columns {bad} outside 0..{n_columns - 1}")
    return cols


def _source_path(params: ForecastParams, data_dir: Path) -> Path:
    if params.path is None:
        return data.get(params.dataset).folder(data_dir) / SERIES[params.dataset][0]
    if "://" in params.path:   # only from the hosts the dataset's registration names
        return data.download(params.path, Path(data_dir) / "_downloads",
                             data.get(params.dataset).hosts)
    return Path(params.path).expanduser()


def _windows(z, starts, seq_len: int, shift: int, in_cols_mask, targets, change: bool = False,
             inputs: str = "value"):
    """x = z[s : s+T] (masked columns zeroed), y = z[s+shift : s+shift+T, targets]
    (minus z[s : s+T, targets] when predicting the change). ``inputs`` "change" feeds
    z[t] − z[t−1] instead of z[t] (0 at a window's first step), "both" the two side by side
    (values first)."""
    import torch
    starts = torch.as_tensor(starts, dtype=torch.long)
    idx = starts[:, None] + torch.arange(seq_len)[None, :]
    values = z[idx] * in_cols_mask
    y = z[idx + shift][..., targets]
    if change:
        y = y - z[idx][..., targets]
    if inputs == "value":
        x = values
    else:
        steps = torch.zeros_like(values)
        steps[:, 1:] = values[:, 1:] - values[:, :-1]
        x = steps if inputs == "change" else torch.cat([values, steps], dim=-1)
    return x.float(), y.float()


@tasks.register("forecast", aliases=("timeseries", "time_series"))
class Forecast(Task):
    """Multivariate forecasting (sensor network, UK demand; Electricity, METR-LA, PEMS-BAY by path), MSE."""

    Params = ForecastParams
    loss = Loss.MSE
    metrics = {"mse": "min", "mae": "min", "persistence_mse": "min", "mse_orig": "min",
               "mae_orig": "min"}

    def datasets(self, params: ForecastParams) -> list[str]:
        return [params.dataset] if params.path is None else []

    def presets(self, params: ForecastParams, ctx: RunContext) -> dict[str, Arch]:
        _, columns, hidden = SERIES[params.dataset]
        out = len(target_columns(params.targets, columns))
        width = 2 * columns if params.inputs == "both" else columns
        return {"rnn": Arch("rnn", (params.seq_len, width),
                            (Recurrent(hidden), Dense(out, "linear")), out)}

    def read(self, params: ForecastParams, data_dir: Path):
        path = _source_path(params, data_dir)
        values = READERS[params.dataset](path)
        columns = SERIES[params.dataset][1]
        if values.shape[1] != columns:
            raise UserError(f"{path}: {values.shape[1]} columns, but {params.dataset} has "
                            f"{columns}")
        if params.max_rows is not None:
            values = values[: params.max_rows]
        return path, values

    def load(self, params: ForecastParams, ctx: RunContext) -> TaskData:
        import torch
        path, values = self.read(params, Path(ctx.data_dir))
        series = torch.tensor(values, dtype=torch.float64)     # rows × columns
        rows, columns = series.shape
        targets = target_columns(params.targets, columns)
        T = params.seq_len
        mask = torch.ones(columns, dtype=torch.float64)
        change = params.predict == "change"
        dropped = "none"                                        # training windows left out
        if ctx.protocol == "paper":
            if change:
                raise UserError("the paper protocol predicts the value at the same step: "
                                "predict: change is for the clean protocol")
            if params.inputs != "value":
                raise UserError("the paper protocol feeds the values of the other columns: "
                                "inputs: change or both is for the clean protocol")
            if params.drop_anomalies:
                raise UserError("the paper protocol trains on every window: drop_anomalies is "
                                "for the clean protocol")
            if columns < 2:
                raise UserError(f"{path}: the paper protocol predicts the last column from the "
                                f"others; this series has one column (use protocol: clean)")
            if targets != [columns - 1]:
                raise UserError("the paper protocol predicts the last column: set the task "
                                "param targets: last")
            mean, std = series.mean(0), series.std(0)
            shift, lag = 0, 1
            mask[columns - 1] = 0.0
            n_windows = rows - T + 1
            if n_windows < 3:
                raise UserError(f"{path}: {rows} rows are too few for windows of {T}")
            n_train_all = int(round(n_windows * (1 - TEST_FRACTION)))
            n_val = int(round(ctx.validation * n_train_all))
            split_starts = {"train": range(0, n_train_all - n_val),
                            "val": range(n_train_all - n_val, n_train_all),
                            "test": range(n_train_all, n_windows)}
            fitted_on = "whole series (paper protocol)"
        else:
            shift = lag = params.horizon
            test_start = int(round(rows * (1 - TEST_FRACTION)))
            val_start = test_start - int(round(ctx.validation * test_start))
            bounds = {"train": (0, val_start), "val": (val_start, test_start),
                      "test": (test_start, rows)}
            train_rows = series[:val_start]
            if len(train_rows) < 2:
                raise UserError(f"{path}: too few rows ({rows}) for a training split")
            mean, std = train_rows.mean(0), train_rows.std(0)
            split_starts = {}
            for split, (lo, hi) in bounds.items():
                last = hi - T - shift          # a window and its targets stay inside [lo, hi)
                stride = params.train_stride if split == "train" else T
                split_starts[split] = range(lo, last + 1, stride) if last >= lo else range(0)
            fitted_on = f"training rows 0..{val_start - 1}"
            if params.drop_anomalies:
                if params.dataset not in LABELS:
                    raise UserError(f"drop_anomalies: {params.dataset} has no anomaly labels "
                                    f"(only {', '.join(LABELS)})")
                bad = LABELS[params.dataset](path)[: len(series)]
                if len(bad) != rows:
                    raise UserError(f"{path}: {len(bad)} labels for {rows} rows")
                span = T + shift                # rows s .. s+T+shift-1 feed a window
                split_starts["train"] = [s for s in split_starts["train"]
                                         if not bad[s:s + span].any()]
                dropped = f"training windows touching {int(bad[:val_start].sum())} labelled rows"
        std = torch.where(std > 0, std, torch.ones_like(std))
        z = (series - mean) / std
        sets = {k: _windows(z, list(s), T, shift, mask, targets, change, params.inputs)
                for k, s in split_starts.items()}
        if len(sets["train"][1]) == 0 or len(sets["test"][1]) == 0:
            raise UserError(f"{path}: {rows} rows are too few for windows of {T} steps "
                            f"(+{shift}) in every split")
        # what evaluate() needs beside outputs and targets, per split: in clean value mode the
        # persistence forecast of y[:, t] = z[t + h] is z[t], known here for every position
        shared = {"lag": lag, "predicts_change": change, "target_std": std[targets].float()}
        splits = {}
        for k, s in split_starts.items():
            x, y = sets[k]
            extras = dict(shared)
            if ctx.protocol == "clean" and not change and len(y):
                idx = torch.as_tensor(list(s), dtype=torch.long)[:, None] + torch.arange(T)
                extras["persistence_mse"] = (y - z[idx][..., targets].float()).pow(2).mean().item()
            splits[k] = SplitData(Split(k), x, y, extras)
        out = len(targets)
        return TaskData(
            train=splits["train"], val=splits["val"], test=splits["test"],
            info=TaskInfo(loss=Loss.MSE, output_size=out,
                          input_shape=tuple(sets["train"][0].shape[1:]), sequence=True),
            notes={"file": path.name if params.path else f"{params.dataset}/{path.name}",
                   "rows": rows, "columns": columns, "targets": targets,
                   "windows": {k: len(v[1]) for k, v in sets.items()},
                   "normaliser_fitted_on": fitted_on, "shift": shift,
                   "persistence_lag": lag, "predict": params.predict, "inputs": params.inputs,
                   "dropped": dropped})

    def evaluate(self, output, target, split) -> dict[str, float]:
        extras = split.extras
        err = output - target
        std = extras.get("target_std")
        scale = 1.0 if std is None or std.numel() != target.shape[-1] else std.to(output.device)
        lag = extras.get("lag", 1)
        metrics = {"mse": err.pow(2).mean().item(), "mae": err.abs().mean().item(),
                   "mse_orig": (err * scale).pow(2).mean().item(),
                   "mae_orig": (err * scale).abs().mean().item()}
        if extras.get("predicts_change"):   # the target is the change: persistence forecasts 0
            metrics["persistence_mse"] = target.pow(2).mean().item()
        elif "persistence_mse" in extras:
            metrics["persistence_mse"] = extras["persistence_mse"]
        elif target.dim() == 3 and target.shape[1] > lag:
            metrics["persistence_mse"] = (target[:, lag:] - target[:, :-lag]).pow(2).mean().item()
        return metrics
