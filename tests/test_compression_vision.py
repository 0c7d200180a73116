"""graphtune.compression.vision: the image families, their prunable groups, the data loaders, training.

The CIFAR tests write a few GENERATED (synthetic, random-pixel) images in the real CIFAR "python version"
pickle format under tmp_path; nothing is downloaded. The digits data is scikit-learn's real dataset.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

from graphtune.compression.groups import get_path, set_path
from graphtune.compression.vision import (
    NETWORKS,
    accuracy,
    build_network,
    default_config,
    load_cifar_split,
    load_digits_split,
    load_images,
    register_network,
    train_classifier,
)
from graphtune.errors import ConfigError, DataError

FAMILIES = ["lenet-300-100", "vgg", "resnet-bottleneck"]
SHAPES = [(1, 8), (3, 32)]  # (channels, image size): digits, CIFAR


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(0)


def _config(family, channels=1, size=8, classes=10):
    return default_config(family, in_channels=channels, image_size=size, num_classes=classes)


def _shapes(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- networks


@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_builds_forwards_and_round_trips(family, channels, size):
    config = _config(family, channels, size, classes=7)
    torch.manual_seed(0)
    model = build_network(config)
    assert model.config == config and model.config is not config
    config["widths"][0] = 5  # the model keeps its own copy
    assert model.config["widths"][0] != 5
    torch.manual_seed(0)
    again = build_network(model.config)
    assert _shapes(again) == _shapes(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert model(torch.randn(3, channels, size, size)).shape == (3, 7)
    groups = model.prunable_groups()
    assert groups and len({g.name for g in groups}) == len(groups)
    modules = dict(model.named_modules())
    for group in groups:
        assert all(name in modules for name in group.modules()), group
        assert isinstance(get_path(model.config, group.width), int)


def test_default_widths_and_group_declarations():
    lenet = build_network(_config("lenet-300-100"))
    assert lenet.config["widths"] == [300, 100]
    assert [(g.name, g.width, g.producers, g.norm, g.consumers) for g in lenet.prunable_groups()] == [
        ("fc1", "widths.0", ("fc1",), None, ("fc2",)), ("fc2", "widths.1", ("fc2",), None, ("fc3",))]
    assert lenet.fc1.in_features == 64 and lenet.fc3.out_features == 10 and lenet.fc1.bias is not None

    vgg = build_network(_config("vgg"))
    assert vgg.config["widths"] == [32, 32, "M", 64, 64, "M", 128, 128]
    groups = vgg.prunable_groups()
    assert [g.width for g in groups] == ["widths.0", "widths.1", "widths.3", "widths.4", "widths.6", "widths.7"]
    first = groups[0]
    assert (first.producers, first.norm, first.consumers) == (("features.0",), "features.1", ("features.3",))
    assert groups[-1].consumers == ("classifier",)
    assert all(m.bias is None for m in vgg.modules() if isinstance(m, nn.Conv2d))

    resnet = build_network(_config("resnet-bottleneck"))
    assert len(resnet.config["widths"]) == sum(blocks for blocks, _, _ in resnet.config["stages"])
    groups = resnet.prunable_groups()
    assert len(groups) == 2 * len(resnet.config["widths"])
    assert (groups[0].name, groups[0].width, groups[0].norm, groups[0].consumers) == (
        "layer1.0.conv1", "widths.0.0", "layer1.0.bn1", ("layer1.0.conv2",))
    assert (groups[3].name, groups[3].width, groups[3].consumers) == (
        "layer1.1.conv2", "widths.1.1", ("layer1.1.conv3",))
    assert all(m.bias is None for m in resnet.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("family", FAMILIES)
def test_changing_a_group_width_changes_exactly_its_tensors(family):
    """Rebuilding with one group's width reduced changes exactly producer-out, norm and consumer-in shapes,
    and the pruned state (those channels sliced away) loads strictly into the rebuilt network."""
    model = build_network(_config(family))
    before = _shapes(model)
    for group in model.prunable_groups():
        width = get_path(model.config, group.width)
        keep = torch.arange(0, width, 2)  # every other channel
        config = copy.deepcopy(model.config)
        set_path(config, group.width, len(keep))
        rebuilt = build_network(config)
        after = _shapes(rebuilt)
        assert after.keys() == before.keys()
        expected = {}
        for name in group.producers:
            expected[f"{name}.weight"] = (len(keep), *before[f"{name}.weight"][1:])
            if f"{name}.bias" in before:
                expected[f"{name}.bias"] = (len(keep),)
        if group.norm:
            for suffix in ("weight", "bias", "running_mean", "running_var"):
                expected[f"{group.norm}.{suffix}"] = (len(keep),)
        for name in group.consumers:
            shape = before[f"{name}.weight"]
            expected[f"{name}.weight"] = (shape[0], len(keep), *shape[2:])
        changed = {k: after[k] for k in after if after[k] != before[k]}
        assert changed == expected, group.name

        state = {k: v.clone() for k, v in model.state_dict().items()}
        for key in expected:
            if any(key.startswith(c + ".") for c in group.consumers):
                state[key] = state[key][:, keep]
            else:
                state[key] = state[key][keep]
        rebuilt.load_state_dict(state, strict=True)
        assert rebuilt(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def _touched(model, example, group) -> dict[str, set[str]]:
    """Module names (Linear/Conv2d/BatchNorm) torch-pruning prunes with group's first producer, by handler."""
    names = {module: name for name, module in model.named_modules()}
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    producer = model.get_submodule(group.producers[0])
    fn = tp.prune_linear_out_channels if isinstance(producer, nn.Linear) else tp.prune_conv_out_channels
    touched: dict[str, set[str]] = {"out": set(), "in": set()}
    for dep, _idxs in graph.get_pruning_group(producer, fn, idxs=[0]):
        module = dep.target.module
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
            side = "in" if dep.handler.__name__ == "prune_in_channels" else "out"
            touched[side].add(names[module])
    return touched


