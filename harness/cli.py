"""The command line: parse, dispatch, print. Heavy imports happen inside the commands."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from harness.api import UserError

COMMANDS = ("run", "list", "validate", "report", "data", "merge")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark biologically plausible learning rules against backpropagation: "
                    "YAML suites × algorithm plugins × tasks → result store → markdown report.",
        epilog="`bench.py SUITE.yaml` is short for `bench.py run SUITE.yaml`.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--plugins", action="append", default=[], metavar="DIR",
                       help="extra folder of plugin files (repeatable; also $BENCH_PLUGIN_PATH)")
        p.add_argument("--data-dir", default=None, metavar="DIR",
                       help="where datasets are prepared (default: data/, or $BENCH_DATA_DIR)")

    run = sub.add_parser("run", help="run a suite (resumes: stored runs are skipped)")
    run.add_argument("suite", type=Path)
    run.add_argument("--jobs", "-j", type=int, default=1, help="parallel runs (default 1)")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    run.add_argument("--backend", default="loky", help="joblib backend: loky (default), "
                     "threading, or dask (with --scheduler ADDRESS for a cluster)")
    run.add_argument("--scheduler", default=None, metavar="ADDRESS",
                     help="Dask scheduler address, e.g. tcp://10.0.0.5:8786")
    run.add_argument("--threads", type=int, default=None,
                     help="torch threads per run (default: cores // jobs)")
    run.add_argument("--store", default=None, help="result store path "
                     "(default: the suite's store, or results/<suite>.sqlite)")
    run.add_argument("--rerun", action="store_true", help="run again even runs already stored")
    run.add_argument("--retry-errors", action="store_true", help="run again runs stored as error")
    run.add_argument("--only", action="append", default=[], metavar="KEY=V[,V]",
                     help="run only part of the grid: algorithm=, task=, arch= or seed= "
                     "(repeatable; e.g. --only algorithm=bp --only task=mnist,fashion_mnist)")
    run.add_argument("--dry-run", action="store_true", help="show the runs, run nothing")
    run.add_argument("--no-report", action="store_true", help="do not write the report after")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--log-epochs", action="store_true",
                     help="one line per finished epoch of every run, on stderr (long runs)")
    common(run)

    lst = sub.add_parser("list", help="list algorithms and tasks with their parameters")
    lst.add_argument("what", nargs="?", default="all", choices=("all", "algorithms", "tasks"))
    common(lst)

    val = sub.add_parser("validate", help="check a suite file, run nothing")
    val.add_argument("suite", type=Path)
    common(val)

    rep = sub.add_parser("report", help="regenerate a suite's report from its store")
    rep.add_argument("suite", type=Path)
    rep.add_argument("--store", default=None, help="result store path")
    rep.add_argument("--out", default="reports", help="reports folder (default reports/)")
    common(rep)

    mrg = sub.add_parser("merge", help="copy the runs of other stores (e.g. from other "
                         "machines) into a suite's store")
    mrg.add_argument("suite", type=Path, help="the suite whose store receives the runs")
    mrg.add_argument("sources", nargs="+", type=Path, help="stores to copy from")
    mrg.add_argument("--store", default=None, help="the receiving store (default: the suite's)")
    mrg.add_argument("--replace", action="store_true", help="replace runs already present")
    common(mrg)

    dat = sub.add_parser("data", help="each dataset: ready? from where? how to get it?")
    dat.add_argument("--fetch", nargs="*", metavar="NAME",
                     help="prepare these datasets (none named: all)")
    dat.add_argument("--data-dir", default=None, metavar="DIR")
    return parser


def _data_dir(args) -> Path:
    from harness.data import default_data_dir
    return Path(args.data_dir) if args.data_dir else default_data_dir()


def _discover(args) -> None:
    from harness.registry import discover
    discover(args.plugins)


def cmd_list(args) -> int:
    from harness.registry import catalog
    found = catalog(args.plugins)
    out = []

    def params(rows, indent):
        for name, kind, default, text in rows:
            out.append(f"{'':<{indent}}{name} ({kind}, default {default}) {text}")

    if args.what in ("all", "algorithms"):
        out.append("Algorithms")
        for alg in found["algorithms"]:
            out.append(f"  {alg['name']:<12} {alg['description']}")
            out.append(f"  {'':<12} architectures: {', '.join(alg['supports'])}")
            params(alg["params"], 16)
        for module, error in found["broken"]["algorithm"].items():
            out.append(f"  BROKEN {module}: {error}")
    if args.what in ("all", "tasks"):
        out.append("Tasks")
        for task in found["tasks"]:
            metrics = ", ".join(f"{m} ({'↑' if d == 'max' else '↓'})" for m, d in task["metrics"].items())
            out.append(f"  {task['name']:<14} {task['description']}")
            out.append(f"  {'':<14} metrics: {metrics}; loss: {task['loss']}")
            for preset, text in task["presets"].items():
                out.append(f"  {'':<14} arch {preset}: {text}")
            params(task["params"], 18)
        for module, error in found["broken"]["task"].items():
            out.append(f"  BROKEN {module}: {error}")
    print("\n".join(out))
    return 0


def _load_suite(args, device: str = "cpu"):
    from harness import suite as suite_mod
    _discover(args)
    return suite_mod.load(args.suite, device=device, store=getattr(args, "store", None))


def cmd_validate(args) -> int:
    from harness.registry import algorithms, tasks
    suite = _load_suite(args)
    for registry in (algorithms, tasks):
        for module, error in registry.broken.items():
            print(f"warning: {registry.kind} plugin {module} failed to import: {error}",
                  file=sys.stderr)
    skipped = sum(1 for s in suite.specs if s.skip_reason)
    print(f"{args.suite}: valid — {len(suite.specs)} runs ({skipped} will be skipped), "
          f"store {suite.store_path}")
    return 0


def cmd_run(args) -> int:
    from harness import parallel
    if args.jobs < 1:
        raise UserError(f"--jobs: must be ≥ 1, not {args.jobs}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads: must be ≥ 1, not {args.threads}")
    device = parallel.resolve_device(args.device)
    suite = _load_suite(args, device=device)
    specs = _only(suite.specs, args.only)
    if args.dry_run:
        return _dry_run(suite, specs, args)
    summary = parallel.run(
        specs, suite.store_path, jobs=args.jobs, backend=args.backend,
        scheduler=args.scheduler, threads=args.threads, data_dir=_data_dir(args),
        plugin_paths=tuple(args.plugins), rerun=args.rerun, retry_errors=args.retry_errors,
        progress=not args.no_progress, log_epochs=args.log_epochs, command=" ".join(sys.argv),
        suite_name=suite.name)
    c = summary.counts
    print(f"{suite.name}: ok {c['ok']}, diverged {c['diverged']}, error {c['error']}, "
          f"skipped {c['skipped']}, already stored {summary.already_stored} → {suite.store_path}")
    if not args.no_report:   # the whole suite's report, not only the slice that just ran
        from harness import report
        print(f"report: {report.build(suite)}")
    return 130 if summary.interrupted else 0


ONLY_KEYS = ("algorithm", "task", "arch", "seed")


def _only(specs, rules: list[str]):
    """The specs that match every ``KEY=V[,V]`` rule (algorithm matches name or row label)."""
    for rule in rules:
        key, _, values = rule.partition("=")
        if key not in ONLY_KEYS or not values:
            raise UserError(f"--only {rule!r}: KEY=VALUE[,VALUE] with KEY one of {', '.join(ONLY_KEYS)}")
        wanted = set(values.split(","))
        entries = {s.label.split(" (")[0] for s in specs} | {s.task_label for s in specs}

        def named(label: str, name: str) -> bool:   # as in suite rules: a label names its row
            return label in wanted or (name in wanted and name not in entries)

        def keep(spec) -> bool:
            if key == "algorithm":
                return spec.label in wanted or named(spec.label.split(" (")[0], spec.algorithm)
            if key == "task":
                return named(spec.task_label or spec.task, spec.task)
            if key == "arch":
                return spec.arch.name in wanted
            return str(spec.seed) in wanted
        kept = [s for s in specs if keep(s)]
        if not kept:
            raise UserError(f"--only {rule!r} matches no run of the suite")
        specs = kept
    return specs


def _dry_run(suite, specs, args) -> int:
    from tabulate import tabulate
    from harness import parallel
    the_plan = parallel.plan(specs, suite.store_path, args.rerun, args.retry_errors)
    reasons = parallel.prepare_data(the_plan.todo, _data_dir(args), lambda m: None, fetch=False)
    not_ready = {name: f"to run if {name} can be fetched (bench.py data)"
                 for name, reason in reasons.items() if reason}
    todo = parallel.with_data_reasons(the_plan.todo, not_ready)
    done = {s.key() for s in the_plan.done}
    rows = []
    for spec in the_plan.done + the_plan.skipped + todo:
        if spec.key() in done:
            state = "stored"
        elif spec.skip_reason and spec.skip_reason in not_ready.values():
            state = spec.skip_reason
        else:
            state = "skip: " + spec.skip_reason if spec.skip_reason else "to run"
        rows.append([spec.label, spec.task_label or spec.task, spec.arch.name, spec.seed,
                     spec.epochs, spec.batch_size, spec.device, state[:100]])
    print(tabulate(rows, headers=["algorithm", "task", "arch", "seed", "epochs", "batch",
                                  "device", "state"], tablefmt="simple"))
    to_run = sum(1 for r in rows if r[-1].startswith("to run"))
    print(f"{len(rows)} runs: {to_run} to run, {len(done)} stored, "
          f"{len(rows) - to_run - len(done)} skipped (dry run: nothing was run)")
    return 0


def cmd_report(args) -> int:
    from harness import report
    suite = _load_suite(args)
    print(report.build(suite, Path(args.out)))
    return 0


def cmd_merge(args) -> int:
    from harness.store import Store
    suite = _load_suite(args)
    keys = {s.key() for s in suite.specs}
    with Store(suite.store_path) as store:
        for source in args.sources:
            copied, present = store.merge_from(source, replace=args.replace)
            print(f"{source}: {copied} runs copied, {present} already in {suite.store_path}")
        matching = len(keys & set(store.statuses()))
    print(f"{suite.store_path}: {matching} of the suite's {len(keys)} runs are stored "
          f"(runs of other grids are kept but not reported)")
    return 0


def cmd_data(args) -> int:
    from harness import data
    from harness.registry import discover
    discover()  # task plugins register their datasets
    data_dir = _data_dir(args)
    names = sorted(data.DATASETS)
    if args.fetch is not None:
        wanted = args.fetch or names
        for name in wanted:
            data.get(name)
        failed = 0
        for name in wanted:
            ok, detail = data.fetch(name, data_dir, lambda m: print(f"  {m}", file=sys.stderr))
            print(f"{name:<16} {'ready' if ok else 'unavailable':<12} {detail}")
            failed += not ok
        return 1 if failed else 0
    for name in names:
        state, detail = data.status(name, data_dir)
        print(f"{name:<16} {state:<8} {data.DATASETS[name].description}\n{'':<25}{detail}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv = ["run"] + argv
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return {"run": cmd_run, "list": cmd_list, "validate": cmd_validate,
                "report": cmd_report, "data": cmd_data, "merge": cmd_merge}[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os._exit(0)
