"""Fingerprints of the code that shapes a run's numbers, recorded beside every run.

A run's key (:meth:`harness.api.RunSpec.key`) holds each plugin's declared ``version``, not its
source: a version is bumped on purpose when a change moves the numbers. To catch the changes
nobody declared, every run also records digests of

* its algorithm plugin's module and the project-local plugin modules it imports
  (``algorithms/fa.py`` for ``dfa``, say, if it imported it),
* its task plugin's module, likewise,
* the engine files that shape numbers: the epoch loop and evaluation (``harness/runner.py``),
  the shared network and optimiser pieces (``harness/toolkit.py``, ``harness/nets.py``).

A digest is taken of the file's syntax tree without docstrings, so comments, docstrings and
formatting do not count as a change; any change to code does. A stored run whose digests differ
from the current code's is *stale*: ``run``, ``--dry-run`` and ``report`` say how many there are
and ``--rerun-stale`` runs them again.

A change that leaves the numbers as they were (a faster kernel, code moved between files) need
not stale a day of runs: ``bench.py equate`` re-runs stored runs of each changed cell with the
new code, compares every number of their first epochs, and — only where they agree — records
in ``equivalences.yaml`` that runs of the old digest count as runs of the new one, for that
configuration (:func:`config_of`) and device kind. :func:`is_current` is the one test every
caller uses.

The engine digest is taken once, when this module is first imported — in the process that
imported the engine, so a worker forked from a server that imported it earlier reports the code
it runs, not what the files say now. A plugin's digest is likewise taken when its module is
imported (the registry's discovery), not when a run ends.
"""
from __future__ import annotations

import ast
import hashlib
import os
import sys
from pathlib import Path
from typing import Iterable, Optional

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENGINE_FILES = ("harness/runner.py", "harness/toolkit.py", "harness/nets.py")
PLUGIN_PACKAGES = ("algorithms", "tasks")
SHORT = 12   # hex digits shown and stored


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(
                    getattr(body[0], "value", None), ast.Constant) and isinstance(
                    body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _parse(path: Path) -> Optional[ast.AST]:
    try:
        return ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return None


def file_digest(path: Path) -> str:
    """The digest of one file's code (its syntax tree without docstrings); of its raw bytes
    where it does not parse; ``missing`` where it cannot be read."""
    path = Path(path)
    tree = _parse(path)
    if tree is not None:
        text = ast.dump(_without_docstrings(tree), include_attributes=False).encode()
    else:
        try:
            text = path.read_bytes()
        except OSError:
            return "missing"
    return hashlib.sha256(text).hexdigest()


def _local_imports(path: Path, tree: ast.AST) -> list[Path]:
    """Project plugin modules (``algorithms.x``, ``tasks.y``, relative imports) ``path`` imports."""
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = path.parent
                for _ in range(node.level - 1):
                    base = base.parent
                target = base.joinpath(*node.module.split(".")) if node.module else base
                candidates = [target.with_suffix(".py")] + [
                    target / f"{alias.name}.py" for alias in node.names]
                found += [c for c in candidates if c.is_file()]
                continue
            if node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".", 1)[0] in PLUGIN_PACKAGES:
                candidate = PROJECT_ROOT.joinpath(*name.split(".")).with_suffix(".py")
                if candidate.is_file():
                    found.append(candidate)
    return found


def module_files(path: Path) -> list[Path]:
    """``path`` and, transitively, the project's plugin modules it imports (sorted)."""
    seen: dict[Path, None] = {}
    todo = [Path(path).resolve()]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen[current] = None
        tree = _parse(current)
        if tree is not None:
            todo += [p.resolve() for p in _local_imports(current, tree)]
    return sorted(seen)


def digest(files: Iterable[Path]) -> str:
    """One digest over several files (named relative to the project where they lie in it)."""
    combined = hashlib.sha256()
    for path in sorted(Path(f).resolve() for f in files):
        try:
            name = str(path.relative_to(PROJECT_ROOT))
        except ValueError:
            name = path.name
        combined.update(f"{name}:{file_digest(path)}\n".encode())
    return combined.hexdigest()[:SHORT]


ENGINE_DIGEST = digest(PROJECT_ROOT / f for f in ENGINE_FILES if (PROJECT_ROOT / f).exists())


_AT_IMPORT: dict[str, str] = {}   # module name → its digest when this process imported it


def remember(module_name: str) -> None:
    """Take the digest of a plugin module now, as it is imported (the registry calls this right
    after each import): a run records the code its process runs, not what the file says when
    the run ends — a plugin edited while a suite runs (a long grid, a tuning study) must not
    lend its new digest to runs of the old code."""
    module = sys.modules.get(module_name)
    source = getattr(module, "__file__", None)
    if source and module_name not in _AT_IMPORT:
        _AT_IMPORT[module_name] = digest(module_files(Path(source)))


def plugin_digest(cls: type) -> str:
    """The digest of the module that defines a plugin class, with its local imports: taken
    when the module was imported (:func:`remember`), else now."""
    if cls.__module__ in _AT_IMPORT:
        return _AT_IMPORT[cls.__module__]
    module = sys.modules.get(cls.__module__)
    source = getattr(module, "__file__", None)
    if not source:
        return "unknown"
    remember(cls.__module__)
    return _AT_IMPORT[cls.__module__]


