"""Roofline of the learning rules: each rule's training epoch, timed inside the harness, beside
the matrix work that rule computes, as a fraction of this machine's matmul peak.

    python benchmarks/bench_roofline.py [--threads 2] [--repeats 3] [--epochs 2] [--scale 1]
        [--archs mnist_mlp,mnist_cnn,fmnist_cnn,chars_rnn]
        [--algorithms bp,fa,dfa,dll,dll_fa,pc,dtp] [--json] [--check-counts] [--breakdown]

For each arch (MNIST MLP 784-1024-512-256-10 at batch 128; the ``cnn`` presets of ``mnist``
and ``fashion_mnist`` at batch 64; the ``chars`` task's ``rnn`` preset on Moby-Dick, hidden 324,
vocabulary 84, windows of 32, batch 32) and each rule that supports it, it prints

* ``epoch_s`` — training seconds of one epoch of a subset, measured by the runner's own clock
  (``harness.runner.execute`` on a RunSpec, as ``_timing.py`` does), the fastest of the epochs
  after each run's first (warm-up) epoch, and their median; the rules are interleaved and
  rotated each repeat, so that drift in the machine's load hits them alike;
* ``gflop`` — the analytic count of the matrix and convolution work *that rule computes* per
  epoch of that subset (2 FLOP per multiply-add), derived from the architecture spec
  (``harness.toolkit.layer_shapes``) by one function per rule (the formulas are at those
  functions; ``--check-counts`` compares each with the matrix FLOPs torch's dispatcher sees in
  one training step: equal, but for the RNN's h_0 = 0 step). Pooling, activations, losses,
  the value-node and target arithmetic and the optimiser step are elementwise, not matrix
  work: they are excluded, so a rule whose time is far above its count spends it there (or in
  small, inefficient products);
* ``peak_fraction`` = (gflop / epoch_s) / peak, with peak the GFLOP/s of a 1024³ float32
  ``torch.mm`` measured in the same process with the same threads (best of 20 after warm-up,
  taken before and after the runs; the higher is used, both are printed);
* ``vs_bp`` = epoch_s / BP's epoch_s on the same arch, beside ``op_ratio`` = gflop / BP's gflop:
  time ratio against operation-count ratio.

``--breakdown`` profiles one training step per rule instead (``torch.profiler``): the matrix
kernels' own time and rate, which is the ceiling of the step's peak fraction, against the
share of the step spent outside them and the biggest ops there — where a rule's time goes.

It also prints an estimate of the CPU time of the paper grid (``suites/paper_table.yaml``) on
the image sets this machine has offline (MNIST and FashionMNIST × MLP and CNN × its rules × 4
seeds; 20 epochs for the MLPs, 50 for the CNNs), from these epoch times scaled to the 54,000
training images — always (it costs nothing); with ``--json`` it goes to stderr with the rest of
the human-readable output, and stdout holds only the JSON list
``[{arch, algorithm, epoch_s, gflop, peak_fraction, vs_bp, op_ratio}, …]``.

Subsets (``--scale`` multiplies them): 6,000 MNIST images for the MLP, 2,000 for the MNIST CNN,
1,500 for the FashionMNIST CNN, the first 48,000 characters of Moby-Dick for the RNN (about
1,150 training windows). The default run takes about 3-4 minutes on a 2-core machine; its wall
time is printed at the end. Real data where prepared (``BENCH_DATA_DIR``); Moby-Dick, when not
prepared (``python bench.py data --fetch moby_dick``), is replaced by random text of the same
84-symbol vocabulary, i.e. random one-hot tensors of the same shape (same time), and the output
says so. Rules run at their default parameters.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _timing import ROOT  # puts the project on sys.path

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_map  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

from harness import params as P  # noqa: E402
from harness.api import Arch, Conv, Dense, Recurrent, RunContext, RunSpec  # noqa: E402
from harness.data import DATASETS, default_data_dir, verify  # noqa: E402
from harness.registry import algorithms, discover, tasks  # noqa: E402
from harness.runner import execute  # noqa: E402
from harness.toolkit import layer_shapes  # noqa: E402

RULES = ("bp", "fa", "dfa", "dll", "dll_fa", "pc", "dtp")


@dataclass(frozen=True)
class ArchCase:
    label: str
    task: str
    preset: str
    batch: int
    subset: int          # training images, or characters of the text (RNN)


ARCHS = {
    "mnist_mlp": ArchCase("MNIST MLP", "mnist", "mlp", 128, 6000),
    "mnist_cnn": ArchCase("MNIST CNN", "mnist", "cnn", 64, 2000),
    "fmnist_cnn": ArchCase("FashionMNIST CNN", "fashion_mnist", "cnn", 64, 1500),
    "chars_rnn": ArchCase("char RNN (Moby-Dick)", "chars", "rnn", 32, 48000),
}
VALIDATION = 0.005   # held out of the training set and evaluated each epoch (off the clock):
TEST_SUBSET = 250    # kept small so that evaluation costs little wall time


# --------------------------------------------------------------------------------------------
# The matrix work of the network: its products, per sample
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Product:
    """One matrix or convolution product of the forward pass, per sample (per window for the
    RNN: all its time steps). ``below``: an error goes down through it (every weighted layer
    but the first; the RNN's W_h, through time, and its read-out W_y), i.e. its input gradient
    exists in BP."""

    name: str
    macs: int
    below: bool
    readout: bool = False    # the RNN's per-step read-out W_y


def products(arch: Arch) -> list[Product]:
    """Dense: rows · in · out MACs (rows = time steps for a per-step read-out, else 1);
    conv: out_h · out_w · filters · in_channels · k²; recurrent over S steps: S · D·H (W_x, the
    input drive) + S · H·H (W_h). Pooling, flattening and activations are not matrix work."""
    out: list[Product] = []
    for layer, in_shape, out_shape in layer_shapes(arch):
        first = not out
        if isinstance(layer, Dense):
            rows = math.prod(in_shape[:-1])
            out.append(Product(f"dense{layer.units}", rows * in_shape[-1] * layer.units,
                               not first, readout=len(in_shape) == 2))
        elif isinstance(layer, Conv):
            filters, h, w = out_shape
            out.append(Product(f"conv{layer.filters}k{layer.kernel}",
                               h * w * filters * in_shape[0] * layer.kernel ** 2, not first))
        elif isinstance(layer, Recurrent):
            steps, d = in_shape
            out.append(Product("W_x", steps * d * layer.hidden, not first))
            out.append(Product("W_h", steps * layer.hidden * layer.hidden, True))
    return out


def hidden_output_sizes(arch: Arch) -> list[int]:
    """Per-sample output size of every weighted layer but the output layer (DFA's targets)."""
    sizes = [math.prod(o) for layer, _, o in layer_shapes(arch)
             if isinstance(layer, (Dense, Conv, Recurrent))]
    return sizes[:-1]


def _sums(arch: Arch) -> tuple[int, int]:
    ps = products(arch)
    return sum(p.macs for p in ps), sum(p.macs for p in ps if p.below)


# --------------------------------------------------------------------------------------------
# One function per rule: multiply-adds per sample. F = Σ forward products, U = Σ of those with
# an error below (F minus the first weighted layer's).
# --------------------------------------------------------------------------------------------

def macs_bp(arch: Arch, p) -> int:
    """BP = forward F + input gradients U (none below the first weighted layer) + weight
    gradients F = 2F + U. RNN (BPTT): the input gradients are the errors through W_h (back in
    time) and W_y; none to the one-hot input."""
    f, u = _sums(arch)
    return 2 * f + u


def macs_fa(arch: Arch, p) -> int:
    """FA = BP's count: the errors go down through fixed B (of Wᵀ's shape) instead of Wᵀ."""
    return macs_bp(arch, p)


def macs_dfa(arch: Arch, p) -> int:
    """DFA = forward F + weight gradients F + the projections e·B_i of the output error to each
    hidden layer i: outputs × size_i (RNN: per step V·H); no input gradients."""
    f, _ = _sums(arch)
    return 2 * f + sum(arch.output_size * size for size in hidden_output_sizes(arch))


def macs_dll(arch: Arch, p) -> int:
    """DLL = forward F + error sweep through Θ (U: ξ_i = g_i Θ_i, no Θ at the first layer)
    + ΔW (F) + ΔΘ (U: ⟨g_iᵀ ξ_i⟩) = 2F + 2U; RNN the same through Θ_h, Θ_y. DLL-FA
    (Θ frozen) has no ΔΘ: 2F + U."""
    f, u = _sums(arch)
    return 2 * f + (2 * u if p.theta == "learn" else u)


def macs_dll_fa(arch: Arch, p) -> int:
    """DLL-FA = forward + error sweep through the frozen Θ + ΔW = 2F + U (BP's count)."""
    return macs_dll(arch, p)


def macs_pc(arch: Arch, p) -> int:
    """PC, what ``algorithms.pc.inference`` computes with T = inference_steps:

    standard (re-predicting), feed-forward (``layered_inference``), with weighted layers
    P_0 … P_d (one per block; d value nodes) and the nodes starting at the forward pass: the
    forward F; at step s the state backward passes of the blocks that carry error,
    P_j for j ≥ max(d − s, 1), and (s ≥ 1) the re-predictions of the blocks whose input node has
    moved, j ≥ max(d − s + 1, 1); at the final nodes the re-predictions j ≥ max(d − T + 1, 1)
    and the weight products of the blocks with error, j ≥ max(d − T, 0). With T ≥ d that is
    the dense schedule's 3F + (2T − 1)U less the products an error meets before it reaches the
    bottom and the first layer's prediction at the final nodes (its input never moves).
    RNN: init = the states without graph (F − read-out) + the predictions (F); T backward
    (U = W_h, W_y); T−1 re-predictions (F: x·W_xᵀ is recomputed each time); final predictions
    (F) and weight products (F): (4 + T−1)F − R + T·U.
    fixed_predictions: init as above, T backward on the kept graph, weight products; no
    re-predictions, no final forward."""
    f, u = _sums(arch)
    steps, fixed = p.inference_steps, p.fixed_predictions
    readout = sum(q.macs for q in products(arch) if q.readout)
    init = f if arch.kind != "rnn" else 2 * f - readout
    if fixed:
        return init + steps * u + f
    if arch.kind == "rnn":
        return init + steps * u + max(steps - 1, 0) * f + f + f
    layer = [q.macs for q in products(arch)]
    depth = len(layer) - 1

    def above(j: int) -> int:          # P_j + … + P_d
        return sum(layer[max(j, 0):])

    work = f
    for s in range(steps):
        work += above(max(depth - s, 1)) + (above(max(depth - s + 1, 1)) if s else 0)
    return work + above(max(depth - steps + 1, 1)) + above(max(depth - steps, 0))


def macs_dtp(arch: Arch, p) -> int:
    """DTP (MLP), what ``algorithms.dtp.DTPLearner.train_step`` computes, with k =
    inverse_updates and the inverses V_i on layers 2…L (U): forward F; per inverse update
    f_i(h_i + ε) (U), g_i of it (U) and ∂V (U) = 3U; targets t_i = g_i(t_{i+1}) + h_i −
    g_i(h_{i+1}) = 2U; local forward-weight gradients F. Total 2F + (2 + 3k)U.

    CNN (``algorithms._dtp_conv``, k = feedback_updates on m of the batch's N samples): forward
    F, the target differences through the feedback kernels U, forward-weight gradients F, and
    per feedback update the noisy input's conv and the L-DRL contraction on m samples,
    2(m/N)U (the output-noise weights, a one-channel contraction, are under 1 %): 2F + U +
    2k(m/N)U."""
    f, u = _sums(arch)
    if arch.kind == "cnn":
        fraction = 1.0 if not p.feedback_samples else min(1.0, p.feedback_samples / 64)
        return round(2 * f + u + 2 * p.feedback_updates * fraction * u)
    return 2 * f + (2 + 3 * p.inverse_updates) * u


MACS = {"bp": macs_bp, "fa": macs_fa, "dfa": macs_dfa, "dll": macs_dll, "dll_fa": macs_dll_fa,
        "pc": macs_pc, "dtp": macs_dtp}


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------

def matmul_peak(threads: int, size: int = 1024, repeats: int = 20, warmup_s: float = 1.5) -> float:
    """GFLOP/s of a size³ float32 torch.mm, best of ``repeats`` after ``warmup_s`` seconds of
    the same products (a cold process reaches its speed only after about a second here)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        torch.mm(a, b, out=out)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def random_text(path: Path, chars: int, symbols: int, seed: int = 0) -> None:
    """Random text of ``chars`` characters over ``symbols`` − 1 letters (the vocabulary adds
    the unknown symbol): the chars task turns it into one-hot tensors of Moby-Dick's shape."""
    generator = torch.Generator().manual_seed(seed)
    alphabet = [chr(0x100 + i) for i in range(symbols - 1)]
    codes = torch.randint(len(alphabet), (chars,), generator=generator).tolist()
    path.write_text("".join(alphabet[c] for c in codes), encoding="utf-8")


class Case:
    """One arch: its RunSpec template, ready to time any rule."""

    def __init__(self, key: str, case: ArchCase, scale: float, scratch: Path):
        self.key, self.case = key, case
        self.task = tasks.get(case.task)
        self.note = ""
        self.label = case.label
        self.missing = ""
        subset = max(1, int(round(case.subset * scale)))
        if case.task == "chars":
            values = {"corpus": "moby_dick", "max_chars": max(subset, 1000)}
            if not verify(DATASETS["moby_dick"], default_data_dir())[0]:
                fake = scratch / "random_chars.txt"
                random_text(fake, values["max_chars"], 84)
                values = {"corpus": "file", "path": str(fake), "max_chars": values["max_chars"]}
                self.label = "char RNN (random one-hot, NOT Moby-Dick)"
                self.note = ("Moby-Dick is not prepared (python bench.py data --fetch "
                             "moby_dick): the RNN ran on random one-hot characters of the same "
                             "shape (84 symbols, windows of 32)")
        else:
            values = {"train_subset": subset, "test_subset": TEST_SUBSET}
            dataset = DATASETS[self.task.datasets(P.build(self.task.Params,
                                                          P.resolve(self.task.Params, {})))[0]]
            if not verify(dataset, default_data_dir())[0]:
                self.missing = (f"{dataset.name} is not prepared in {default_data_dir()} "
                                f"(python bench.py data --fetch {dataset.name})")
        self.task_params = P.resolve(self.task.Params, values)
        self.arch = self.task.presets(P.build(self.task.Params, self.task_params),
                                      RunContext())[case.preset]

    def unsupported(self, name: str) -> str:
        alg = algorithms.get(name)
        return alg.unsupported(self.arch, P.build(alg.Params, P.resolve(alg.Params, {}))) or ""

    def run(self, name: str, epochs: int, threads: int, seed: int) -> tuple[list[float], int]:
        """(training seconds of each epoch after the first, training samples per epoch)."""
        alg = algorithms.get(name)
        spec = RunSpec(algorithm=algorithms.canonical(name), params=P.resolve(alg.Params, {}),
                       task=self.case.task, task_params=self.task_params, arch=self.arch,
                       seed=seed, epochs=epochs, batch_size=self.case.batch, device="cpu",
                       protocol="clean", validation=VALIDATION,
                       algorithm_version=alg.version, task_version=self.task.version)
        result = execute(spec, str(default_data_dir()), threads=threads)
        if result.status not in ("ok", "diverged"):
            raise SystemExit(f"{name} on {self.key} failed: {result.reason}\n{result.traceback}")
        notes = result.notes
        n = notes["windows"]["train"] if "windows" in notes else notes["n_train"]
        times = [e.train_time_s for e in result.epochs if not e.warmup]
        if not times:
            raise SystemExit(f"{name} on {self.key}: no epoch after the warm-up "
                             f"({result.status}: {result.reason})")
        return times, n


def measure(cases: list[Case], rules: tuple[str, ...], repeats: int, epochs: int, threads: int,
            log) -> tuple[dict, dict, list[str]]:
    """times[(arch, rule)] = epoch seconds, samples[arch] = samples per epoch, skip lines."""
    times: dict = {}
    samples: dict = {}
    skipped: list[str] = []
    for case in cases:
        if case.missing:
            skipped.append(f"{case.key}: skipped, {case.missing}")
            continue
        names = []
        for name in rules:
            reason = case.unsupported(name)
            if reason:
                skipped.append(f"{name} on {case.key}: skipped, {reason}")
            else:
                names.append(name)
        for repeat in range(repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                values, n = case.run(name, epochs, threads, seed=repeat)
                times.setdefault((case.key, name), []).extend(values)
                samples[case.key] = n
                log(f"  {case.key:<10} {name:<7} repeat {repeat + 1}/{repeats}: "
                    + ", ".join(f"{v:.3f}" for v in values) + " s")
    return times, samples, skipped


class MatrixFlops(TorchDispatchMode):
    """A dispatch mode whose ``total`` adds up the matrix FLOPs of every op run under it (mm,
    addmm, bmm, convolution and their backward, by ``torch.utils.flop_counter``'s formulas).
    Unlike ``FlopCounterMode`` it tracks no modules, so it counts inside
    ``torch.autograd.grad`` too (PC's and DTP's local products)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*tree_map(_shape, args), **tree_map(_shape, kwargs),
                                out_val=tree_map(_shape, result))
        return result


def _shape(t):
    return t.shape if isinstance(t, torch.Tensor) else t


def _learners(cases: list[Case], rules: tuple[str, ...]):
    """(case, rule name, its default params, the task's data, a learner seeded 0) for every arch
    with its data and every rule that supports it."""
    for case in cases:
        if case.missing:
            continue
        ctx = RunContext(validation=VALIDATION, data_dir=str(default_data_dir()),
                         batch_size=case.case.batch, epochs=2)
        data = case.task.load(P.build(case.task.Params, case.task_params), ctx)
        for name in rules:
            if case.unsupported(name):
                continue
            alg = algorithms.get(name)
            p = P.build(alg.Params, P.resolve(alg.Params, {}))
            torch.manual_seed(0)
            yield case, name, p, data, alg.build(case.arch, data.info, p, ctx)


def check_counts(cases: list[Case], rules: tuple[str, ...], out) -> None:
    """The analytic count of each rule against the matrix FLOPs torch's dispatcher sees in one
    training step (mm, addmm, bmm, convolution and their backward, counted by
    ``torch.utils.flop_counter``'s formulas), on one batch of real (or random) data."""
    table = []
    for case, name, p, data, learner in _learners(cases, rules):
        x, y = data.train.x[:case.case.batch], data.train.y[:case.case.batch]
        learner.train_step(x, y)
        with MatrixFlops() as counter:
            learner.train_step(x, y)
        analytic = 2 * MACS[name](case.arch, p) * len(y)
        table.append([case.key, name, f"{counter.total / 1e6:.2f}", f"{analytic / 1e6:.2f}",
                      f"{analytic / counter.total:.4f}"])
    print("matrix MFLOP of one training step: torch's dispatcher vs this script's count",
          file=out)
    headers = ["arch", "rule", "dispatched", "analytic", "analytic/dispatched"]
    print(tabulate(table, headers=headers, tablefmt="github", disable_numparse=True), file=out)
    print("(the RNN count includes the h_0 = 0 step's H·H product, which BP, FA and DLL's ΔΘ_h "
          "skip: ≤ 2.2% over)", file=out)


# the kernels of the matrix work (their self time is the time of the products themselves)
MATRIX_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::mkldnn_convolution",
              "aten::convolution_backward", "aten::_convolution_pointwise")


def breakdown(cases: list[Case], rules: tuple[str, ...], threads: int, peak: float,
              out, steps: int = 20) -> None:
    """Where one training step's time goes: the matrix kernels' own time and rate (what the step
    could reach if everything else cost nothing: ``ceiling``), and the biggest other ops. The
    step's wall time over ``steps`` steps after five warm-up steps (timed before and after
    the profiled pass), the same steps under ``torch.profiler`` for the ops' self times; the runner's Stepper and layout, one
    batch of real (or random) data, the rule's default parameters."""
    from torch.profiler import ProfilerActivity, profile

    from harness.nets import prefer_channels_last
    from harness.runner import Stepper
    measured = []
    for case, name, p, data, learner in _learners(cases, rules):
        batch = case.case.batch
        x, y = data.train.x, data.train.y
        if algorithms.get(name).channels_last and prefer_channels_last(
                learner, case.arch, torch.device("cpu")) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        stepper = Stepper(learner, p, 2)
        starts = [(i * batch) % (len(y) - batch + 1) for i in range(steps + 5)]
        for start in starts[:5]:
            stepper.step(x[start:start + batch], y[start:start + batch])
        def timed() -> float:               # wall ms per step, without the profiler's cost
            began = time.perf_counter()
            for start in starts[5:]:
                stepper.step(x[start:start + batch], y[start:start + batch])
            return (time.perf_counter() - began) * 1e3 / steps
        first = timed()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for start in starts[5:]:
                stepper.step(x[start:start + batch], y[start:start + batch])
        total = (first + timed()) / 2       # the timed passes bracket the profiled one
        ops = [(e.key, e.self_cpu_time_total / 1e3 / steps) for e in prof.key_averages()]
        matrix = sum(ms for key, ms in ops if key in MATRIX_OPS)
        others = sorted(((ms, key) for key, ms in ops if key not in MATRIX_OPS),
                        reverse=True)[:3]
        gflop = 2 * MACS[name](case.arch, p) * batch / 1e9
        measured.append((case.key, name, total, matrix, gflop, others))
    before = peak
    peak = max(before, matmul_peak(threads))     # the higher of before and after, as the table
    table = [[key, name, f"{total:.2f}", f"{matrix:.2f}",
              f"{gflop / (matrix / 1e3) / peak:.2f}" if matrix else "–",
              f"{gflop / (total / 1e3) / peak:.2f}",
              f"{1 - matrix / total:.0%}" if matrix <= total else "– (noisy)",
              ", ".join(f"{op.removeprefix('aten::')} {ms / total:.0%}" for ms, op in others)]
             for key, name, total, matrix, gflop, others in measured]
    print(f"Breakdown of one training step ({threads} threads, {steps} steps after 5 warm-up "
          f"steps, timed, then again under torch.profiler for the ops' self times; default "
          f"parameters; matmul peak {before:.1f} GFLOP/s before, the higher of it and after: "
          f"{peak:.1f}). step_ms: wall time per step; matrix_ms: "
          f"the matrix kernels' self time ({', '.join(MATRIX_OPS)}); matrix_rate: the rule's "
          f"matrix work over matrix_ms, as a fraction of the peak (its ceiling: the step's "
          f"peak fraction if all else cost nothing); step_rate: over step_ms; other: the "
          f"step's share outside the matrix kernels (other ops, Python between them), and its "
          f"three biggest ops (their self time over step_ms). step_ms is the mean of two timed "
          f"passes around the profiled one; 'noisy' where the matrix kernels alone took longer "
          f"than that (the machine was not quiet: rerun).", file=out)
    print(tabulate(table, headers=["arch", "rule", "step_ms", "matrix_ms", "matrix_rate",
                                   "step_rate", "other", "biggest others"],
                   tablefmt="github", disable_numparse=True), file=out)


# --------------------------------------------------------------------------------------------
# The paper grid's cost from these epoch times
# --------------------------------------------------------------------------------------------

GRID_TRAIN = 54000          # 60,000 images less the 10% validation split
GRID_SEEDS = 4
GRID_EVAL = 0.10            # evaluation of val and test after each epoch, ≈ 10% on top
# (task, arch measured for it, epochs): FashionMNIST's MLP is the same network as MNIST's
GRID_CELLS = (("mnist/mlp", "mnist_mlp", 20), ("fashion_mnist/mlp", "mnist_mlp", 20),
              ("mnist/cnn", "mnist_cnn", 50), ("fashion_mnist/cnn", "fmnist_cnn", 50))
# the suite's rows and the measured rule whose time stands in for each: dll-released is Θ
# frozen on the MLP (DLL-FA's work), Θ learned on the CNN (DLL's)
GRID_ROWS = {"bp": "bp", "dll": "dll", "dll-released": {"mlp": "dll_fa", "cnn": "dll"},
             "dll_fa": "dll_fa", "fa": "fa", "dfa": "dfa", "pc": "pc", "dtp": "dtp"}


def preset_case(key: str) -> "Case":
    return Case(key, ARCHS[key], 1.0, Path(tempfile.gettempdir()))


def grid_estimate(times: dict, samples: dict, threads: int) -> list[str]:
    total, missing = 0.0, []
    for cell, key, epochs in GRID_CELLS:
        kind = cell.split("/")[1]
        for row, stand_in in GRID_ROWS.items():
            rule = stand_in[kind] if isinstance(stand_in, dict) else stand_in
            if preset_case(key).unsupported(rule):
                continue        # the suite records it as skipped: no time
            if (key, rule) not in times:
                missing.append(f"{row} {cell}")
                continue
            per_image = statistics.median(times[(key, rule)]) / samples[key]
            total += GRID_SEEDS * epochs * per_image * GRID_TRAIN * (1 + GRID_EVAL)
    hours = total / 3600
    lines = [f"paper grid (images only, offline data): ≈ {hours:.0f} CPU-hours at --threads "
             f"{threads}",
             f"  assumptions: one run at a time with {threads} threads ({hours * threads:.0f} "
             f"core-hours), median subset epoch times scaled linearly to {GRID_TRAIN:,} images, "
             f"{GRID_SEEDS} seeds × 20 (MLP) / 50 (CNN) epochs, +{GRID_EVAL:.0%} for "
             f"evaluation, FashionMNIST MLP timed as the MNIST MLP at batch 128 (the suite runs "
             f"it at 64), dll-released as dll_fa (MLP) / dll (CNN)"]
    if missing:
        lines.append(f"  PARTIAL: {len(missing)} of the grid's rows were not measured here and "
                     f"are left out ({', '.join(missing[:6])}{', …' if len(missing) > 6 else ''})")
    return lines


# --------------------------------------------------------------------------------------------

def _busy_ticks() -> tuple[float, float]:
    """(CPU seconds the whole machine spent busy, incl. steal; this process's own CPU seconds)."""
    import resource
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        busy = math.nan
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return busy, usage.ru_utime + usage.ru_stime


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _names(text: str, valid, what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise SystemExit(f"--{what}: unknown {', '.join(bad) or '(none)'}; valid: "
                         f"{', '.join(valid)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated: "
                        + ", ".join(ARCHS))
    parser.add_argument("--algorithms", default=",".join(RULES), help="comma-separated: "
                        + ", ".join(RULES))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per rule")
    parser.add_argument("--epochs", type=int, default=2,
                        help="epochs per run; the first is warm-up (not timed)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the subset sizes")
    parser.add_argument("--check-counts", action="store_true",
                        help="compare each rule's analytic count with the matrix FLOPs torch "
                        "dispatches in one training step, then exit (no timing)")
    parser.add_argument("--breakdown", action="store_true",
                        help="profile one training step per rule instead of timing epochs: "
                        "the matrix kernels' time and rate against the rest, then exit")
    parser.add_argument("--json", action="store_true",
                        help="JSON list on stdout (everything else on stderr)")
    args = parser.parse_args()
    if args.epochs < 2 or args.repeats < 1 or args.threads < 1:
        raise SystemExit("--epochs must be ≥ 2 (one warm-up), --repeats and --threads ≥ 1")
    arch_keys = _names(args.archs, tuple(ARCHS), "archs")
    rules = _names(args.algorithms, RULES, "algorithms")
    wall = time.perf_counter()
    out = sys.stderr if args.json else sys.stdout

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    load_before, busy_before = os.getloadavg()[0], _busy_ticks()
    discover()
    torch.set_num_threads(args.threads)
    if args.check_counts:
        with tempfile.TemporaryDirectory() as scratch:
            cases = {k: Case(k, ARCHS[k], 0.05, Path(scratch)) for k in arch_keys}
            check_counts(list(cases.values()), rules, out)
        return
    peak_before = matmul_peak(args.threads)
    if args.breakdown:
        with tempfile.TemporaryDirectory() as scratch:
            cases = {k: Case(k, ARCHS[k], 0.2, Path(scratch)) for k in arch_keys}
            breakdown(list(cases.values()), rules, args.threads, peak_before, out)
        return
    log(f"matmul peak (1024³ float32 torch.mm, {args.threads} threads): {peak_before:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory() as scratch:
        cases = {k: Case(k, ARCHS[k], args.scale, Path(scratch)) for k in arch_keys}
        times, samples, skipped = measure(list(cases.values()), rules, args.repeats,
                                          args.epochs, args.threads, log)
    peak_after = matmul_peak(args.threads)
    peak = max(peak_before, peak_after)
    busy_after, load_after = _busy_ticks(), os.getloadavg()[0]
    elapsed = time.perf_counter() - wall
    others = (busy_after[0] - busy_before[0]) - (busy_after[1] - busy_before[1])

    def gflop_of(name: str, case: Case, n: int) -> float:
        alg = algorithms.get(name)
        return 2 * MACS[name](case.arch, P.build(alg.Params, P.resolve(alg.Params, {}))) * n / 1e9

    rows, table = [], []
    for key, case in cases.items():
        bp_times = times.get((key, "bp"))
        bp_gflop = gflop_of("bp", case, samples[key]) if bp_times else None
        for name in rules:
            if (key, name) not in times:
                continue
            gflop = gflop_of(name, case, samples[key])
            fastest, mid = min(times[(key, name)]), statistics.median(times[(key, name)])
            fraction = gflop / fastest / peak
            vs_bp = fastest / min(bp_times) if bp_times else None
            vs_bp_mid = mid / statistics.median(bp_times) if bp_times else None
            op_ratio = gflop / bp_gflop if bp_gflop else None
            rows.append({"arch": key, "algorithm": name, "epoch_s": round(fastest, 4),
                         "gflop": round(gflop, 3), "peak_fraction": round(fraction, 4),
                         "vs_bp": None if vs_bp is None else round(vs_bp, 3),
                         "op_ratio": None if op_ratio is None else round(op_ratio, 3)})
            table.append([key, name, f"{fastest:.3f}", f"{mid:.3f}", f"{gflop:.2f}",
                          f"{gflop / fastest:.1f}", f"{fraction:.2f}",
                          "" if vs_bp is None else f"{vs_bp:.2f}",
                          "" if vs_bp_mid is None else f"{vs_bp_mid:.2f}",
                          "" if op_ratio is None else f"{op_ratio:.2f}"])

    n_epochs = args.repeats * (args.epochs - 1)
    print(f"Roofline: training epochs timed by the harness, {args.threads} threads, cpu, torch "
          f"{torch.__version__}, code at {_git_commit()}", file=out)
    print(f"matmul peak (1024³ float32 torch.mm, best of 20): {peak_before:.1f} GFLOP/s before "
          f"the runs, {peak_after:.1f} after; peak = {peak:.1f}", file=out)
    cores = os.cpu_count() or 1
    print(f"machine load: 1-min load average {load_before:.2f} before, {load_after:.2f} after; "
          f"other processes (and steal) used {others:.0f} CPU-s during the run "
          f"({others / elapsed / cores:.0%} of {cores} cores)", file=out)
    if abs(peak_after - peak_before) > 0.15 * peak or others > 0.05 * elapsed * cores:
        print("WARNING: the machine was not quiet (peaks differ by > 15% or other processes "
              "used > 5% of it): the times may be disturbed; rerun", file=out)
    for key, case in cases.items():
        if key in samples:
            unit = "windows of 32 characters" if case.case.task == "chars" else "images"
            print(f"  {key}: {case.label}, {case.arch.describe()}, batch {case.case.batch}, "
                  f"{samples[key]:,} {unit} per epoch", file=out)
        if case.note:
            print(f"  NOTE: {case.note}", file=out)
    print(f"epoch_s: fastest of {n_epochs} timed epochs ({args.repeats} interleaved runs × "
          f"{args.epochs - 1} after a warm-up epoch); median beside it. gflop: the rule's matrix/"
          f"conv work per epoch (2 FLOP per multiply-add; pooling, activations, losses and the "
          f"optimiser step excluded). vs_bp: fastest/fastest (median/median beside it); "
          f"op_ratio: gflop / BP's gflop.", file=out)
    print(tabulate(table, headers=["arch", "rule", "epoch_s", "median_s", "gflop", "GFLOP/s",
                                   "peak_fraction", "vs_bp", "vs_bp_med", "op_ratio"],
                   tablefmt="github", disable_numparse=True), file=out)
    for line in skipped:
        print(line, file=out)
    print(file=out)
    for line in grid_estimate(times, samples, args.threads):
        print(line, file=out)
    print(f"wall time: {time.perf_counter() - wall:.0f} s", file=out)
    if args.json:
        json.dump(rows, sys.stdout, indent=1, ensure_ascii=False)
        print()


if __name__ == "__main__":
    main()
