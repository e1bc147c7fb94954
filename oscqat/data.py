"""Datasets: digits (scikit-learn, offline, default), cifar10, imagefolder, synthetic.

In-memory sets use ``TensorLoader`` (index tensors, no per-sample Python); shuffling is seeded
per epoch so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F


@dataclass
class DataBundle:
    """Train/val loaders plus what the model needs to know about the inputs."""

    train: "Loader"
    val: "Loader"
    num_classes: int
    in_chans: int
    image_size: int


class TensorLoader:
    """Batches of in-memory tensors; ``set_epoch`` makes the shuffle order reproducible."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0,
                 drop_last: bool = False):
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.x)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


class TorchLoader:
    """A DataLoader wrapper with the same ``set_epoch``/``num_samples`` interface."""

    def __init__(self, dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int, drop_last=False):
        self.dataset = dataset
        self.kw = dict(batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                       pin_memory=torch.cuda.is_available(), persistent_workers=False)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        n, b = len(self.dataset), self.kw["batch_size"]
        return n // b if self.kw["drop_last"] else -(-n // b)

    def __iter__(self):
        from torch.utils.data import DataLoader

        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(DataLoader(self.dataset, shuffle=self.shuffle, generator=gen, **self.kw))


Loader = TensorLoader | TorchLoader


def _split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    n_val = max(1, int(round(n * val_fraction)))
    return order[n_val:], order[:n_val]


def _standardize(x_train: torch.Tensor, x_val: torch.Tensor):
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x_train - mean) / std, (x_val - mean) / std


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def load_digits_tensors(image_size: int | None = None, in_chans: int = 1):
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as float tensors."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    x = _resize(x, image_size)
    if in_chans != 1:
        x = x.expand(-1, in_chans, -1, -1).contiguous()
    return x, y


def synthetic_tensors(n: int, num_classes: int, in_chans: int, size: int, seed: int):
    """Class-dependent random patterns plus noise: learnable, for throughput and tests."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, in_chans, size, size, generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    x = prototypes[y] + 0.8 * torch.randn(n, in_chans, size, size, generator=gen)
    return x, y


def build_data(cfg) -> DataBundle:
    """Build loaders for a ``TrainConfig`` (deterministic train/val split by ``cfg.seed``)."""
    bs = cfg.batch_size
    if cfg.dataset in ("digits", "synthetic"):
        if cfg.dataset == "digits":
            in_chans = 1 if cfg.arch == "demo_net" else 3
            x, y = load_digits_tensors(cfg.image_size, in_chans)
            num_classes = 10
        else:
            size = cfg.image_size or 32
            in_chans, num_classes = 3, 10
            x, y = synthetic_tensors(2048, num_classes, in_chans, size, seed=1234)
        train_idx, val_idx = _split(len(x), cfg.val_fraction, cfg.seed)
        x_train, x_val = _standardize(x[train_idx], x[val_idx])
        return DataBundle(
            train=TensorLoader(x_train, y[train_idx], bs, shuffle=True, seed=cfg.seed),
            val=TensorLoader(x_val, y[val_idx], bs * 2, shuffle=False),
            num_classes=num_classes, in_chans=in_chans, image_size=x.shape[-1],
        )
    if cfg.dataset == "cifar10":
        return _cifar10(cfg)
    if cfg.dataset == "imagefolder":
        return _imagefolder(cfg)
    raise ValueError(f"unknown dataset {cfg.dataset!r}")


def _cifar10(cfg) -> DataBundle:
    import torchvision
    import torchvision.transforms as T

    root = Path(cfg.data_dir or "~/.cache/oscqat/cifar10").expanduser()
    size = cfg.image_size or 32
    norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.Resize(size), T.ToTensor(), norm])
    val_tf = T.Compose([T.Resize(size), T.ToTensor(), norm])
    try:
        train = torchvision.datasets.CIFAR10(str(root), train=True, transform=train_tf, download=cfg.download)
        val = torchvision.datasets.CIFAR10(str(root), train=False, transform=val_tf, download=cfg.download)
    except RuntimeError as exc:
        raise FileNotFoundError(f"CIFAR-10 not found under {root} (set data_dir, or download: true): {exc}") from None
    return DataBundle(
        train=TorchLoader(train, cfg.batch_size, True, cfg.seed, cfg.num_workers, drop_last=True),
        val=TorchLoader(val, cfg.batch_size * 2, False, cfg.seed, cfg.num_workers),
        num_classes=10, in_chans=3, image_size=size,
    )


def _imagefolder(cfg) -> DataBundle:
    import torchvision
    import torchvision.transforms as T

    root = Path(cfg.data_dir).expanduser()
    size = cfg.image_size or 224
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val_tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm])
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"imagefolder expects {root}/train and {root}/val (ImageNet layout)")
    train = torchvision.datasets.ImageFolder(str(root / "train"), train_tf)
    val = torchvision.datasets.ImageFolder(str(root / "val"), val_tf)
    return DataBundle(
        train=TorchLoader(train, cfg.batch_size, True, cfg.seed, cfg.num_workers, drop_last=True),
        val=TorchLoader(val, cfg.batch_size * 2, False, cfg.seed, cfg.num_workers),
        num_classes=len(train.classes), in_chans=3, image_size=size,
    )
