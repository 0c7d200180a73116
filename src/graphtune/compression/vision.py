"""Small image classifiers for data-free compression (LBYL / PA-DFCR), their data and their training.

Data-free compression (prune output channels by their L2 norm, then compensate the pruned channels in
closed form in the next layer) is evaluated in the literature on image classifiers. This module gives the
three model families that work uses, small enough to train on two CPU cores, each declaring the channels
it lets compression remove (graphtune.compression.groups):

- ``lenet-300-100``: the classic MLP, flatten -> fc1 (300) -> ReLU -> fc2 (100) -> ReLU -> fc3.
  ``widths`` lists the hidden sizes; every hidden layer is a group (producer fc<i>, consumer fc<i+1>).
- ``vgg``: VGG-style CNN, units conv3x3 (no bias) + BatchNorm2d + ReLU and "M" (2x2 max pool) entries,
  then global average pooling and one Linear. ``widths`` is the VGG list (ints and "M"); every conv is a
  group (producer the conv, norm its BN, consumer the next conv or the classifier).
- ``resnet-bottleneck``: ResNet-style, stem conv3x3 + BN + ReLU, stages of bottleneck blocks
  (1x1 -> 3x3 -> 1x1 with an identity or 1x1-conv shortcut), global average pooling and one Linear.
  ``widths`` holds one [w1, w2] per block (the two inner widths); conv1 and conv2 of each block are the
  groups. conv3 writes into the residual stream, which every later block and the shortcut share, so it is
  never a group (as in LBYL).

A network is built from a JSON-serialisable config (``default_config`` gives the defaults) and keeps a deep
copy of it as ``model.config``; a group's ``width`` is the dotted path of its channel count in that config,
so a pruned network is rebuilt with smaller widths and loads the pruned state strictly.

Data (all real, nothing downloaded):

- ``digits``: scikit-learn's ``load_digits``, 1,797 real 8x8 grey-scale handwritten digits (0-16
  intensities) that ship inside scikit-learn. Split stratified and seeded into train / validation / test.
- CIFAR-10 / CIFAR-100: the "python version" folder a user already has (``data_batch_*``, ``test_batch``).
  GraphTune never fetches it; the tests write a few generated (synthetic) images in the same format.

``train_classifier`` trains with Adam and cross-entropy, selects the epoch on validation accuracy only
(the test split is never looked at) and restores that epoch's weights.
"""

from __future__ import annotations

import copy
import io
import json
import math
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from graphtune.compression.groups import PruneGroup
from graphtune.errors import ConfigError, DataError, TrainingDiverged
from graphtune.registry import Registry

__all__ = [
    "NETWORKS",
    "ImageSplit",
    "accuracy",
    "build_network",
    "default_config",
    "load_cifar_split",
    "load_digits_split",
    "load_images",
    "register_network",
    "train_classifier",
]

OPTION = "compress.model"  # the option a network config comes from, for messages

NETWORKS: Registry[Callable[[dict], nn.Module]] = Registry("network", option=OPTION)


def register_network(name: str):
    """Decorator that registers `builder(config: dict) -> nn.Module` as the network family `name`."""

    def decorator(builder: Callable[[dict], nn.Module]):
        NETWORKS.register(name, builder, owner=builder.__module__)
        return builder

    return decorator


def build_network(config: dict) -> nn.Module:
    """The network `config` describes (see the module docstring); it keeps a deep copy as `model.config`.

    ConfigError (one line naming the entry and what was expected) for an unknown family or a bad entry."""
    if not isinstance(config, dict):
        raise ConfigError(f"{OPTION}: expected a network config (a mapping), got {type(config).__name__}")
    try:  # a JSON round trip: a deep copy that is plain lists/dicts (tuples become lists, set_path works)
        config = json.loads(json.dumps(config))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{OPTION}: the network config must be JSON-serialisable ({err})") from None
    family = config.get("family")
    if not isinstance(family, str):
        raise ConfigError(f"{OPTION}.family: expected a network family name, got {family!r}")
    builder = NETWORKS.get(family)  # ConfigError listing the known families
    for key in ("in_channels", "image_size", "num_classes"):
        _positive_int(config.get(key), key)
    model = builder(config)
    model.config = config
    return model


