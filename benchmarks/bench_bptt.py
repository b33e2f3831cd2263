"""BP through time against a bare PyTorch ``nn.RNN`` loop of the same size, in the same process:
training seconds per epoch of the char-prediction RNN (T 32, one-hot 84, tanh 324, linear
read-out at every step, no biases, Adam, batch 128), interleaved, median of the repeats.

    python benchmarks/bench_bptt.py [--windows 4096] [--repeats 5] [--threads 1] [--hidden 324]

The harness side is the registered ``bp`` plugin's learner (algorithms/_rnn.py's RNNNet, the
toolkit's loss and optimiser) driven by the runner's epoch pattern (a random permutation, index
slices of tensors already on the device, the loss summed on the device). The bare side is
``torch.nn.RNN(nonlinearity="tanh", bias=False)`` + ``nn.Linear(bias=False)``, ``F.cross_entropy``
and ``torch.optim.Adam`` in the same loop. Prints both medians and the ratio (bar: ≤ 1.2).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness.api import Arch, Dense, Recurrent, RunContext, TaskInfo  # noqa: E402
from harness.registry import algorithms, discover  # noqa: E402

BAR = 1.2


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def epoch_seconds(train_step, x, y, batch: int, seed: int, device: str) -> float:
    """One epoch in the runner's pattern; returns its wall time."""
    generator = torch.Generator().manual_seed(seed)
    _sync(device)
    start = time.perf_counter()
    order = torch.randperm(len(y), generator=generator).to(x.device)
    loss_sum = torch.zeros((), device=x.device)
    for i in range(0, len(y), batch):
        idx = order[i:i + batch]
        loss_sum += train_step(x[idx], y[idx])
    float(loss_sum)
    _sync(device)
    return time.perf_counter() - start


def harness_step(arch: Arch, info: TaskInfo, lr: float, device: str, epochs: int):
    discover()
    bp = algorithms.get("bp")
    params = bp.Params(lr=lr, lr_decay="none", label_smoothing=0.0)
    learner = bp.build(arch, info, params, RunContext(device=device, epochs=epochs))
    return lambda xb, yb: learner.train_step(xb, yb)["loss"]


def bare_step(d_in: int, hidden: int, out: int, lr: float, device: str):
    rnn = torch.nn.RNN(d_in, hidden, nonlinearity="tanh", bias=False, batch_first=True).to(device)
    readout = torch.nn.Linear(hidden, out, bias=False).to(device)
    for p in list(rnn.parameters()) + list(readout.parameters()):
        torch.nn.init.normal_(p, 0.0, 0.05)
    optimizer = torch.optim.Adam(list(rnn.parameters()) + list(readout.parameters()), lr=lr)

    def step(xb, yb):
        optimizer.zero_grad(set_to_none=True)
        states, _ = rnn(xb)
        logits = readout(states)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1))
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4096, help="training windows per epoch")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=84)
    parser.add_argument("--hidden", type=int, default=324)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="epochs timed per side (after a "
                        "warm-up epoch each)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = args.device
    T, V, H = args.seq_len, args.vocab, args.hidden
    codes = torch.randint(0, V, (args.windows, T + 1))
    x = F.one_hot(codes[:, :-1], V).float().to(device)
    y = codes[:, 1:].contiguous().to(device)
    arch = Arch("rnn", (T, V), (Recurrent(H), Dense(V, "linear")), V)
    info = TaskInfo(loss="cross_entropy", output_size=V, input_shape=(T, V), sequence=True)
    steps = {"harness BPTT": harness_step(arch, info, 1e-3, device, args.repeats + 1),
             "bare nn.RNN": bare_step(V, H, V, 1e-3, device)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for name, step in steps.items():  # warm-up epoch each (allocations, kernels)
        epoch_seconds(step, x, y, args.batch, 0, device)
    names = list(steps)
    for repeat in range(args.repeats):  # interleaved, so drift in machine load hits both
        for name in names[repeat % 2:] + names[:repeat % 2]:
            times[name].append(epoch_seconds(steps[name], x, y, args.batch, repeat + 1, device))
    print(f"RNN epoch: {args.windows} windows of {T} steps, one-hot {V}, tanh {H}, batch "
          f"{args.batch}, Adam, {args.threads} thread(s), {device}")
    for name in names:
        print(f"  {name:<13} {statistics.median(times[name]):.3f} s/epoch "
              f"(median of {len(times[name])}: {', '.join(f'{t:.3f}' for t in times[name])})")
    ratio = statistics.median(times["harness BPTT"]) / statistics.median(times["bare nn.RNN"])
    print(f"  ratio harness/bare = {ratio:.3f}  (bar: <= {BAR}) {'ok' if ratio <= BAR else 'OVER'}")


if __name__ == "__main__":
    main()
