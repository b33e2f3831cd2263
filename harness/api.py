"""The contracts between the engine and its plugins.

Everything a plugin needs to know about the harness is in this file:

* architecture specs (plain data, no torch): :class:`Dense`, :class:`Conv`, :class:`Pool`,
  :class:`Flatten`, :class:`Recurrent`, gathered in an :class:`Arch`;
* :class:`Algorithm` (registered, builds a :class:`Learner`) and :class:`Task` (registered,
  loads :class:`TaskData`);
* :class:`RunContext`, what a run tells the plugins about where and how it runs;
* :class:`RunSpec`, :class:`EpochRecord` and :class:`RunResult`, what flows between suite,
  runner and store;
* :class:`UserError`, the one exception whose message is shown to a user without a traceback.

Plugins import from here (and from :mod:`harness.toolkit`), never from the runner, the store or
the report.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Optional, Union

if TYPE_CHECKING:  # torch is imported only where a run needs it
    import torch


class UserError(Exception):
    """A mistake of the user's: shown as one line, no traceback, exit status 2."""


# --------------------------------------------------------------------------------------------
# Architecture specs
# --------------------------------------------------------------------------------------------

ACTIVATIONS = ("tanh", "relu", "sigmoid", "linear")


@dataclass(frozen=True)
class Dense:
    units: int
    act: str = "tanh"
    bias: bool = False              # the DLL paper's networks have none


@dataclass(frozen=True)
class Conv:
    filters: int
    kernel: int
    padding: int = 0
    act: str = "tanh"
    bias: bool = False


@dataclass(frozen=True)
class Pool:
    kind: str = "max"  # max | avg
    size: int = 2


@dataclass(frozen=True)
class Flatten:
    pass


@dataclass(frozen=True)
class Recurrent:
    hidden: int
    act: str = "tanh"


Layer = Union[Dense, Conv, Pool, Flatten, Recurrent]
LAYER_KINDS: dict[str, type] = {"dense": Dense, "conv": Conv, "pool": Pool,
                                "flatten": Flatten, "recurrent": Recurrent}


@dataclass(frozen=True)
class Arch:
    """A network: input shape, layers (the last one is the output layer) and output size.

    ``kind`` is what algorithms declare support for: ``rnn`` if any layer is recurrent,
    ``cnn`` if any is a convolution, ``mlp`` otherwise.
    """

    name: str
    input_shape: tuple[int, ...]
    layers: tuple[Layer, ...]
    output_size: int

    @property
    def kind(self) -> str:
        if any(isinstance(layer, Recurrent) for layer in self.layers):
            return "rnn"
        if any(isinstance(layer, Conv) for layer in self.layers):
            return "cnn"
        return "mlp"

    def describe(self) -> str:
        def one(layer: Layer) -> str:
            if isinstance(layer, Dense):
                return f"dense{layer.units}" + ("" if layer.act == "tanh" else f"({layer.act})")
            if isinstance(layer, Conv):
                return f"conv{layer.filters}k{layer.kernel}p{layer.padding}"
            if isinstance(layer, Pool):
                return f"{layer.kind}pool{layer.size}"
            if isinstance(layer, Recurrent):
                return f"rnn{layer.hidden}"
            return "flatten"
        shape = "x".join(str(s) for s in self.input_shape)
        return f"{shape} > " + " > ".join(one(layer) for layer in self.layers)

    def to_json(self) -> dict:
        return {"name": self.name, "input_shape": list(self.input_shape),
                "output_size": self.output_size,
                "layers": [{type(l).__name__.lower(): dataclasses.asdict(l)} for l in self.layers]}


# --------------------------------------------------------------------------------------------
# The vocabulary: splits and losses
# --------------------------------------------------------------------------------------------

class _Word(str, Enum):
    """A word of the harness's vocabulary: an enum whose members are their own strings (so they
    compare, hash, print and serialise as the plain word)."""

    __str__ = str.__str__
    __format__ = str.__format__


class Split(_Word):
    """Where a metric was measured."""

    TRAIN = "train"              # scalars a learner returns, averaged over the epoch
    VAL = "val"
    TEST = "test"
    DIAGNOSTICS = "diagnostics"  # e.g. the angle between a rule's update and BP's gradient


class Loss(_Word):
    """The loss a task's output error comes from."""

    CROSS_ENTROPY = "cross_entropy"   # softmax + cross-entropy over the last axis
    MSE = "mse"                       # mean squared error