def default_config(family: str, *, in_channels: int, image_size: int, num_classes: int) -> dict:
    """The default config of `family` for images of `in_channels` x `image_size` x `image_size`.

    Small images (under 16 pixels, e.g. 8x8 digits) get a small network; larger ones (CIFAR's 32x32) a
    deeper one, kept narrow for CPUs (see the comments for the costs)."""
    base = {"family": family, "in_channels": in_channels, "image_size": image_size, "num_classes": num_classes}
    small = image_size < 16
    if family == "lenet-300-100":
        return {**base, "widths": [300, 100]}
    if family == "vgg":
        if small:  # two pools: 8x8 -> 4x4 -> 2x2
            return {**base, "widths": [32, 32, "M", 64, 64, "M", 128, 128]}
        # VGG-11-like depth at half the usual widths (64..512 -> 32..256): 1.2 M parameters and 53 M
        # multiply-adds per 32x32 image, a quarter of the full widths' cost, which matters on two CPU cores
        # (measured ~1-2 s per batch of 64 there, i.e. 10-20 minutes per CIFAR epoch; digits take seconds).
        return {**base, "widths": [32, 32, "M", 64, 64, "M", 128, 128, "M", 256, 256]}
    if family == "resnet-bottleneck":
        if small:  # stages [blocks, out channels, stride]: 8x8 -> 8x8 -> 4x4
            stages = [[2, 64, 1], [2, 128, 2]]
            mids = [16, 32]
        else:  # 32x32 -> 32 -> 16 -> 8, ResNet-style 4x bottleneck expansion; 0.2 M parameters, 35 M
            # multiply-adds per image, kept narrow for CPUs (full-resolution stages are memory-bound there)
            stages = [[2, 64, 1], [2, 128, 2], [2, 256, 2]]
            mids = [16, 32, 64]
        widths = [[mid, mid] for (blocks, _, _), mid in zip(stages, mids) for _ in range(blocks)]
        return {**base, "stem": 32, "stages": stages, "widths": widths}
    NETWORKS.get(family)  # an unregistered name: ConfigError listing the known families
    raise ConfigError(f"{OPTION}: network {family!r} has no default config; give its config in full")


# ----------------------------------------------------------------------------------------- config checks


def _positive_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{OPTION}.{where}: expected a positive integer, got {value!r}")
    return value


def _int_list(value, where: str, *, allow_pool: bool = False) -> list:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{OPTION}.{where}: expected a non-empty list, got {value!r}")
    for i, item in enumerate(value):
        if not (allow_pool and item == "M"):
            _positive_int(item, f"{where}.{i}")
    return value


class VisionNetwork(nn.Module):
    """Base of the families: `config` (set by build_network) and the groups compression may prune."""

    config: dict

    def prunable_groups(self) -> list[PruneGroup]:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ LeNet


class LeNet(VisionNetwork):
    """flatten -> fc1 -> ReLU -> ... -> fc<k> -> ReLU -> fc<k+1> (the classifier); biases on."""

    def __init__(self, in_features: int, widths: list[int], num_classes: int):
        super().__init__()
        self.depth = len(widths) + 1
        sizes = [in_features, *widths, num_classes]
        for i in range(self.depth):
            setattr(self, f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1]))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.depth):
            x = self.relu(getattr(self, f"fc{i}")(x))
        return getattr(self, f"fc{self.depth}")(x)

    def prunable_groups(self) -> list[PruneGroup]:
        return [PruneGroup(name=f"fc{i + 1}", width=f"widths.{i}", producers=(f"fc{i + 1}",), consumers=(f"fc{i + 2}",))
                for i in range(self.depth - 1)]


@register_network("lenet-300-100")
def _lenet(config: dict) -> nn.Module:
    widths = _int_list(config.get("widths"), "widths")
    return LeNet(config["in_channels"] * config["image_size"] ** 2, widths, config["num_classes"])


# -------------------------------------------------------------------------------------------------- VGG