def of_plugins(algorithm_cls: type, task_cls: type) -> dict[str, str]:
    """``{algorithm, task, engine, source}``: ``source`` combines the three; it is what the
    stale check compares."""
    parts = {"algorithm": plugin_digest(algorithm_cls), "task": plugin_digest(task_cls),
             "engine": ENGINE_DIGEST}
    combined = hashlib.sha256("|".join(parts[k] for k in ("algorithm", "task", "engine")).encode())
    parts["source"] = combined.hexdigest()[:SHORT]
    return parts


def current_source(plugin_paths=()):
    """``current(algorithm, task)`` → the source digest the code here gives their runs now
    (what a stored run's ``source`` is compared with), or None where the plugins cannot be
    had: a report needs none, and staleness is then not checked. Plugins are discovered on
    the first call."""
    known: dict = {}
    state = {"discovered": False}

    def current(algorithm: str, task: str):
        if (algorithm, task) not in known:
            try:
                from harness.registry import algorithms, discover, tasks
                if not state["discovered"]:
                    discover(plugin_paths)
                    state["discovered"] = True
                known[algorithm, task] = of_plugins(type(algorithms.get(algorithm)),
                                                    type(tasks.get(task)))["source"]
            except Exception:                      # noqa: BLE001 — torch or a plugin missing
                known[algorithm, task] = None
        return known[algorithm, task]
    return current


# --------------------------------------------------------------------------------------------
# Verified equivalences: old digest → new digest, per configuration
# --------------------------------------------------------------------------------------------

EQUIVALENCES_FILE = PROJECT_ROOT / "equivalences.yaml"
ENTRY_KEYS = ("algorithm", "task", "arch", "config", "from", "to")
NOT_CONFIG = ("seed", "device", "label", "task_label", "suite", "skip_reason")  # device: apart
_LOADED: dict[str, dict] = {}


def config_of(spec) -> str:
    """A digest of everything that shapes a run's numbers but its seed — plugins, versions,
    parameters, architecture, budget, protocol (a RunSpec, its stored JSON, or that as a
    dict). An equivalence is verified, and holds, for one configuration: a change checked on
    DLL says nothing of dll-released, a row of the same plugin with other parameters."""
    import json
    from harness.api import _canonical
    kept = {k: v for k, v in _as_dict(spec).items() if k not in NOT_CONFIG}
    text = json.dumps(_canonical(kept), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:SHORT]


def _as_dict(spec) -> dict:
    """A RunSpec's identity, or its stored JSON (text or parsed) as a dict."""
    import json
    if hasattr(spec, "identity"):
        return spec.identity()
    return json.loads(spec) if isinstance(spec, str) else spec


def equivalences_path() -> Path:
    """The committed file of verified equivalences (``$BENCH_EQUIVALENCES`` overrides it:
    tests, or a private study)."""
    return Path(os.environ.get("BENCH_EQUIVALENCES") or EQUIVALENCES_FILE)


def load_equivalences(path: Optional[Path] = None) -> list[dict]:
    """The entries of the equivalences file (none where it does not exist); a malformed file
    is a UserError naming it and what is wrong."""
    import yaml
    from harness.api import UserError
    path = Path(path or equivalences_path())
    if not path.exists():
        return []
    try:
        entries = yaml.safe_load(path.read_text()) or []
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: not readable as YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(entries, list):
        raise UserError(f"{path}: must be a list of entries, each with keys "
                        f"{', '.join(ENTRY_KEYS)}")
    for i, entry in enumerate(entries, 1):
        missing = [k for k in ENTRY_KEYS
                   if not isinstance(entry, dict) or not isinstance(entry.get(k), str)]
        if missing:
            raise UserError(f"{path}: entry {i} lacks {', '.join(missing)} (each entry needs "
                            f"{', '.join(ENTRY_KEYS)} as strings)")
    return entries


def _mapping() -> dict[tuple, str]:
    path = equivalences_path()
    try:
        stamp = f"{path}:{path.stat().st_mtime_ns}"
    except OSError:
        stamp = f"{path}:missing"
    if stamp not in _LOADED:
        _LOADED.clear()
        _LOADED[stamp] = {(e["config"], str(e.get("device", "cpu")), e["from"]): e["to"]
                          for e in load_equivalences(path)}
    return _LOADED[stamp]


def resolve(config: str, source: Optional[str], device: str = "cpu") -> Optional[str]:
    """The digest a stored run of ``source``, configuration ``config`` (:func:`config_of`) and
    device kind ``device`` counts as: followed through the verified equivalences to the newest;
    itself where none applies. An entry holds for the device kind it was checked on (a check
    on the CPU says nothing of a CUDA path)."""
    mapping, seen = _mapping(), set()
    while source is not None and (config, device, source) in mapping and source not in seen:
        seen.add(source)
        source = mapping[config, device, source]
    return source


def is_current(spec, stored: Optional[str], current: Optional[str]) -> bool:
    """Whether a run of ``spec`` (RunSpec, or its stored JSON) stored with digest ``stored`` is
    a run of the code that has digest ``current`` now: the same digest, or one verified
    equivalent for its configuration (``bench.py equate``). ``current`` None (the plugins
    cannot be had here) counts as current: staleness is then unknown."""
    if current is None or stored == current:
        return True
    if not isinstance(stored, str) or not _mapping():
        return False
    try:
        data = _as_dict(spec)                          # parsed once for both
        config, device = config_of(data), device_of(data)
    except (TypeError, ValueError, AttributeError):    # no spec recorded: nothing to resolve
        return False
    return resolve(config, stored, device) == current


def device_of(spec) -> str:
    """The device kind (cpu, cuda) of a RunSpec or its stored JSON."""
    from harness.api import device_kind
    return device_kind(str(_as_dict(spec).get("device") or "cpu"))