# --------------------------------------------------------------------------------------------
# Hyper-parameters: typed dataclasses whose fields carry their range and help text
# --------------------------------------------------------------------------------------------

def param(default: Any, help: str = "", *, min: float | None = None, max: float | None = None,
          choices: tuple | None = None) -> Any:
    """A typed hyper-parameter with its default, help text and valid range/choices."""
    meta = {"help": help, "min": min, "max": max, "choices": choices}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class NoParams:
    """For plugins without hyper-parameters."""


OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
DECAYS = ("none", "linear", "cosine")


@dataclass(frozen=True)
class TrainParams:
    """The hyper-parameters every algorithm has: its ``Params`` subclasses this and adds its
    own. The harness builds the optimiser and its schedule from them, the same way for every
    algorithm (:func:`harness.toolkit.make_optimizer`)."""

    lr: float = param(1e-3, "learning rate", min=0.0)
    optimizer: str = param("adam", "optimiser by name", choices=OPTIMIZERS)
    momentum: float = param(0.9, "momentum (sgd, rmsprop)", min=0.0, max=1.0)
    weight_decay: float = param(0.0, "L2 weight decay", min=0.0)
    lr_decay: str = param("linear", "per-epoch schedule: linear is the paper's "
                          "lr·(1 − epoch/epochs)", choices=DECAYS)
    label_smoothing: float = param(0.0, "label smoothing of classification targets",
                                   min=0.0, max=0.5)
    init_std: float = param(0.05, "weights ~ N(0, init_std²) (the DLL paper's); "
                            "0 = PyTorch's default init", min=0.0)


# --------------------------------------------------------------------------------------------
# What a run tells the plugins
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunContext:
    device: str = "cpu"
    seed: int = 0
    epochs: int = 1
    batch_size: int = 128
    protocol: str = "clean"        # clean | paper
    validation: float = 0.1        # fraction of the training data in use held out for selection
    data_dir: str = "data"
    threads: int = 1


@dataclass(frozen=True)
class TaskInfo:
    """What an algorithm may know about the task it learns."""

    loss: Loss
    output_size: int
    input_shape: tuple[int, ...]
    sequence: bool = False          # outputs at every time step: (batch, time, output)


@dataclass
class SplitData:
    """One split of a task's data: inputs, targets, and whatever the task's metrics need
    besides them for this split (``extras``: e.g. the persistence forecast's error, the
    normalisation the targets were scaled with). On the CPU; the runner moves x and y."""

    name: Split
    x: "torch.Tensor"
    y: "torch.Tensor"
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class TaskData:
    """The three splits of a task, what algorithms may know of it, and notes recorded with the
    run (split sizes, source, normalisation, …)."""

    train: SplitData
    val: SplitData
    test: SplitData
    info: TaskInfo
    notes: dict = field(default_factory=dict)

    @property
    def splits(self) -> tuple[SplitData, SplitData, SplitData]:
        return self.train, self.val, self.test

    # read access in the old spelling: data.x_train, data.y_test, …
    x_train = property(lambda self: self.train.x)
    y_train = property(lambda self: self.train.y)
    x_val = property(lambda self: self.val.x)
    y_val = property(lambda self: self.val.y)
    x_test = property(lambda self: self.test.x)
    y_test = property(lambda self: self.test.y)


class Learner:
    """One model being trained by one algorithm.

    The harness owns the optimiser: it builds it by name from the algorithm's
    :class:`TrainParams` over the learner's :meth:`parameter_groups`, zeroes the gradients
    before every :meth:`train_step`, steps the optimiser after it, and steps the learning-rate
    schedule after every epoch. So optimisers are equal across algorithms, and a learner only
    computes its update: ``train_step`` sets each parameter's ``.grad`` (the descent direction:
    −Δ for a rule written as an ascent) and returns scalars — at least ``loss``; anything else it
    returns is averaged over the epoch and stored under the split ``train``. Tensors are fine:
    the harness reads them once per epoch, so no step waits for the device.
    """

    def parameter_groups(self) -> list[dict]:
        """``[{"params": [...]}, {"params": [...], "lr": …}, …]``: what the harness's optimiser
        steps (torch's param-group form; a group may set its own ``lr``)."""
        raise NotImplementedError

    def optimizer_settings(self, params: TrainParams) -> TrainParams:
        """The settings the harness builds the optimiser from: the algorithm's own, unless a
        variant declares otherwise (the DLL authors' released RNN code: plain SGD)."""
        return params

    def train_step(self, x: "torch.Tensor", y: "torch.Tensor") -> Mapping[str, Any]:
        raise NotImplementedError

    def predict(self, x: "torch.Tensor") -> "torch.Tensor":
        """The network's output (pre-softmax for classification), without side effects. The
        harness calls it under ``torch.inference_mode()``."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    # optional, for diagnostics (harness/diagnostics.py) ---------------------------------------
    def layer_weights(self) -> Optional[list]:
        """``[(name, weight, bias or None), …]`` of the weighted layers in the architecture's
        order, in torch's layout (dense: out × in): what the alignment diagnostics compare
        with backprop's gradient of the same network. None: the rule does not take part (its
        network is not the architecture's plain one)."""
        return None

    # A rule with feedback may also give ``feedback_pairs() → [(layer name, feedback, what BP
    # uses there)]`` (FA's B and Wᵀ, DLL's Θ and W) or ``feedback_signals(x, y) → [(layer name,
    # the error it sends that hidden layer's output)]`` (DFA's e·B_i).