@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_groups_match_torch_pruning_dependency_graph(family, channels, size):
    """torch-pruning's dependency graph, traced independently, touches exactly what each group declares:
    the declarations are complete (nothing else must shrink with the channels) and no wider."""
    model = build_network(_config(family, channels, size)).eval()
    example = torch.randn(1, channels, size, size)
    for group in model.prunable_groups():
        touched = _touched(model, example, group)
        assert touched["in"] == set(group.consumers), group.name
        assert touched["out"] == set(group.producers) | ({group.norm} if group.norm else set()), group.name


def test_residual_stream_is_not_a_group():
    """conv3 of a block feeds the residual stream: torch-pruning ties it to the shortcut and later blocks."""
    model = build_network(_config("resnet-bottleneck")).eval()
    declared = {name for g in model.prunable_groups() for name in g.producers}
    assert "layer1.0.conv3" not in declared and "stem.0" not in declared
    fake = dataclasses.make_dataclass("G", ["producers"])(("layer1.0.conv3",))
    touched = _touched(model, torch.randn(1, 1, 8, 8), fake)
    assert {"layer1.0.shortcut.0", "layer1.1.conv1"} <= touched["out"] | touched["in"]


def test_bad_configs_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"compress.model: unknown network 'alexnet'.*lenet-300-100.*vgg"):
        build_network({**_config("vgg"), "family": "alexnet"})
    cases = [
        ({**_config("lenet-300-100"), "widths": [300, 0]}, r"compress.model.widths.1: expected a positive integer"),
        ({**_config("vgg"), "widths": ["M", "M", "M", "M", 8]}, r"compress.model.widths: 4 max pools"),
        ({**_config("vgg"), "in_channels": 0}, r"compress.model.in_channels"),
        ({**_config("resnet-bottleneck"), "widths": [[16, 16]]}, r"compress.model.widths: expected one \[w1, w2\]"),
        ({**_config("vgg"), "widths": (32, "M", object())}, r"JSON-serialisable"),
    ]
    for config, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            build_network(config)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown network"):
        default_config("alexnet", in_channels=1, image_size=8, num_classes=10)


def test_register_network_adds_a_family():
    @register_network("test-tiny")
    def tiny(config):
        return nn.Linear(config["in_channels"] * config["image_size"] ** 2, config["num_classes"])

    try:
        model = build_network({"family": "test-tiny", "in_channels": 1, "image_size": 2, "num_classes": 3})
        assert model.config["family"] == "test-tiny" and "test-tiny" in NETWORKS.names()
        with pytest.raises(ValueError, match="already registered"):
            register_network("test-tiny")(tiny)
    finally:
        NETWORKS.unregister("test-tiny")


# ------------------------------------------------------------------------------------------------ digits


