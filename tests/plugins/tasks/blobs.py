"""A synthetic task for the engine's tests: Gaussian blobs drawn as tiny 1×8×8 images."""
from __future__ import annotations

from dataclasses import dataclass

from harness.api import (Arch, Conv, Dense, Flatten, Pool, Split, SplitData, Task, TaskData,
                         TaskInfo, param)
from harness.registry import tasks


@dataclass(frozen=True)
class BlobParams:
    n_train: int = param(512, "training samples", min=8)
    n_test: int = param(256, "test samples", min=8)
    classes: int = param(4, "number of blobs", min=2)
    noise: float = param(0.8, "std of each blob", min=0.0)
    nan_secondary: bool = param(False, "report the secondary metric as NaN (tests statuses)")


@tasks.register("blobs")
class Blobs(Task):
    """Gaussian blobs as 1×8×8 images (synthetic, for tests)."""

    Params = BlobParams
    metrics = {"accuracy": "max"}

    def presets(self, params, ctx):
        return {"mlp": Arch("mlp", (1, 8, 8), (Flatten(), Dense(32), Dense(params.classes, "linear")),
                            params.classes),
                "cnn": Arch("cnn", (1, 8, 8), (Conv(4, 3, 1), Pool("max", 2), Flatten(), Dense(16),
                                               Dense(params.classes, "linear")), params.classes)}

    def load(self, params, ctx):
        import torch
        g = torch.Generator().manual_seed(1234)
        centres = torch.randn(params.classes, 1, 8, 8, generator=g)
        n = params.n_train + params.n_test
        y = torch.randint(0, params.classes, (n,), generator=g)
        x = centres[y] + params.noise * torch.randn(n, 1, 8, 8, generator=g)
        n_val = int(round(ctx.validation * params.n_train))
        tr, te = slice(n_val, params.n_train), slice(params.n_train, n)
        extras = {"nan_secondary": params.nan_secondary}
        return TaskData(SplitData(Split.TRAIN, x[tr], y[tr], extras),
                        SplitData(Split.VAL, x[:n_val], y[:n_val], extras),
                        SplitData(Split.TEST, x[te], y[te], extras),
                        TaskInfo("cross_entropy", params.classes, (1, 8, 8)))

    def evaluate(self, output, target, split):
        import torch
        majority = torch.bincount(target).max().item() / len(target)
        return {"accuracy": 100.0 * (output.argmax(-1) == target).float().mean().item(),
                "majority_accuracy": float("nan") if split.extras["nan_secondary"]
                else 100.0 * majority}
