"""Plugin registries: decorator registration, discovery of ``algorithms/`` and ``tasks/`` (and
of entry points and extra folders), and "did you mean …?" look-ups.

A plugin file that fails to import is kept in :attr:`Registry.broken` with its error, so that
``bench.py list`` shows it and a suite naming it gets that error instead of "unknown name".
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Generic, Iterable, TypeVar

from harness.api import Algorithm, Task, UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINT_GROUPS = {"algorithm": "plausible_bench.algorithms", "task": "plausible_bench.tasks"}
PLUGIN_PATH_ENV = "BENCH_PLUGIN_PATH"  # extra plugin folders, os.pathsep-separated

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, base: type):
        self.kind = kind
        self.base = base
        self._classes: dict[str, type] = {}
        self._aliases: dict[str, str] = {}
        self.origin: dict[str, str] = {}
        self.broken: dict[str, str] = {}   # module name -> one-line error

    def register(self, name: str, aliases: Iterable[str] = ()) -> Callable[[type], type]:
        """Class decorator: ``@algorithms.register("bp")``."""
        def decorate(cls: type) -> type:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"@register({name!r}) needs a subclass of {self.base.__name__}")
            existing = self._classes.get(name) or self._classes.get(self._aliases.get(name, ""))
            if existing is not None and existing is not cls:
                raise UserError(f"{self.kind} {name!r} is registered twice: by "
                                f"{_where(existing)} and by {_where(cls)}; rename one (a plugin "
                                f"never replaces another, whatever its class is called)")
            for alias in aliases:
                taken = self._classes.get(alias) or self._classes.get(self._aliases.get(alias, ""))
                if taken is not None and taken is not cls:
                    raise UserError(f"{self.kind} alias {alias!r} of {name!r} ({_where(cls)}) is "
                                    f"already a name of {_where(taken)}")
            cls.name = name
            self._classes[name] = cls
            self.origin[name] = cls.__module__
            for alias in aliases:
                self._aliases[alias] = name
            return cls
        return decorate

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: str) -> bool:
        return name in self._classes or name in self._aliases

    def canonical(self, name: str, where: str = "") -> str:
        if name in self._classes:
            return name
        if name in self._aliases:
            return self._aliases[name]
        prefix = f"{where}: " if where else ""
        for module, error in self.broken.items():
            stem = Path(module).stem if module.endswith(".py") else module.rsplit(".", 1)[-1]
            if stem == name:
                raise UserError(f"{prefix}{self.kind} {name!r} failed to import: {error}")
        valid = self.names()
        close = difflib.get_close_matches(name, valid + list(self._aliases), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"{prefix}unknown {self.kind} {name!r}{hint}; valid: {', '.join(valid)} "
                        f"(a plugin's {self.kind} is found with --plugins DIR or "
                        f"$BENCH_PLUGIN_PATH)")

    def get(self, name: str, where: str = "") -> T:
        return self._classes[self.canonical(name, where)]()

    def describe(self, name: str) -> str:
        doc = (self._classes[name].__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


algorithms: Registry[Algorithm] = Registry("algorithm", Algorithm)
tasks: Registry[Task] = Registry("task", Task)

_discovered: set[str] = set()
_extra_folders: list[str] = []      # plugin folders discovered besides the project's own


def plugin_folders() -> list[str]:
    """Every extra plugin folder this process discovered: a run process discovers the same."""
    return list(_extra_folders)


def _where(cls: type) -> str:
    """The file that defines a plugin class (relative to the project where it lies in it)."""
    module = sys.modules.get(cls.__module__)
    source = getattr(module, "__file__", None)
    if not source:
        return cls.__module__
    try:
        return str(Path(source).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return source


def _one_line(exc: BaseException) -> str:
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return last.replace("\n", " ")


def _import_folder(folder: Path, package: str | None, registry: Registry) -> None:
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module = f"{package}.{path.stem}" if package else f"bench_plugin_{folder.name}_{path.stem}"
        if module in _discovered:
            continue
        _discovered.add(module)
        try:
            if package:
                importlib.import_module(module)
            else:
                spec = importlib.util.spec_from_file_location(module, path)
                assert spec and spec.loader
                loaded = importlib.util.module_from_spec(spec)
                sys.modules[module] = loaded
                spec.loader.exec_module(loaded)
        except UserError:        # a name registered twice: an error, not a broken plugin
            sys.modules.pop(module, None)
            _discovered.discard(module)
            raise
        except Exception as exc:  # a broken plugin is listed, never silently absent
            registry.broken[module if package else str(path)] = _one_line(exc)
        else:
            from harness import fingerprint
            fingerprint.remember(module)       # the code this process runs, as imported


def _entry_points(group: str, registry: Registry) -> None:
    from importlib.metadata import entry_points
    for entry in entry_points(group=group):
        key = f"entry-point:{entry.name}"
        if key in _discovered:
            continue
        _discovered.add(key)
        try:
            entry.load()
        except UserError:
            raise
        except Exception as exc:
            registry.broken[f"{entry.value} (entry point {entry.name})"] = _one_line(exc)


def discover(extra_paths: Iterable[str | os.PathLike] = ()) -> None:
    """Import every plugin: the project's folders, entry points, then extra folders (each may
    hold ``algorithms/`` and ``tasks/`` subfolders, or plugin files directly)."""
    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    _import_folder(PROJECT_ROOT / "algorithms", "algorithms", algorithms)
    _import_folder(PROJECT_ROOT / "tasks", "tasks", tasks)
    _entry_points(ENTRY_POINT_GROUPS["algorithm"], algorithms)
    _entry_points(ENTRY_POINT_GROUPS["task"], tasks)
    paths = list(extra_paths) + [p for p in os.environ.get(PLUGIN_PATH_ENV, "").split(os.pathsep) if p]
    for raw in paths:
        folder = Path(raw)
        if not folder.is_dir():
            raise UserError(f"plugin folder {str(folder)!r} does not exist")
        subfolders = [folder / "algorithms", folder / "tasks"]
        if any(p.is_dir() for p in subfolders):
            for sub, registry in zip(subfolders, (algorithms, tasks)):
                if sub.is_dir():
                    _import_folder(sub, None, registry)
        else:  # a flat folder: files register into whichever registry they use
            _import_folder(folder, None, algorithms)
        if str(folder.resolve()) not in _extra_folders:
            _extra_folders.append(str(folder.resolve()))


# --------------------------------------------------------------------------------------------
# A catalogue of plugin metadata, cached so that `bench.py list` answers without importing torch
# --------------------------------------------------------------------------------------------

CACHE_FILE = PROJECT_ROOT / ".cache" / "plugins.json"


def _fingerprint(extra_paths: Iterable[str | os.PathLike]) -> str:
    import hashlib
    from importlib.metadata import entry_points
    digest = hashlib.sha256(sys.version.encode() + sys.executable.encode())
    folders = [PROJECT_ROOT / "algorithms", PROJECT_ROOT / "tasks", PROJECT_ROOT / "harness"]
    folders += [Path(p) for p in extra_paths]
    folders += [Path(p) for p in os.environ.get(PLUGIN_PATH_ENV, "").split(os.pathsep) if p]
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.py")):
            stat = path.stat()
            digest.update(f"{path}:{stat.st_mtime_ns}:{stat.st_size}".encode())
    for group in ENTRY_POINT_GROUPS.values():
        for entry in entry_points(group=group):
            digest.update(f"{entry.name}={entry.value}".encode())
    return digest.hexdigest()


def _build_catalog() -> dict:
    from harness import params as P
    catalog: dict = {"algorithms": [], "tasks": [],
                     "broken": {"algorithm": dict(algorithms.broken), "task": dict(tasks.broken)}}
    for name in algorithms.names():
        alg = algorithms.get(name)
        catalog["algorithms"].append({
            "name": name, "description": algorithms.describe(name),
            "supports": sorted(alg.supports), "params": P.describe(alg.Params)})
    for name in tasks.names():
        task = tasks.get(name)
        from harness.api import RunContext
        from harness.data import default_data_dir
        presets = task.presets(P.build(task.Params, P.resolve(task.Params, {})),
                               RunContext(data_dir=str(default_data_dir())))
        catalog["tasks"].append({
            "name": name, "description": tasks.describe(name), "loss": task.loss,
            "metrics": dict(task.metrics), "params": P.describe(task.Params),
            "presets": {k: v.describe() for k, v in presets.items()}})
    return catalog


def catalog(extra_paths: Iterable[str | os.PathLike] = ()) -> dict:
    """Name, description, parameters and architectures of every plugin. Served from a cache
    keyed by the plugin files' sizes and times (and the entry points), rebuilt when any
    changes: importing every plugin means importing torch, which takes seconds."""
    import json
    extra_paths = list(extra_paths)
    key = _fingerprint(extra_paths)
    try:
        cached = json.loads(CACHE_FILE.read_text())
        if cached.get("key") == key:
            return cached["catalog"]
    except (OSError, ValueError):
        pass
    discover(extra_paths)
    built = _build_catalog()
    try:
        CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
        tmp = CACHE_FILE.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "catalog": built}))
        tmp.replace(CACHE_FILE)
    except OSError:
        pass  # a read-only checkout still lists, just not as fast
    return built
