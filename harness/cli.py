"""The command line: parse, dispatch, print. Heavy imports happen inside the commands."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from harness.api import UserError

COMMANDS = ("run", "list", "validate", "report", "show", "export", "compare", "data", "merge",
            "equate")


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
    run.add_argument("--jobs", "-j", type=int, default=None,
                     help="parallel runs (default 1; with --device cuda one per GPU slot)")
    run.add_argument("--per-gpu", type=int, default=1, metavar="K",
                     help="with --device cuda: runs sharing one GPU (default 1); runs are "
                     "spread over every visible GPU, each pinned to its own")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    run.add_argument("--backend", default="local", help="local (default: joblib threads, "
                     "each supervising one run process), dask (with --scheduler ADDRESS for a "
                     "cluster) or slurm (job arrays through submitit; --slurm-* below)")
    run.add_argument("--scheduler", default=None, metavar="ADDRESS",
                     help="Dask scheduler address, e.g. tcp://10.0.0.5:8786")
    slurm = run.add_argument_group(
        "--backend slurm", "each run a task of a Slurm job array (at most --jobs at once)")
    slurm.add_argument("--slurm-partition", default=None, metavar="NAME",
                       help="partition(s) to submit to (default: the cluster's default)")
    slurm.add_argument("--slurm-gpus-per-task", type=int, default=None, metavar="N",
                       help="GPUs per run (then --device auto means cuda)")
    slurm.add_argument("--slurm-cpus-per-task", type=int, default=None, metavar="N",
                       help="CPUs per run; also its torch threads unless --threads")
    slurm.add_argument("--slurm-mem", default=None, metavar="SIZE",
                       help="memory per run's job, e.g. 8G or 16000M")
    slurm.add_argument("--slurm-time", default=None, metavar="TIME",
                       help="time limit per run's job: minutes, HH:MM:SS or D-HH:MM:SS "
                       "(default: the partition's)")
    slurm.add_argument("--slurm-extra", action="append", default=[], metavar="--FLAG[=V]",
                       help="another sbatch flag, repeatable, written with '=': "
                       "--slurm-extra=--account=abc --slurm-extra=--qos=high")
    slurm.add_argument("--slurm-array-parallelism", type=int, default=None, metavar="N",
                       help="array tasks running at once (default: --jobs)")
    slurm.add_argument("--slurm-folder", type=Path, default=None, metavar="DIR",
                       help="submitit's job files and logs, on a shared filesystem "
                       "(default: slurm/<suite>/ beside the store, i.e. results/slurm/<suite>/)")
    run.add_argument("--threads", type=int, default=None,
                     help="torch threads per run (default: cores // jobs)")
    run.add_argument("--store", default=None, help="result store path "
                     "(default: the suite's store, or results/<suite>.sqlite)")
    run.add_argument("--rerun", action="store_true", help="run again even runs already stored")
    run.add_argument("--retry-errors", action="store_true", help="run again runs stored as error")
    run.add_argument("--rerun-stale", action="store_true",
                     help="run again stored runs made with source other than the current code")
    run.add_argument("--run-timeout", type=float, default=None, metavar="SECONDS",
                     help="a run still going after SECONDS is killed and stored as error")
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

    rep = sub.add_parser("report", help="rebuild a report: from a suite's store, a store, "
                         "or a committed runs.jsonl")
    rep.add_argument("suite", type=Path, metavar="SUITE_OR_STORE",
                     help="a suite file (its store), a .sqlite store or a runs.jsonl")
    rep.add_argument("--store", default=None, help="result store path (with a suite file)")
    rep.add_argument("--out", default="reports", help="reports folder (default reports/)")
    common(rep)

    shw = sub.add_parser("show", help="print a suite's headline table (or put it into a "
                         "marked block of a file, e.g. the README)")
    shw.add_argument("target", type=Path, metavar="SUITE_OR_STORE",
                     help="a suite file (its store), a .sqlite store or a runs.jsonl")
    shw.add_argument("--store", default=None, help="result store path (with a suite file)")
    shw.add_argument("--into", default=None, metavar="FILE",
                     help="replace the table between <!-- headline:SUITE --> and "
                     "<!-- /headline:SUITE --> in FILE")
    common(shw)                                   # plugins: to tell which runs are stale

    exp = sub.add_parser("export", help="write runs, epochs and sessions for pandas or R")
    exp.add_argument("target", type=Path, metavar="SUITE_OR_STORE",
                     help="a suite file (its store), a .sqlite store or a runs.jsonl")
    exp.add_argument("--store", default=None, help="result store path (with a suite file)")
    exp.add_argument("--format", default="csv", help="csv (default), parquet or json (lines)")
    exp.add_argument("--out", required=True, metavar="DIR", help="folder for the files")

    cmp_ = sub.add_parser("compare", help="B against A, cell by cell: the change in the primary "
                          "metric and in time per epoch, with tests; exit 1 on a regression")
    cmp_.add_argument("a", type=Path, metavar="A", help="a .sqlite store or a runs.jsonl (before)")
    cmp_.add_argument("b", type=Path, metavar="B", help="a .sqlite store or a runs.jsonl (after)")
    cmp_.add_argument("--threshold", type=float, default=0.0,
                      help="a regression is worse by more than this, in the metric's units "
                      "(default 0: any significant loss)")
    cmp_.add_argument("--time-threshold", type=float, default=None, metavar="FRACTION",
                      help="also a regression: significantly slower by more than this fraction")
    cmp_.add_argument("--protocol", choices=("clean", "paper"), default=None,
                      help="the selection compared (default: the suites'; needed where A's "
                      "and B's differ)")
    cmp_.add_argument("--force", action="store_true",
                      help="compare results of two different suites (other budgets, splits)")
    cmp_.add_argument("--alpha", type=float, default=0.05,
                      help="significance level after Holm's correction (default 0.05)")

    mrg = sub.add_parser("merge", help="add the runs of other stores or runs.jsonl files (e.g. "
                         "from other machines, or committed) to a suite's store")
    mrg.add_argument("suite", type=Path, help="the suite whose store receives the runs")
    mrg.add_argument("sources", nargs="+", type=Path, help=".sqlite stores or runs.jsonl files")
    mrg.add_argument("--store", default=None, help="the receiving store (default: the suite's)")
    mrg.add_argument("--replace", action="store_true", help="replace runs already present")
    mrg.add_argument("--force", action="store_true", help="accept runs of another suite")
    common(mrg)

    eqt = sub.add_parser(
        "equate", help="after a change of code: re-run a stored run of each stale "
        "configuration for its first epochs; where every number agrees, record in "
        "equivalences.yaml that its runs count as current (exit 1 if any differs)")
    eqt.add_argument("suite", type=Path)
    eqt.add_argument("--store", default=None, help="result store path (default: the suite's)")
    eqt.add_argument("--only", action="append", default=[], metavar="KEY=V[,V]",
                     help="as for run: check only these runs' configurations")
    eqt.add_argument("--epochs", type=int, default=1,
                     help="epochs re-run and compared per run (default 1)")
    eqt.add_argument("--runs-per-cell", type=int, default=1, metavar="N",
                     help="stored runs re-run per configuration (default 1; those made on "
                     "this CPU model first, then by seed)")
    eqt.add_argument("--tolerance", type=float, default=0.0, metavar="REL",
                     help="largest relative difference accepted (default 0: every number "
                     "equal; above 0 accepts float rounding, e.g. runs of another CPU)")
    eqt.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                     help="a checkout of the code the stored runs were made with (git worktree "
                     "add DIR COMMIT): compare with its re-run here, not with the stored numbers "
                     "(for runs made on another CPU model)")
    eqt.add_argument("--note", default="", help="why the code changed (kept in the entry)")
    eqt.add_argument("--list", action="store_true",
                     help="only list the stale configurations; run nothing")
    common(eqt)

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
    return suite_mod.load(args.suite, device=device, store=getattr(args, "store", None),
                          data_dir=_data_dir(args))


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


def _current_sources(specs) -> dict[str, str]:
    """Run key → the source digest the current code gives it (see harness.fingerprint)."""
    from harness import fingerprint
    from harness.registry import algorithms, tasks
    by_pair: dict[tuple[str, str], str] = {}
    out = {}
    for spec in specs:
        pair = (spec.algorithm, spec.task)
        if pair not in by_pair:
            by_pair[pair] = fingerprint.of_plugins(type(algorithms.get(spec.algorithm)),
                                                   type(tasks.get(spec.task)))["source"]
        out[spec.key()] = by_pair[pair]
    return out


def _slurm_options(args):
    """The --slurm-* options, checked (before anything loads or is submitted)."""
    from harness.slurm import SlurmOptions
    options = SlurmOptions(
        partition=args.slurm_partition, gpus_per_task=args.slurm_gpus_per_task,
        cpus_per_task=args.slurm_cpus_per_task, mem=args.slurm_mem, time=args.slurm_time,
        extra=tuple(args.slurm_extra), array_parallelism=args.slurm_array_parallelism,
        folder=args.slurm_folder)
    if args.backend != "slurm":
        if options.given():
            raise UserError(f"{', '.join(options.given())}: for --backend slurm only")
        return None
    options.check(need_sbatch=not args.dry_run)
    return options


def cmd_run(args) -> int:
    from harness import parallel
    from harness.slots import default_jobs
    if args.per_gpu < 1:
        raise UserError(f"--per-gpu: must be ≥ 1, not {args.per_gpu}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads: must be ≥ 1, not {args.threads}")
    if args.run_timeout is not None and not args.run_timeout > 0:
        raise UserError(f"--run-timeout: a number of seconds > 0, not {args.run_timeout}")
    slurm = args.slurm_options = _slurm_options(args)
    device = slurm.device(args.device) if slurm else parallel.resolve_device(args.device)
    args.jobs = default_jobs(device if args.backend == "local" else "cpu", args.per_gpu,
                             args.jobs)
    if args.jobs < 1:
        raise UserError(f"--jobs: must be ≥ 1, not {args.jobs}")
    suite = _load_suite(args, device=device)
    specs = _only(suite, args.only)
    sources = _current_sources(suite.specs)
    if args.dry_run:
        return _dry_run(suite, specs, args, sources)
    def run_specs(batch, structure=None):
        return parallel.run(
            batch, suite.store_path, jobs=args.jobs, backend=args.backend,
            estimates=_estimates(suite, batch, args, measure=False),   # stored or cached
            scheduler=args.scheduler, threads=args.threads, data_dir=_data_dir(args),
            plugin_paths=tuple(args.plugins), rerun=args.rerun, retry_errors=args.retry_errors,
            rerun_stale=args.rerun_stale, sources=_current_sources(batch),
            run_timeout=args.run_timeout, progress=not args.no_progress,
            log_epochs=args.log_epochs, command=" ".join(sys.argv), suite_name=suite.name,
            structure=structure, slurm=slurm, per_gpu=args.per_gpu)
    if suite.tune is None:
        summary = run_specs(specs, suite.structure())
    else:
        summary = _tune(suite, specs, run_specs)
    c = summary.counts
    print(f"{suite.name}: ok {c['ok']}, diverged {c['diverged']}, error {c['error']}, "
          f"skipped {c['skipped']}, already stored {summary.already_stored}"
          + (f", done by another process {summary.elsewhere}" if summary.elsewhere else "")
          + f" → {suite.store_path}")
    if summary.stale and not args.rerun_stale:
        print(f"{summary.stale} stored run(s) were made with other source (stale); "
              f"--rerun-stale runs them again")
    if not args.no_report:   # the whole suite's report, not only the slice that just ran
        from harness import report
        from harness.fingerprint import current_source
        from harness.store import Store
        with Store(suite.store_path, readonly=True) as store:
            current = current_source(args.plugins)
            print(f"report: {report.build(store, current=current)}")
    return 130 if summary.interrupted else 0


def _tune(suite, specs, run_specs):
    """A suite with a tune: block: every row's trials, then its chosen settings (harness.tune);
    the store records the plan as it grows, so an interrupted tuning reports what it has."""
    from harness import parallel, tune
    from harness.store import Store
    total = parallel.Summary()

    def batch_runner(batch):
        summary = run_specs(batch)
        for status, count in summary.counts.items():
            total.counts[status] = total.counts.get(status, 0) + count
        total.already_stored += summary.already_stored
        total.stale += summary.stale
        total.elsewhere += summary.elsewhere
        if summary.interrupted:
            total.interrupted = True
            raise KeyboardInterrupt
    studies: list = []
    try:
        tune.run(suite, specs, batch_runner, suite.store_path,
                 log=lambda m: print(m, file=sys.stderr), studies=studies)
    except KeyboardInterrupt:
        total.interrupted = True
    finally:
        if studies or suite.store_path.exists():
            with Store(suite.store_path) as store:
                store.record_suite(suite.name, suite.structure(tune.plan(suite, studies)))
    return total


def _only(suite, rules: list[str]):
    """The suite's specs that every ``--only KEY=V[,V]`` rule matches (algorithm matches a row
    label, an entry label, or a plugin name that is not itself an entry label). A value that
    names no run is an error, so a typo never silently runs less."""
    from harness.grid import Coordinates, Selector, select
    names = suite.names()
    specs = list(suite.specs)
    for rule, selector in zip(rules, Selector.parse_only(rules)):
        for key in ("algorithm", "task", "arch", "seed"):
            for value in getattr(selector, key):
                single = Selector(**{key: (value,)})
                if not any(single.matches(Coordinates.of(s, names)) for s in suite.specs):
                    valid = sorted({str(getattr(Coordinates.of(s, names), attr))
                                    for s in suite.specs for attr in
                                    {"algorithm": ("row", "entry", "algorithm"),
                                     "task": ("task_entry", "task"), "arch": ("arch",),
                                     "seed": ("seed",)}[key]})
                    raise UserError(f"--only {rule!r}: {value!r} names no run of the suite; "
                                    f"valid {key} values: {', '.join(valid)}")
        specs = select(specs, [selector], names)
        if not specs:
            raise UserError(f"--only {rule!r} matches no run of the suite (with the rules "
                            "before it)")
    return specs


def _run_threads(args) -> int:
    """The torch threads each run will have: ``--threads``, else the Slurm tasks' CPUs under
    ``--backend slurm``, else the cores shared by ``--jobs`` (what parallel.run gives them)."""
    from harness.runner import threads_for
    if args.threads:
        return args.threads
    slurm = getattr(args, "slurm_options", None)
    if args.backend == "slurm" and slurm is not None:
        return slurm.threads()
    return threads_for(args.jobs)


def _estimates(suite, specs, args, measure: bool, log=lambda m: None):
    from harness import data as data_mod
    from harness import estimate
    from harness.registry import tasks
    from harness import params as P
    data_dir = _data_dir(args)
    ready_sets: dict[str, bool] = {}

    def ready(spec) -> bool:
        task = tasks.get(spec.task)
        names = task.datasets(P.build(task.Params, spec.task_params))
        for name in names:
            if name not in ready_sets:
                ready_sets[name] = data_mod.status(name, data_dir)[0] == "ready"
        return all(ready_sets[n] for n in names)
    from harness.fingerprint import current_source
    return estimate.estimate(specs, suite.store_path, str(data_dir), _run_threads(args),
                             measure=measure, ready=ready, log=log, reference=suite.specs,
                             current=current_source(args.plugins))


def _dry_run(suite, specs, args, sources) -> int:
    from tabulate import tabulate
    from harness import parallel
    from harness.estimate import human
    the_plan = parallel.plan(specs, suite.store_path, args.rerun, args.retry_errors,
                             args.rerun_stale, sources)
    reasons = parallel.prepare_data(the_plan.todo, _data_dir(args), lambda m: None, fetch=False)
    not_ready = {name: f"to run if {name} can be fetched (bench.py data)"
                 for name, reason in reasons.items() if reason}
    todo = parallel.with_data_reasons(the_plan.todo, not_ready)
    runnable = [s for s in todo if not s.skip_reason]
    estimates = _estimates(suite, runnable, args, measure=True,
                           log=lambda m: print(m, file=sys.stderr))
    done = {s.key() for s in the_plan.done}
    stale = {s.key() for s in the_plan.stale}
    rows = []
    for spec in the_plan.done + the_plan.skipped + todo:
        key = spec.key()
        guess = estimates.get(key)
        if key in done:
            state = "stored" + (" (stale)" if key in stale else "")
        elif spec.skip_reason and spec.skip_reason in not_ready.values():
            state = spec.skip_reason
        else:
            state = "skip: " + spec.skip_reason if spec.skip_reason else (
                "to run" + (" (stale)" if key in stale else ""))
        rows.append([spec.label, spec.task_label or spec.task, spec.arch.name, spec.seed,
                     spec.epochs, spec.batch_size, spec.device,
                     _guess(guess) if guess else "", state[:100]])
    print(tabulate(rows, headers=["algorithm", "task", "arch", "seed", "epochs", "batch",
                                  "device", "estimate", "state"], tablefmt="simple"))
    to_run = len(runnable)
    waiting = len(todo) - to_run           # their data is not ready here
    print(f"{len(rows)} runs: {to_run} to run, {len(done)} stored, "
          + (f"{waiting} to run once their data is fetched, " if waiting else "")
          + f"{len(rows) - to_run - waiting - len(done)} skipped (dry run: nothing was run)")
    known = [e.seconds for e in estimates.values() if e.seconds is not None]
    sources_count = {src: sum(1 for e in estimates.values() if e.source == src)
                     for src in ("stored", "timed", "unknown")}
    if runnable:
        total = sum(known)
        print(f"estimated time of the {len(runnable)} runs to do on this machine: "
              f"{human(total)} of run time ({total / 3600:.1f} CPU-hours at "
              f"{args.threads or 'the default'} threads per run), about {human(total / args.jobs)} "
              f"with --jobs {args.jobs}; from stored epochs for {sources_count['stored']} runs, "
              f"timed steps for {sources_count['timed']}"
              + (f", no estimate for {sources_count['unknown']} (data not ready)"
                 if sources_count["unknown"] else ""))
    if suite.tune is not None:
        _dry_run_tuning(suite, runnable, estimates)
    if stale:
        print(f"{len(stale)} stored run(s) were made with source other than the current code "
              f"(stale): " + ("--rerun-stale runs them again" if not args.rerun_stale
                              else "they are to run again (--rerun-stale)"))
    for line in parallel.setting_changes(the_plan, _run_threads(args),
                                         specs[0].device if specs else "cpu",
                                         local=args.backend == "local"):
        print(line)
    return 0


def _guess(guess) -> str:
    """``12 min (timed ×1.28)``: the estimate, where it came from and how it was scaled."""
    from harness.estimate import human
    how = guess.source + (f" ×{guess.factor:.2f}" if guess.factor != 1.0 else "") + \
        (", busy" if guess.busy else "")
    return f"{human(guess.seconds)} ({how})"


def _dry_run_tuning(suite, runnable, estimates) -> None:
    """The trials a tune: block adds before the runs listed (which run at each row's chosen
    settings): how many, and their time at the rows' current speed per epoch."""
    from harness.estimate import human
    t = suite.tune
    cells = {}
    for spec in runnable:          # one study per row × task × arch
        cells.setdefault((spec.label, spec.task_label or spec.task, spec.arch.name), spec)
    epochs = t.epochs or suite.epochs
    seconds = 0.0
    for spec in cells.values():
        guess = estimates.get(spec.key())
        if guess and guess.seconds is not None:
            seconds += guess.seconds / spec.epochs * epochs * len(t.seeds) * t.trials
    trials = len(cells) * t.trials * len(t.seeds)
    print(f"tune: first {len(cells)} studies × {t.trials} trials × {len(t.seeds)} seed(s) = "
          f"{trials} trial runs of {epochs} epochs (stored ones are not run again), about "
          f"{human(seconds)} of run time; the runs above then use each row's chosen settings")
    recorded = _recorded_plan(suite)
    if recorded:
        stored, total = recorded
        print(f"tune: the last run's plan (recorded in the store) has {total} trial and final "
              f"runs, {stored} of them stored"
              + ("; the table above lists the rows at the suite's own settings, not the chosen "
                 "ones: `bench.py report` shows what was chosen" if stored == total else ""))