class VGG(VisionNetwork):
    """features (conv3x3 + BN + ReLU units and 2x2 max pools) -> global average pool -> classifier."""

    def __init__(self, in_channels: int, widths: list, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        self._convs: list[tuple[int, str, str]] = []  # (index in widths, conv name, BN name), forward order
        channels = in_channels
        for k, entry in enumerate(widths):
            if entry == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            self._convs.append((k, f"features.{len(layers)}", f"features.{len(layers) + 1}"))
            layers += [nn.Conv2d(channels, entry, 3, padding=1, bias=False), nn.BatchNorm2d(entry), nn.ReLU()]
            channels = entry
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))

    def prunable_groups(self) -> list[PruneGroup]:
        # A max pool between a unit and the next conv and the final average pool are per-channel, so a
        # channel still enters exactly one input channel of its consumer (GAP keeps channels 1:1 with the
        # classifier's inputs). The pool is not linear: compensation through it is an approximation, as in LBYL.
        groups = []
        for j, (k, conv, bn) in enumerate(self._convs):
            consumer = self._convs[j + 1][1] if j + 1 < len(self._convs) else "classifier"
            groups.append(PruneGroup(name=conv, width=f"widths.{k}", producers=(conv,), consumers=(consumer,), norm=bn))
        return groups


@register_network("vgg")
def _vgg(config: dict) -> nn.Module:
    widths = _int_list(config.get("widths"), "widths", allow_pool=True)
    if all(w == "M" for w in widths):
        raise ConfigError(f"{OPTION}.widths: expected at least one convolution width, got {widths!r}")
    pools = widths.count("M")
    if config["image_size"] >> pools < 1:
        raise ConfigError(f"{OPTION}.widths: {pools} max pools shrink {config['image_size']}x{config['image_size']} "
                          f"images below 1x1; use at most {int(math.log2(config['image_size']))}")
    return VGG(config["in_channels"], widths, config["num_classes"])


# --------------------------------------------------------------------------------------- ResNet bottleneck