def test_digits_split_sizes_stratified_disjoint_and_train_standardised(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    assert (digits.num_classes, digits.channels, digits.image_size) == (10, 1, 8)
    assert "load_digits" in digits.source and "real" in digits.source
    sizes = [len(digits.y_train), len(digits.y_val), len(digits.y_test)]
    assert sum(sizes) == 1797 and sizes == [1077, 360, 360]
    for x, y in [(digits.x_train, digits.y_train), (digits.x_val, digits.y_val), (digits.x_test, digits.y_test)]:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (1, 8, 8)
        share = np.bincount(y.numpy(), minlength=10) / len(y)  # stratified: every split keeps the class shares
        assert np.abs(share - np.bincount(raw.target) / len(raw.target)).max() < 0.01

    # Undo the standardisation: every split is exact 0..16 pixels, and together they are the dataset once.
    (mean,), (std,) = digits.mean, digits.std
    pixels = [(x * std + mean).numpy().reshape(len(x), 64) for x in (digits.x_train, digits.x_val, digits.x_test)]
    for p in pixels:
        assert np.abs(p - p.round()).max() < 1e-4 and p.round().min() >= 0 and p.round().max() <= 16
    rows = np.concatenate([np.concatenate(pixels).round(), np.concatenate(
        [digits.y_train, digits.y_val, digits.y_test])[:, None]], axis=1)
    full = np.concatenate([raw.data, raw.target[:, None]], axis=1)
    assert np.array_equal(rows[np.lexsort(rows.T[::-1])], full[np.lexsort(full.T[::-1])])  # a partition

    # The statistics are the training split's alone.
    assert abs(float(digits.x_train.mean())) < 1e-5 and abs(float(digits.x_train.std()) - 1) < 1e-3
    assert abs(float(digits.x_test.mean())) > 1e-4  # the test split is not re-centred on itself

    other = load_digits_split(1)
    assert not torch.equal(other.y_test, digits.y_test)
    assert torch.equal(load_digits_split(0).x_val, digits.x_val)
    with pytest.raises(ConfigError, match="val"):
        load_digits_split(0, val=1.5)


# ------------------------------------------------------------------------------------------------- CIFAR


def _write_cifar(folder: Path, *, batches=2, per_class=4, classes=10, fine=False, meta_names=None, seed=0):
    """SYNTHETIC CIFAR: random uint8 images written exactly as the real python-version batches are."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    key = b"fine_labels" if fine else b"labels"
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, batches + 1)] + ["test_batch"]:
        labels = [int(c) for c in rng.permutation(np.repeat(np.arange(classes), per_class))]
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": b"synthetic", key: labels, b"data": data, b"filenames": []}, f, protocol=2)
        written[name] = (data, np.array(labels))
    if meta_names is not None:
        meta_file, meta_key = ("meta", b"fine_label_names") if fine else ("batches.meta", b"label_names")
        with open(folder / meta_file, "wb") as f:
            pickle.dump({meta_key: meta_names}, f)
    return written


def test_cifar10_loader_reads_the_python_format(tmp_path):
    written = _write_cifar(tmp_path / "cifar-10-batches-py", batches=2, per_class=4, meta_names=[b"x"] * 10)
    split = load_cifar_split(tmp_path / "cifar-10-batches-py", seed=0, val=0.25)
    assert (split.num_classes, split.channels, split.image_size) == (10, 3, 32)
    assert (len(split.y_train), len(split.y_val), len(split.y_test)) == (60, 20, 40)
    assert split.x_train.shape == (60, 3, 32, 32) and split.x_train.dtype == torch.float32
    assert split.y_train.dtype == torch.int64
    assert np.array_equal(np.bincount(split.y_val.numpy(), minlength=10), [2] * 10)  # stratified
    # per-channel standardisation from the training split only
    assert split.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (split.x_train.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    # channel-major layout, exactly undone with the stored statistics
    mean, std = torch.tensor(split.mean).view(1, 3, 1, 1), torch.tensor(split.std).view(1, 3, 1, 1)
    data, labels = written["test_batch"]
    restored = (split.x_test * std + mean).reshape(len(data), 3072).numpy()
    assert np.abs(restored - data).max() < 1e-2 and np.array_equal(split.y_test.numpy(), labels)
    assert "CIFAR-10" in split.source
    _write_cifar(tmp_path / "five", batches=2, per_class=5)
    again = load_images(str(tmp_path / "five"), seed=0)  # the default val fraction, 0.1
    assert len(again.y_val) == 10 and len(again.y_train) == 90 and len(again.y_test) == 50


def test_cifar100_fine_labels_and_meta(tmp_path):
    _write_cifar(tmp_path / "c100", batches=1, per_class=4, classes=5, fine=True, meta_names=[b"n"] * 100)
    split = load_cifar_split(tmp_path / "c100", val=0.25)
    assert split.num_classes == 100 and "CIFAR-100" in split.source
    assert len(split.y_train) + len(split.y_val) == 20


@pytest.mark.parametrize("style", ["python2-numpy.core", "protocol-5"])
def test_cifar_batches_pickled_other_ways_load(tmp_path, style):
    """The real files were pickled by Python 2 / numpy 1 (`numpy.core.multiarray`); newer ones by protocol 5."""
    written = _write_cifar(tmp_path / "c", batches=1, per_class=4)
    data, labels = written["test_batch"]
    blob = pickle.dumps({b"data": data, b"labels": [int(v) for v in labels]}, protocol=2 if "2" in style else 5)
    if style == "python2-numpy.core":
        assert b"numpy._core.multiarray" in blob
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # GLOBAL is newline-ended text
    (tmp_path / "c" / "test_batch").write_bytes(blob)
    split = load_cifar_split(tmp_path / "c", val=0.25)
    assert np.array_equal(split.y_test.numpy(), labels) and split.x_test.shape == (40, 3, 32, 32)


def test_cifar_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        load_cifar_split(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="data_batch_1"):
        load_cifar_split(tmp_path / "empty")

    _write_cifar(tmp_path / "no-test")
    (tmp_path / "no-test" / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch.*does not exist"):
        load_cifar_split(tmp_path / "no-test")

    _write_cifar(tmp_path / "bad-shape")
    with open(tmp_path / "bad-shape" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, f, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_2: expected b'data' of shape \(N, 3072\)") as err:
        load_cifar_split(tmp_path / "bad-shape")
    assert "\n" not in str(err.value)

    _write_cifar(tmp_path / "bad-labels")
    with open(tmp_path / "bad-labels" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2]}, f, protocol=2)
    with pytest.raises(DataError, match="test_batch: expected b'labels' as 4 integer labels"):
        load_cifar_split(tmp_path / "bad-labels")

    _write_cifar(tmp_path / "garbage")
    (tmp_path / "garbage" / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_1: expected a CIFAR python-version pickle"):
        load_cifar_split(tmp_path / "garbage")

    with pytest.raises(DataError, match="'digits' or an existing CIFAR"):
        load_images(str(tmp_path / "nowhere"))


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/nonexistent-dir/owned"),))


def test_cifar_loader_refuses_pickled_code(tmp_path):
    _write_cifar(tmp_path / "evil")
    with open(tmp_path / "evil" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Payload(), b"labels": [0]}, f)
    with pytest.raises(DataError, match="data_batch_1.*refusing to load"):
        load_cifar_split(tmp_path / "evil")


# ---------------------------------------------------------------------------------------------- training


def test_train_lenet_on_digits_is_accurate_and_deterministic(digits):
    results, states = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_network(_config("lenet-300-100"))
        result = train_classifier(model, digits, epochs=4, seed=3)
        results.append(result)
        states.append(model.state_dict())
    result = results[0]
    assert result["val_accuracy"] > 0.9 and result["epochs"] == 4 and len(result["history"]) == 4
    assert result["val_accuracy"] == max(result["history"]) == result["history"][result["best_epoch"] - 1]
    assert accuracy(model, digits.x_val, digits.y_val) == result["val_accuracy"]
    assert result["train_seconds"] > 0
    assert results[0]["history"] == results[1]["history"]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert 0.85 < accuracy(model, digits.x_test, digits.y_test) <= 1


def test_train_restores_the_best_epoch_and_never_reads_test(digits):
    """Validation labels shifted by one: the better the model learns the digits, the worse it scores on
    them, so the best epoch is early and must be restored. The test images are NaN: never looked at."""
    nan = torch.full_like(digits.x_test, float("nan"))
    data = dataclasses.replace(digits, y_val=(digits.y_val + 1) % 10, x_test=nan)
    torch.manual_seed(0)
    model = build_network(_config("lenet-300-100"))
    result = train_classifier(model, data, epochs=4, lr=1e-4, seed=0)
    history = result["history"]
    assert result["best_epoch"] < 4 and history[-1] < max(history)
    assert accuracy(model, data.x_val, data.y_val) == max(history) == result["val_accuracy"]
    assert not model.training


def test_train_checks_the_input_shape(digits):
    model = build_network(_config("vgg", channels=3, size=32))
    with pytest.raises(ConfigError, match="3x32x32 images"):
        train_classifier(model, digits, epochs=1)