class Algorithm:
    """Base of learning-algorithm plugins. The class docstring's first line is its description.

    Subclasses set ``name`` (through the ``@algorithms.register`` decorator), ``supports`` (the
    architecture kinds), ``Params`` (a frozen dataclass of :func:`param` fields) and ``build``,
    and ``version``: an integer that enters every run's key, bumped whenever a change makes the
    same spec give other numbers (so stored runs of the old rule are never reused as the new).
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1      # bump when the same spec gives other numbers: it is in the key
    supports: ClassVar[frozenset[str]] = frozenset()
    Params: ClassVar[type] = TrainParams
    # The rule's conv code is measured faster with channels-last tensors on the CPU: the runner
    # then converts its learner's 4-d tensors (harness.nets.prefer_channels_last). A speed
    # setting only — the numbers are the same up to float rounding.
    channels_last: ClassVar[bool] = False

    def unsupported(self, arch: Arch, params: Any) -> Optional[str]:
        """Why this algorithm cannot train ``arch`` (None when it can)."""
        if arch.kind not in self.supports:
            return f"{self.name} does not support {arch.kind} architectures " \
                   f"(supports: {', '.join(sorted(self.supports))})"
        return None

    def build(self, arch: Arch, info: TaskInfo, params: Any, ctx: RunContext) -> Learner:
        raise NotImplementedError


class Task:
    """Base of task plugins. The class docstring's first line is its description.

    ``metrics`` maps each metric name to ``"max"`` or ``"min"`` (its better direction); the
    first is the primary metric that selects epochs and fills the result table.
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1      # bump when the same params give other data or metrics
    Params: ClassVar[type] = NoParams
    loss: ClassVar[Loss] = Loss.CROSS_ENTROPY
    metrics: ClassVar[dict[str, str]] = {"accuracy": "max"}

    @property
    def primary_metric(self) -> str:
        return next(iter(self.metrics))

    def presets(self, params: Any, ctx: RunContext) -> dict[str, Arch]:
        """Named architectures with the paper's sizes (``mlp``, ``cnn``, ``rnn``). Called when a
        suite is read — before any data is fetched — with a context whose ``data_dir`` is the
        run's; the other fields are defaults."""
        raise NotImplementedError

    def datasets(self, params: Any) -> list[str]:
        """Names of the datasets (see :mod:`harness.data`) this task needs."""
        return []

    def load(self, params: Any, ctx: RunContext) -> TaskData:
        raise NotImplementedError

    def evaluate(self, output: "torch.Tensor", target: "torch.Tensor",
                 split: SplitData) -> dict[str, float]:
        """The task's metrics of ``output`` against ``target`` on ``split`` (whose ``extras``
        hold what load() computed for it). Stateless: nothing is kept on the task object."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------

class Status(_Word):
    """What became of a run. ``diverged``: its training loss or primary metric went non-finite;
    ``error``: it raised, its worker died, or it ran past ``--run-timeout``; ``skipped``: it
    could not start (an unsupported architecture, a dataset not present)."""

    OK = "ok"
    DIVERGED = "diverged"
    ERROR = "error"
    SKIPPED = "skipped"


STATUSES = tuple(s.value for s in Status)
DONE_STATUSES = (Status.OK, Status.DIVERGED, Status.ERROR)  # a re-run skips these
PROTOCOLS = ("clean", "paper")
DIAGNOSTICS = ("alignment",)   # what a suite may ask to measure per epoch (harness/diagnostics.py)


def _canonical(value: Any) -> Any:
    if isinstance(value, float) and value == int(value) and abs(value) < 1e15:
        return float(value)  # 1 and 1.0 hash the same only where the types do
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in sorted(value.items())}
    return value


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid. Its :meth:`key` (a hash of what determines the numbers: the
    plugins' names, versions and parameters, the architecture, seed, budget, device and
    protocol) is its identity in the store; the labels, suite and skip reason are not part of
    it. The plugins' *source* is not in the key either: it is recorded beside each run as a
    fingerprint, so runs made with other code are reported as stale, not silently reused."""

    algorithm: str
    params: tuple[tuple[str, Any], ...]
    task: str
    task_params: tuple[tuple[str, Any], ...]
    arch: Arch
    seed: int
    epochs: int
    batch_size: int
    device: str = "cpu"
    protocol: str = "clean"
    validation: float = 0.1
    patience: Optional[int] = None
    algorithm_version: int = 1
    task_version: int = 1
    diagnostics: tuple[str, ...] = ()   # e.g. ("alignment",): extra measurements per epoch
    diagnostics_every: int = 1
    label: str = ""                 # the suite's row label (entry name and grid values)
    task_label: str = ""            # the suite's task entry name (column of the report)
    suite: str = ""
    skip_reason: Optional[str] = field(default=None, compare=False)

    def identity(self) -> dict:
        return {"algorithm": self.algorithm, "algorithm_version": self.algorithm_version,
                "params": dict(self.params), "task": self.task,
                "task_version": self.task_version, "task_params": dict(self.task_params),
                "arch": self.arch.to_json(), "seed": self.seed, "epochs": self.epochs,
                "batch_size": self.batch_size, "device": device_kind(self.device),
                "protocol": self.protocol, "validation": self.validation,
                "patience": self.patience,
                # only when asked for, so that runs without them keep their keys
                **({"diagnostics": list(self.diagnostics),
                    "diagnostics_every": self.diagnostics_every} if self.diagnostics else {})}

    def key(self) -> str:
        cached = self.__dict__.get("_key")
        if cached is None:
            text = json.dumps(_canonical(self.identity()), sort_keys=True, default=str)
            cached = hashlib.sha256(text.encode()).hexdigest()[:20]
            object.__setattr__(self, "_key", cached)
        return cached

    def to_json(self) -> dict:
        data = self.identity()
        data.update(device=self.device, label=self.label, task_label=self.task_label,
                    suite=self.suite, skip_reason=self.skip_reason)
        return data

    def context(self, data_dir: str, threads: int) -> RunContext:
        return RunContext(device=self.device, seed=self.seed, epochs=self.epochs,
                          batch_size=self.batch_size, protocol=self.protocol,
                          validation=self.validation, data_dir=data_dir, threads=threads)