class Bottleneck(nn.Module):
    """conv1 1x1 + bn1 + ReLU -> conv2 3x3 (stride) + bn2 + ReLU -> conv3 1x1 + bn3, + shortcut, ReLU."""

    def __init__(self, in_channels: int, w1: int, w2: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, w1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = nn.Conv2d(w1, w2, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w2)
        self.conv3 = nn.Conv2d(w2, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        if stride != 1 or in_channels != out_channels:  # the shape changes: project the shortcut
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNetBottleneck(VisionNetwork):
    """stem (conv3x3 + BN + ReLU) -> layer1..layerS of Bottleneck blocks -> global average pool -> classifier."""

    def __init__(self, in_channels: int, stem: int, stages: list, widths: list, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem),
                                  nn.ReLU())
        self._blocks: list[str] = []  # block names in forward order, block b's widths are widths[b]
        channels = stem
        for s, (blocks, out, stride) in enumerate(stages):
            layer = []
            for j in range(blocks):
                w1, w2 = widths[len(self._blocks)]
                layer.append(Bottleneck(channels, w1, w2, out, stride if j == 0 else 1))
                self._blocks.append(f"layer{s + 1}.{j}")
                channels = out
            setattr(self, f"layer{s + 1}", nn.Sequential(*layer))
        self.num_stages = len(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for s in range(self.num_stages):
            x = getattr(self, f"layer{s + 1}")(x)
        return self.classifier(self.pool(x).flatten(1))

    def prunable_groups(self) -> list[PruneGroup]:
        # Only the two inner widths of each block. conv3 (and the stem and the shortcut convs) write into the
        # residual stream: its channels are added to the shortcut's and read by every later block, so pruning
        # one would change what the additions mix; LBYL leaves them whole too.
        groups = []
        for b, block in enumerate(self._blocks):
            groups.append(PruneGroup(name=f"{block}.conv1", width=f"widths.{b}.0", producers=(f"{block}.conv1",),
                                     consumers=(f"{block}.conv2",), norm=f"{block}.bn1"))
            groups.append(PruneGroup(name=f"{block}.conv2", width=f"widths.{b}.1", producers=(f"{block}.conv2",),
                                     consumers=(f"{block}.conv3",), norm=f"{block}.bn2"))
        return groups


@register_network("resnet-bottleneck")
def _resnet_bottleneck(config: dict) -> nn.Module:
    stem = _positive_int(config.get("stem"), "stem")
    stages = config.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{OPTION}.stages: expected a non-empty list of [blocks, out_channels, stride], "
                          f"got {stages!r}")
    for s, stage in enumerate(stages):
        if not isinstance(stage, list) or len(stage) != 3:
            raise ConfigError(f"{OPTION}.stages.{s}: expected [blocks, out_channels, stride], got {stage!r}")
        for i, what in enumerate(("blocks", "out_channels", "stride")):
            _positive_int(stage[i], f"stages.{s}.{i} ({what})")
    blocks = sum(stage[0] for stage in stages)
    widths = config.get("widths")
    if not isinstance(widths, list) or len(widths) != blocks:
        raise ConfigError(f"{OPTION}.widths: expected one [w1, w2] per block ({blocks} blocks), got {widths!r}")
    for b, pair in enumerate(widths):
        if not isinstance(pair, list) or len(pair) != 2:
            raise ConfigError(f"{OPTION}.widths.{b}: expected [w1, w2] (the block's two inner widths), got {pair!r}")
        _positive_int(pair[0], f"widths.{b}.0")
        _positive_int(pair[1], f"widths.{b}.1")
    return ResNetBottleneck(config["in_channels"], stem, stages, widths, config["num_classes"])


# ------------------------------------------------------------------------------------------------- data


@dataclass
class ImageSplit:
    """Images (N, C, H, W) float32, standardised with training statistics; labels (N,) int64."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str  # one line: where the data came from
    mean: tuple[float, ...] = ()  # per channel, subtracted from the raw values (training split only)
    std: tuple[float, ...] = ()  # per channel, divided after that (x = (raw - mean) / std)

    def __repr__(self) -> str:
        return (f"ImageSplit({self.name!r}, {self.num_classes} classes, {self.channels}x{self.image_size}x"
                f"{self.image_size}, train/val/test {len(self.y_train)}/{len(self.y_val)}/{len(self.y_test)})")


def _fraction(value, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(f"{option}: expected a fraction strictly between 0 and 1, got {value!r}")
    return float(value)


def load_digits_split(seed: int = 0, *, val: float = 0.2, test: float = 0.2) -> ImageSplit:
    """scikit-learn's 1,797 real 8x8 digits, split stratified by `seed` into train / val / test fractions.

    Standardised with ONE mean and std over every pixel of the training split: the 64 pixels share one
    intensity scale (0-16), and per-pixel statistics would divide the border pixels, which are (almost)
    always 0 in training, by a tiny std and blow up the rare test image that inks them."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    val = _fraction(val, "val")
    test = _fraction(test, "test")
    if val + test >= 1:
        raise ConfigError(f"val + test: expected a sum below 1 (a training split must remain), got {val + test:g}")
    digits = load_digits()
    images = digits.images.astype(np.float32)  # (1797, 8, 8), 0..16
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    rest, test_idx = train_test_split(index, test_size=test, random_state=seed, stratify=labels)
    train_idx, val_idx = train_test_split(rest, test_size=val / (1 - test), random_state=seed, stratify=labels[rest])
    mean = float(images[train_idx].mean())
    std = float(images[train_idx].std())

    def part(idx):
        x = torch.from_numpy((images[idx] - mean) / std).unsqueeze(1)  # (n, 1, 8, 8)
        return x.contiguous(), torch.from_numpy(labels[idx])

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = part(train_idx), part(val_idx), part(test_idx)
    return ImageSplit(name="digits", num_classes=10, channels=1, image_size=8, x_train=x_train, y_train=y_train,
                      x_val=x_val, y_val=y_val, x_test=x_test, y_test=y_test,
                      source=f"scikit-learn load_digits (real, {len(labels):,} 8x8 images), "
                             f"stratified split seed {seed}",
                      mean=(mean,), std=(std,))


# Only what a CIFAR "python version" batch holds: numpy arrays, dtypes and (Python 3 pickles) bytes.
# Unpickling anything else could run code, so it is refused.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core."):  # old pickles; numpy 2 keeps these under numpy._core
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _unpickle(path: Path) -> object:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror or err})") from None
    try:
        return _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # any unpickling failure is a malformed file
        raise DataError(f"{path}: expected a CIFAR python-version pickle, could not unpickle it ({err})") from None