def _recorded_plan(suite) -> Optional[tuple[int, int]]:
    """(stored, planned) runs of the plan the suite's last tuning run recorded, if any."""
    from harness.store import Store
    if not Path(suite.store_path).exists():
        return None
    try:
        with Store(suite.store_path, readonly=True) as store:
            structure = store.structure() or {}
            keys = [p["key"] for p in structure.get("plan", []) if p.get("role")]
            done = store.statuses(keys) if keys else {}
    except Exception:                      # noqa: BLE001 — a dry run never fails on this
        return None
    if not keys or structure.get("name") != suite.name:
        return None
    return sum(1 for k in keys if done.get(k) in ("ok", "diverged")), len(keys)


def cmd_report(args) -> int:
    from harness import report
    from harness.fingerprint import current_source
    from harness.store import Store, open_results
    target = Path(args.suite)
    current = current_source(args.plugins)
    if target.suffix in (".yaml", ".yml"):
        suite = _load_suite(args)
        with Store(suite.store_path, readonly=True) as store:
            # a tune: suite's runs are its trials' choices: the plan the run recorded names them
            layout = (report.layout_of(store) if suite.tune is not None
                      else report.Layout.of(suite.structure()))
            print(report.build(store, Path(args.out), layout=layout, current=current))
            stale = report.stale_cells(report.frames_for(store, layout).runs, current)[0]
        if stale:
            print(f"{stale} stored run(s) were made with source other than the current code "
                  f"(stale): python bench.py run {args.suite} --rerun-stale runs them again")
        return 0
    if args.store:
        raise UserError("--store is for a suite file; give the store itself instead")
    if target.is_dir():
        raise UserError(f"{target}: a folder; give a suite .yaml, a .sqlite store or a runs.jsonl")
    with open_results(target) as store:
        rewrites_itself = target.suffix == ".jsonl" and target.resolve() == (
            Path(args.out) / (store.meta("suite") or "") / "runs.jsonl").resolve()
        print(report.build(store, Path(args.out), write_data=not rewrites_itself,
                           current=current))
    return 0


