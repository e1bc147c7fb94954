"""Datasets: digits and digits_hard (scikit-learn, offline), cifar10, imagefolder, synthetic.

Every dataset has three splits: ``train``, ``val`` (the *selection* split, carved from the
training data by ``cfg.seed``; what the searcher and ASHA see) and ``test`` (held out, never
selected on). In-memory sets use ``TensorLoader`` (index tensors, no per-sample Python);
shuffling is seeded per epoch so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F


@dataclass
class DataBundle:
    """Train / selection (``val``) / test loaders plus what the model needs to know about the inputs."""

    train: "Loader"
    val: "Loader"  # the selection split (carved from training data)
    test: "Loader"  # held out: measured at the end of a run, never selected on
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
        self.pin = False  # yield batches in pinned memory (see ``stage``)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def stage(self, device: torch.device, resident_fraction: float = 0.125) -> str:
        """Prepare for training on ``device``; returns the mode. On a GPU, a set that fits in
        ``resident_fraction`` of its memory moves there once ("resident": batches are gathered on
        the GPU, no copy per step); a larger one yields pinned batches ("pinned": the trainer's
        ``non_blocking`` copy then overlaps the GPU's work). The batches and their order are the
        same either way (the shuffle is drawn on the CPU). Elsewhere nothing changes ("host")."""
        device = torch.device(device)
        if device.type != "cuda":
            return "host"
        if self.x.device == device:
            return "resident"
        size = self.x.nbytes + self.y.nbytes
        if size <= resident_fraction * torch.cuda.get_device_properties(device).total_memory:
            self.x, self.y, self.pin = self.x.to(device), self.y.to(device), False
            return "resident"
        self.pin = True
        return "pinned"

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
        if self.x.device != order.device:  # resident on a GPU: one small index copy per batch
            order = order.to(self.x.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            if self.pin:
                yield self.x[idx].pin_memory(), self.y[idx].pin_memory()
            else:
                yield self.x[idx], self.y[idx]


class TorchLoader:
    """A DataLoader wrapper with the same ``set_epoch``/``num_samples`` interface (pinned
    batches when CUDA is available)."""

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


def loader_workers(cfg) -> int:
    """DataLoader workers for file-backed sets: ``cfg.num_workers`` when given; else 0 for a
    CPU run (the decoding would take the training's own cores) and, for a GPU run, the CPU
    share this process trains with (``torch.get_num_threads()``: a Ray trial sets it to its
    assigned CPUs) minus one for the training loop, between 1 and 8."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return 0
    return max(1, min(8, torch.get_num_threads() - 1))


# The digits test split is drawn with this constant, never with cfg.seed: every run, trial and
# seed is scored on the same held-out images, and no seed's train/selection split touches them.
DIGITS_TEST_SEED = 20_221_106
DIGITS_TEST_FRACTION = 0.2


def _split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    n_val = max(1, int(round(n * val_fraction)))
    return order[n_val:], order[:n_val]


def three_way_split(n: int, selection_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices (train, selection, test) of ``n`` items: test is fixed (``DIGITS_TEST_SEED``),
    train/selection of the rest follow ``seed``."""
    rest, test = _split(n, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    train_pos, sel_pos = _split(len(rest), selection_fraction, seed)
    return rest[train_pos], rest[sel_pos], test.sort().values


def _standardize(x_train: torch.Tensor, *others: torch.Tensor):
    """Standardise every split with the *train* split's per-channel mean and std."""
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return tuple((x - mean) / std for x in (x_train, *others))


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


def input_channels(cfg) -> int:
    """Grayscale nets see 1 channel; the torchvision/timm nets get the digit repeated over RGB."""
    from oscqat.models import is_grayscale_model

    return 1 if is_grayscale_model(cfg.arch) else 3


def _tensor_bundle(cfg, x_train, y_train, x_val, y_val, x_test, y_test, num_classes: int) -> DataBundle:
    x_train, x_val, x_test = _standardize(x_train, x_val, x_test)
    bs = cfg.batch_size
    return DataBundle(
        train=TensorLoader(x_train, y_train, bs, shuffle=True, seed=cfg.seed),
        val=TensorLoader(x_val, y_val, bs * 2, shuffle=False),
        test=TensorLoader(x_test, y_test, bs * 2, shuffle=False),
        num_classes=num_classes, in_chans=x_train.shape[1], image_size=x_train.shape[-1],
    )


def build_data(cfg) -> DataBundle:
    """Build the three loaders for a ``TrainConfig`` (train/selection split by ``cfg.seed``)."""
    if cfg.dataset == "digits":
        x, y = load_digits_tensors(cfg.image_size, input_channels(cfg))
        tr, sel, te = three_way_split(len(x), cfg.selection_fraction, cfg.seed)
        return _tensor_bundle(cfg, x[tr], y[tr], x[sel], y[sel], x[te], y[te], 10)
    if cfg.dataset == "digits_hard":
        from oscqat.digits_hard import digits_hard_splits

        return _tensor_bundle(cfg, *digits_hard_splits(cfg.image_size, input_channels(cfg), cfg.selection_fraction,
                                                       cfg.seed), 10)
    if cfg.dataset == "synthetic":
        size = cfg.image_size or 32
        x, y = synthetic_tensors(2048, 10, 3, size, seed=1234)
        tr, sel, te = three_way_split(len(x), cfg.selection_fraction, cfg.seed)
        return _tensor_bundle(cfg, x[tr], y[tr], x[sel], y[sel], x[te], y[te], 10)
    if cfg.dataset == "cifar10":
        return _cifar10(cfg)
    if cfg.dataset == "imagefolder":
        return _imagefolder(cfg)
    raise ValueError(f"unknown dataset {cfg.dataset!r}")


def _carve_selection(train_ds, eval_ds, selection_fraction: float, seed: int):
    """Selection = a seeded subset of the training images, read with the evaluation transform."""
    from torch.utils.data import Subset

    train_idx, sel_idx = _split(len(train_ds), selection_fraction, seed)
    return Subset(train_ds, train_idx.tolist()), Subset(eval_ds, sel_idx.tolist())


def _cifar10(cfg) -> DataBundle:
    import torchvision
    import torchvision.transforms as T

    root = Path(cfg.data_dir or "~/.cache/oscqat/cifar10").expanduser()
    size = cfg.image_size or 32
    norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.Resize(size), T.ToTensor(), norm])
    val_tf = T.Compose([T.Resize(size), T.ToTensor(), norm])
    try:
        train_full = torchvision.datasets.CIFAR10(str(root), train=True, transform=train_tf, download=cfg.download)
        train_eval = torchvision.datasets.CIFAR10(str(root), train=True, transform=val_tf, download=False)
        test = torchvision.datasets.CIFAR10(str(root), train=False, transform=val_tf, download=cfg.download)
    except RuntimeError as exc:
        raise FileNotFoundError(f"CIFAR-10 not found under {root} (set data_dir, or download: true): {exc}") from None
    train, sel = _carve_selection(train_full, train_eval, cfg.selection_fraction, cfg.seed)
    workers = loader_workers(cfg)
    return DataBundle(
        train=TorchLoader(train, cfg.batch_size, True, cfg.seed, workers, drop_last=True),
        val=TorchLoader(sel, cfg.batch_size * 2, False, cfg.seed, workers),
        test=TorchLoader(test, cfg.batch_size * 2, False, cfg.seed, workers),
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
    train_full = torchvision.datasets.ImageFolder(str(root / "train"), train_tf)
    train_eval = torchvision.datasets.ImageFolder(str(root / "train"), val_tf)
    test = torchvision.datasets.ImageFolder(str(root / "val"), val_tf)  # val/ is the held-out test split
    train, sel = _carve_selection(train_full, train_eval, cfg.selection_fraction, cfg.seed)
    workers = loader_workers(cfg)
    return DataBundle(
        train=TorchLoader(train, cfg.batch_size, True, cfg.seed, workers, drop_last=True),
        val=TorchLoader(sel, cfg.batch_size * 2, False, cfg.seed, workers),
        test=TorchLoader(test, cfg.batch_size * 2, False, cfg.seed, workers),
        num_classes=len(train_full.classes), in_chans=3, image_size=size,
    )
