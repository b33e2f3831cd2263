"""BP through time in the harness against a bare PyTorch ``nn.RNN`` loop of the same size:
training seconds per epoch on next-character prediction (Moby-Dick, or random characters of
its vocabulary when it is not prepared), same process, interleaved.

    python benchmarks/bench_bptt.py [--chars 100000] [--repeats 3] [--threads 1] [--device cpu]

The harness run is BP on the chars task's ``rnn`` preset (hidden 324, T 32, Adam), timed by
the runner's own clock; the bare loop is ``nn.RNN(tanh, no bias) + nn.Linear(no bias)`` with
Adam on the same tensors, batch size and shuffling. Prints the medians and the ratio (bar:
harness / bare <= 1.2).
"""
from __future__ import annotations

import argparse
import statistics
import time

from _timing import ROOT  # noqa: F401  (puts the project on sys.path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness import params as P  # noqa: E402
from harness.api import RunContext, RunSpec  # noqa: E402
from harness.data import DATASETS, default_data_dir, verify  # noqa: E402
from harness.registry import algorithms, discover, tasks  # noqa: E402
from harness.runner import execute  # noqa: E402

BAR = 1.2


def harness_times(task_params, arch, epochs, batch, threads, device, seed):
    spec = RunSpec(algorithm="bp", params=P.resolve(algorithms.get("bp").Params, {}),
                   task="chars", task_params=task_params, arch=arch, seed=seed, epochs=epochs,
                   batch_size=batch, device=device, protocol="clean", validation=0.05)
    result = execute(spec, str(default_data_dir()), threads=threads)
    if result.status != "ok":
        raise SystemExit(f"harness run failed: {result.reason}\n{result.traceback}")
    return [e.train_time_s for e in result.epochs if not e.warmup]


def bare_times(x, y, hidden, epochs, batch, device, seed):
    torch.manual_seed(seed)
    v = x.shape[-1]
    rnn = torch.nn.RNN(v, hidden, nonlinearity="tanh", bias=False, batch_first=True).to(device)
    readout = torch.nn.Linear(hidden, v, bias=False).to(device)
    opt = torch.optim.Adam(list(rnn.parameters()) + list(readout.parameters()), lr=1e-3,
                           fused=True)  # as the harness steps
    x, y = x.to(device), y.to(device)
    generator = torch.Generator().manual_seed(seed)
    times = []
    for epoch in range(epochs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        order = torch.randperm(len(y), generator=generator).to(device)
        loss_sum = torch.zeros((), device=device)
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            opt.zero_grad(set_to_none=True)
            out = readout(rnn(x[idx])[0])
            loss = F.cross_entropy(out.reshape(-1, v), y[idx].reshape(-1))
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
        float(loss_sum)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if epoch > 0:  # the first is warm-up, as in the harness
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=100000, help="characters of the text used")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="per repeat; the first is warm-up")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    discover()
    if not verify(DATASETS["moby_dick"], default_data_dir())[0]:
        raise SystemExit("moby_dick is not prepared: python bench.py data --fetch moby_dick")
    task = tasks.get("chars")
    task_params = P.resolve(task.Params, {"max_chars": args.chars})
    built = P.build(task.Params, task_params)
    arch = task.presets(built, RunContext())["rnn"]
    data = task.load(built, RunContext(validation=0.05, data_dir=str(default_data_dir())))
    hidden = arch.layers[0].hidden
    times = {"harness": [], "bare": []}
    for repeat in range(args.repeats):  # interleaved, so drift in machine load hits both
        order = ("harness", "bare") if repeat % 2 == 0 else ("bare", "harness")
        for name in order:
            if name == "harness":
                times[name] += harness_times(task_params, arch, args.epochs, args.batch,
                                             args.threads, args.device, repeat)
            else:
                times[name] += bare_times(data.x_train, data.y_train, hidden, args.epochs,
                                          args.batch, args.device, repeat)
    h, b = statistics.median(times["harness"]), statistics.median(times["bare"])
    print(f"BPTT epoch: chars task, {len(data.y_train)} windows of {arch.input_shape[0]} x "
          f"{arch.input_shape[1]}, hidden {hidden}, batch {args.batch}, Adam, "
          f"{args.threads} threads, {args.device}")
    print(f"  harness BP (RNNNet)  {h:.3f} s/epoch (median of {len(times['harness'])})")
    print(f"  bare nn.RNN loop     {b:.3f} s/epoch (median of {len(times['bare'])})")
    print(f"  ratio harness/bare = {h / b:.3f}  (bar: <= {BAR}) {'ok' if h / b <= BAR else 'OVER'}")


if __name__ == "__main__":
    main()