def cmd_merge(args) -> int:
    from harness.exchange import read_jsonl
    from harness.store import Store
    suite = _load_suite(args)
    keys = {s.key() for s in suite.specs}
    for source in args.sources:
        if not source.exists():
            raise UserError(f"{source}: no result store there")
    with Store(suite.store_path) as store:
        if not store.meta("suite"):
            store.record_suite(suite.name, suite.structure())
        for source in args.sources:
            if source.resolve() == suite.store_path.resolve():
                raise UserError(f"{source}: cannot merge a store into itself")
            if source.suffix == ".jsonl":
                records = read_jsonl(source)
            else:
                with Store(source, readonly=True) as other:
                    records = other.export_records()
            copied, present = store.import_records(records, replace=args.replace,
                                                   force=args.force, source=str(source))
            print(f"{source}: {copied} runs copied, {present} already in {suite.store_path}")
        matching = len(keys & set(store.statuses()))
    print(f"{suite.store_path}: {matching} of the suite's {len(keys)} runs are stored "
          f"(runs of other grids are kept but not reported)")
    return 0


def cmd_equate(args) -> int:
    from harness import equate
    suite = _load_suite(args)
    specs = _only(suite, args.only)
    return equate.run(specs, suite.store_path, _current_sources(specs), _data_dir(args),
                      args.plugins, args.epochs, args.tolerance, args.runs_per_cell, args.note,
                      args.list, args.baseline)


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
        from harness import cli_results
        return {"run": cmd_run, "list": cmd_list, "validate": cmd_validate,
                "show": cli_results.cmd_show, "export": cli_results.cmd_export,
                "compare": cli_results.cmd_compare,
                "report": cmd_report, "data": cmd_data, "merge": cmd_merge,
                "equate": cmd_equate}[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os._exit(0)
