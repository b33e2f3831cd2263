"""DTP (conv path, L-DRL feedback) against BP on the paper CNNs: training seconds per epoch,
each timed by the harness's own clock, in the same process, interleaved; beside the ratio, the
operation count of algorithms/_dtp_conv.py's docstring computed from the layer shapes.

    python benchmarks/bench_dtp_cnn.py [--task mnist] [--subset 2000] [--repeats 3] [--threads 1]

Batch 64, Adam, each algorithm at its default parameters. Multiply-accumulates per sample:
BP = 3F − F_0 (forward, weight gradients, input gradients of every layer above the first);
DTP = 3F − F_0 + 2k(m/N)(F − F_0) (forward, weight gradients, target differences, and per
feedback update one noisy conv and one weight contraction per layer above the first, on
m = feedback_samples of the N = 64 samples), with F the forward MACs and F_0 those of the first
weighted layer.
"""
from __future__ import annotations

import argparse
import math

from _timing import interleaved_epoch_times, median

from algorithms.dtp import DTPParams  # noqa: E402  (_timing put the repository on sys.path)
from harness import params as P  # noqa: E402
from harness.api import Conv, Dense, RunContext  # noqa: E402
from harness.registry import discover, tasks  # noqa: E402
from harness.toolkit import layer_shapes  # noqa: E402


def forward_macs(arch) -> list[int]:
    """Multiply-accumulates per sample of each weighted layer's forward pass."""
    macs = []
    for layer, in_shape, out_shape in layer_shapes(arch):
        if isinstance(layer, Conv):
            macs.append(math.prod(out_shape) * in_shape[0] * layer.kernel ** 2)
        elif isinstance(layer, Dense):
            macs.append(in_shape[-1] * layer.units)
    return macs


def op_counts(arch, feedback_updates: int, fraction: float = 1.0) -> tuple[float, float]:
    macs = forward_macs(arch)
    total, first = sum(macs), macs[0]
    bp = 3 * total - first
    return bp, bp + 2 * feedback_updates * fraction * (total - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist")
    parser.add_argument("--subset", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="per repeat; the first is warm-up")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    discover()
    task = tasks.get(args.task)
    arch = task.presets(P.build(task.Params, P.resolve(task.Params, {})), RunContext())["cnn"]
    names = ("bp", "dtp")
    times = interleaved_epoch_times(names, "cnn", task=args.task, repeats=args.repeats,
                                    train_subset=args.subset, epochs=args.epochs,
                                    threads=args.threads, device=args.device, batch_size=64)
    k, m = DTPParams().feedback_updates, DTPParams().feedback_samples
    fraction = 1.0 if not m else min(1.0, m / 64)
    bp_ops, dtp_ops = op_counts(arch, k, fraction)
    print(f"{args.task} CNN ({arch.describe()}), epoch of {args.subset} images, batch 64, "
          f"Adam, {args.threads} thread(s), {args.device}")
    for name in names:
        print(f"  {name:<4} {median(times[name]):.3f} s/epoch (median of {len(times[name])}: "
              + ", ".join(f"{t:.3f}" for t in times[name]) + ")")
    ratio = median(times["dtp"]) / median(times["bp"])
    print(f"  ratio dtp/bp = {ratio:.2f}  (operation count with {k} feedback update(s) per "
          f"batch on {m or 64} of 64 samples: {dtp_ops / 1e6:.2f} M / {bp_ops / 1e6:.2f} M MACs "
          f"per sample = {dtp_ops / bp_ops:.2f})")


if __name__ == "__main__":
    main()