def _key(d: dict, name: str):
    return d.get(name.encode(), d.get(name))  # Python 2 pickles (the real files) have bytes keys


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(data (N, 3072) uint8, labels (N,) int64, label key) of one batch file; DataError naming it otherwise."""
    batch = _unpickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict with b'data' and b'labels' or b'fine_labels', "
                        f"got {type(batch).__name__}")
    data = _key(batch, "data")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] == 0:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path}: expected b'data' of shape (N, 3072) (32x32 RGB, channel-major), got {shape}")
    if data.dtype != np.uint8:
        raise DataError(f"{path}: expected b'data' of dtype uint8, got {data.dtype}")
    key = "fine_labels" if _key(batch, "fine_labels") is not None else "labels"
    labels = _key(batch, key)
    if labels is None:
        raise DataError(f"{path}: expected b'labels' (CIFAR-10) or b'fine_labels' (CIFAR-100), found neither")
    try:
        labels = np.asarray(labels)
    except ValueError:
        labels = None
    if labels is None or labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        shape = getattr(labels, "shape", None)
        raise DataError(f"{path}: expected b'{key}' as {data.shape[0]} integer labels (one per image), "
                        f"got shape {shape}")
    if labels.min() < 0:
        raise DataError(f"{path}: expected labels >= 0, got {labels.min()}")
    return data, labels.astype(np.int64), key


def load_cifar_split(folder: str | Path, seed: int = 0, *, val: float = 0.1) -> ImageSplit:
    """A CIFAR-10/100 "python version" folder the user has: data_batch_1..5 (those present) and test_batch.

    Validation: a stratified, seeded `val` fraction of the training batches. Standardised per channel with
    the training split's statistics. DataError (one line naming the file and what was expected) for a
    missing folder or file or a malformed batch. Only numpy arrays are unpickled (see _BatchUnpickler)."""
    from sklearn.model_selection import train_test_split

    val = _fraction(val, "val")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: expected a CIFAR python-version folder (data_batch_1..5, test_batch), "
                        "it does not exist")
    train_files = [folder / f"data_batch_{i}" for i in range(1, 6) if (folder / f"data_batch_{i}").is_file()]
    if not train_files:
        raise DataError(f"{folder / 'data_batch_1'}: expected at least one training batch data_batch_1..5 in "
                        f"{folder}, found none")
    test_file = folder / "test_batch"
    if not test_file.is_file():
        raise DataError(f"{test_file}: expected the CIFAR test batch, it does not exist")

    parts = [_read_batch(path) for path in train_files]
    keys = {key for _, _, key in parts}
    x_test_raw, y_test, test_key = _read_batch(test_file)
    if len(keys | {test_key}) > 1:
        raise DataError(f"{folder}: expected every batch to hold the same labels (b'labels' or b'fine_labels'), "
                        "got both")
    key = test_key
    num_classes, names = (100, "CIFAR-100") if key == "fine_labels" else (10, "CIFAR-10")
    for meta_name, meta_key in (("meta", "fine_label_names"), ("batches.meta", "label_names")):
        meta_path = folder / meta_name
        if meta_path.is_file() and (key == "fine_labels") == (meta_name == "meta"):
            meta = _unpickle(meta_path)
            label_names = _key(meta, meta_key) if isinstance(meta, dict) else None
            if not isinstance(label_names, list) or not label_names:
                raise DataError(f"{meta_path}: expected a pickled dict with a non-empty b'{meta_key}' list")
            num_classes = len(label_names)
    x_all = np.concatenate([data for data, _, _ in parts])
    y_all = np.concatenate([labels for _, labels, _ in parts])
    for path, labels in [*((p, lab) for p, (_, lab, _) in zip(train_files, parts)), (test_file, y_test)]:
        if labels.max() >= num_classes:
            raise DataError(f"{path}: expected labels below {num_classes} ({names}), got {labels.max()}")

    index = np.arange(len(y_all))
    try:
        train_idx, val_idx = train_test_split(index, test_size=val, random_state=seed, stratify=y_all)
    except ValueError as err:
        raise DataError(f"{folder}: cannot carve a stratified validation fraction {val:g} from "
                        f"{len(y_all)} training images ({err})") from None

    def images(data: np.ndarray) -> np.ndarray:
        return data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0

    x_train = images(x_all[train_idx])
    mean = x_train.mean(axis=(0, 2, 3), dtype=np.float64)
    std = x_train.std(axis=(0, 2, 3), dtype=np.float64)
    std = np.maximum(std, 1e-3)  # a constant channel (never in real CIFAR) must not divide by zero
    scale = (mean.reshape(1, 3, 1, 1).astype(np.float32), std.reshape(1, 3, 1, 1).astype(np.float32))

    def standardise(x: np.ndarray) -> torch.Tensor:
        x -= scale[0]
        x /= scale[1]
        return torch.from_numpy(x)

    count = len(y_all) + len(y_test)
    return ImageSplit(
        name=folder.name or str(folder), num_classes=num_classes, channels=3, image_size=32,
        x_train=standardise(x_train), y_train=torch.from_numpy(y_all[train_idx]),
        x_val=standardise(images(x_all[val_idx])), y_val=torch.from_numpy(y_all[val_idx]),
        x_test=standardise(images(x_test_raw)), y_test=torch.from_numpy(y_test),
        source=f"{names} python-version batches in {folder} ({count:,} 32x32 images, "
               f"{len(train_files)} training batch(es)), validation split seed {seed}",
        mean=tuple(float(m * 255) for m in mean), std=tuple(float(s * 255) for s in std))


def load_images(dataset: str, seed: int = 0) -> ImageSplit:
    """"digits" (scikit-learn's, built in) or the path of a CIFAR-10/100 python-version folder."""
    if dataset == "digits":
        return load_digits_split(seed)
    if not isinstance(dataset, (str, Path)) or not Path(dataset).is_dir():
        raise DataError(f"{dataset}: expected 'digits' or an existing CIFAR-10/100 python-version folder")
    return load_cifar_split(dataset, seed)


# --------------------------------------------------------------------------------------------- training


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512) -> float:
    """Fraction of `x` that `model` (in eval mode, without gradients) labels `y`; its mode is restored."""
    if len(y) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    device = _device(model)
    correct = 0
    try:
        for start in range(0, len(y), batch_size):
            logits = model(x[start:start + batch_size].to(device))
            correct += int((logits.argmax(1).cpu() == y[start:start + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / len(y)


def train_classifier(model: nn.Module, data: ImageSplit, *, epochs: int = 30, lr: float = 1e-3, batch_size: int = 64,
                     weight_decay: float = 0.0, seed: int = 0) -> dict:
    """Adam + cross-entropy on data's training split, shuffled by `seed`; keeps the epoch with the best
    validation accuracy (the first, on ties) and restores it. Never looks at the test split.

    Returns {"epochs", "best_epoch" (1-based), "val_accuracy", "train_seconds", "history" (val acc per epoch)}.
    The model is left in eval mode. TrainingDiverged when the training loss becomes NaN or inf."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs: expected a positive integer, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}")
    config = getattr(model, "config", None)
    if isinstance(config, dict) and "in_channels" in config:
        want = (config["in_channels"], config["image_size"], config["image_size"])
        if tuple(data.x_train.shape[1:]) != want:
            raise ConfigError(f"{OPTION}: the network is built for {want[0]}x{want[1]}x{want[2]} images, "
                              f"{data.name} has {'x'.join(map(str, data.x_train.shape[1:]))}")
    if len(data.y_val) == 0 or len(data.y_train) == 0:
        raise DataError(f"{data.name}: expected non-empty training and validation splits")
    device = _device(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    history: list[float] = []
    best_state, best_epoch, best_acc = None, 0, -1.0
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(n, generator=generator)
        for first in range(0, n, batch_size):
            idx = order[first:first + batch_size]
            if len(idx) < 2 and n >= 2:  # a lone image breaks BatchNorm's batch statistics: skip it
                continue
            x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
            loss = loss_fn(model(x), y)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"train_classifier: the training loss became {loss.item()} in epoch {epoch} "
                                       f"(lr {lr:g}); try a smaller lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        acc = accuracy(model, data.x_val, data.y_val)
        history.append(acc)
        if acc > best_acc:
            best_acc, best_epoch = acc, epoch
            best_state = copy.deepcopy(model.state_dict())
    seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    model.eval()
    return {"epochs": epochs, "best_epoch": best_epoch, "val_accuracy": best_acc, "train_seconds": seconds,
            "history": history}