def device_kind(device: str) -> str:
    """``cuda:3`` → ``cuda``: which GPU of a node a run lands on does not change its numbers,
    so it is recorded with the run but kept out of its key."""
    return device.split(":", 1)[0]


@dataclass(frozen=True)
class Selection:
    """What each protocol selects from a run's epochs: ``clean`` takes the epoch best on
    validation and reports its test value; ``paper`` the best test value over epochs (as the
    DLL paper does)."""

    metric: Optional[str] = None
    direction: Optional[str] = None
    clean_epoch: Optional[int] = None
    clean_val: Optional[float] = None
    clean_test: Optional[float] = None
    paper_epoch: Optional[int] = None
    paper_test: Optional[float] = None


@dataclass
class EpochRecord:
    epoch: int                      # 1-based
    train_time_s: float
    eval_time_s: float
    train_loss: float
    metrics: dict[str, dict[str, Optional[float]]]   # Split -> metric -> value
    lr: Optional[float] = None
    warmup: bool = False            # the first epoch (allocations, lazy init) is flagged


@dataclass
class RunResult:
    spec: RunSpec
    status: str                     # a Status
    reason: str = ""
    traceback: str = ""
    epochs: list[EpochRecord] = field(default_factory=list)
    peak_memory_mb: Optional[float] = None
    memory_kind: str = ""           # process_rss | cuda_max_allocated
    threads: int = 1
    started_at: str = ""
    finished_at: str = ""
    n_parameters: Optional[int] = None
    notes: dict = field(default_factory=dict)
    selection: Selection = field(default_factory=Selection)
    fingerprint: dict = field(default_factory=dict)  # source digests of the code that ran it
