"""Series backbones, losses, metrics and the scikit-learn reference (graphtune.series.models / losses / metrics /
reference). Everything runs on small generated (synthetic) windows; nothing is downloaded."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    precision_score,
    r2_score,
    recall_score,
    roc_auc_score,
)

from graphtune.errors import ConfigError, DataError, GraphTuneNotice
from graphtune.series.losses import classify_loss, global_pos_weight, regress_loss, soft_f1
from graphtune.series.metrics import (
    best_threshold,
    classify_metrics,
    classify_plots,
    regress_metrics,
    regress_plots,
)
from graphtune.series.models import BACKBONES, build_backbone, default_patch_length, unwrap
from graphtune.series.reference import Reference

C, L = 3, 12
CASES = [(name, task) for name in ("conv", "ttm") for task in ("classify", "regress")]


def _x(batch: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, C, L, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ losses


@pytest.mark.parametrize("seed", range(6))
def test_soft_f1_equals_sklearn_f1_on_binary_inputs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    y = (rng.random(n) < rng.uniform(0.05, 0.6)).astype(np.float32)
    p = (rng.random(n) < rng.uniform(0.05, 0.6)).astype(np.float32)
    ours = soft_f1(torch.from_numpy(p), torch.from_numpy(y)).item()
    assert ours == pytest.approx(f1_score(y, p, zero_division=0), rel=1e-6, abs=1e-7)


def test_soft_f1_edge_cases_match_sklearn():
    zeros, ones = torch.zeros(7), torch.ones(7)
    assert soft_f1(zeros, zeros).item() == f1_score(zeros.numpy(), zeros.numpy(), zero_division=0) == 0.0
    assert soft_f1(ones, ones).item() == pytest.approx(1.0)
    assert soft_f1(ones, zeros).item() == 0.0


def test_classify_loss_alpha_one_is_exactly_bce():
    logits = torch.randn(64) * 3
    targets = (torch.rand(64) < 0.2).float()
    assert torch.equal(classify_loss(logits, targets, alpha=1.0, pos_weight=None),
                       torch.nn.BCEWithLogitsLoss()(logits, targets))
    pw = 4.25
    assert torch.equal(classify_loss(logits, targets, alpha=1, pos_weight=pw),
                       torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pw))(logits, targets))


def test_classify_loss_alpha_zero_and_mix():
    logits = torch.randn(64, requires_grad=True)
    targets = (torch.rand(64) < 0.3).float()
    f1 = soft_f1(torch.sigmoid(logits), targets)
    assert torch.equal(classify_loss(logits, targets, alpha=0.0, pos_weight=3.0), 1 - f1)
    mixed = classify_loss(logits, targets, alpha=0.25, pos_weight=3.0)
    bce = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=torch.tensor(3.0))
    assert torch.allclose(mixed, 0.25 * bce + 0.75 * (1 - f1))
    mixed.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(ConfigError, match="alpha"):
        classify_loss(logits, targets, alpha=1.5, pos_weight=None)


def test_regress_loss_and_pos_weight():
    pred, target = torch.randn(32), torch.randn(32)
    assert torch.equal(regress_loss(pred, target), F.mse_loss(pred, target))
    assert torch.equal(regress_loss(pred, target, "mae"), F.l1_loss(pred, target))
    with pytest.raises(ConfigError, match="mse, mae"):
        regress_loss(pred, target, "huber")
    assert global_pos_weight(np.array([0, 0, 0, 1, 1, 0], dtype=np.float32)) == 2.0
    with pytest.raises(DataError, match="none of the 3"):
        global_pos_weight(np.zeros(3))


# ----------------------------------------------------------------------------------------------- metrics


def test_classify_metrics_equal_sklearn():
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.2).astype(np.float32)
    s = np.clip(0.3 * y + 0.7 * rng.random(300), 0, 1)
    tau = 0.55
    got = classify_metrics(y, s, tau)
    pred = (s >= tau).astype(int)
    assert got["precision"] == precision_score(y, pred, zero_division=0)
    assert got["recall"] == recall_score(y, pred, zero_division=0)
    assert got["f1"] == f1_score(y, pred, zero_division=0)
    assert got["accuracy"] == accuracy_score(y, pred)
    assert got["roc_auc"] == roc_auc_score(y, s)
    assert got["pr_auc"] == average_precision_score(y, s)
    assert (got["n"], got["positives"]) == (300, int(y.sum()))
    json.dumps(got)  # plain Python values


def test_single_class_split_gives_nan_auc_and_a_notice(tmp_path):
    y, s = np.zeros(50), np.linspace(0, 1, 50)
    with pytest.warns(GraphTuneNotice, match="only negative windows"):
        got = classify_metrics(y, s, 0.5, split="test")
    assert math.isnan(got["roc_auc"]) and math.isnan(got["pr_auc"])
    assert got["precision"] == 0.0 and got["accuracy"] == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphTuneNotice)
        assert best_threshold(y, s) == (1.0, 0.0)
    for labels in (np.zeros(50), np.ones(50)):
        paths = classify_plots(labels, s, 0.5, tmp_path / str(int(labels[0])))
        assert [p.name for p in paths] == ["roc_curve.png", "pr_curve.png", "hist_score.png"]
        assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


@pytest.mark.parametrize("seed", range(5))
def test_best_threshold_maximises_f1_by_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 150
    y = (rng.random(n) < 0.25).astype(int)
    y[0] = 1
    s = np.round(0.4 * y + rng.random(n), 1 if seed % 2 else 3)  # coarse scores: many ties
    tau, f1 = best_threshold(y, s)
    candidates = np.unique(s)
    f1s = np.array([f1_score(y, s >= t, zero_division=0) for t in candidates])
    assert f1 == pytest.approx(f1s.max(), abs=1e-12)
    assert f1_score(y, s >= tau) == pytest.approx(f1, abs=1e-12)
    assert tau == candidates[np.flatnonzero(np.isclose(f1s, f1s.max(), rtol=0, atol=1e-12))[-1]]  # ties: larger


def test_regress_metrics_equal_sklearn_and_plots(tmp_path):
    rng = np.random.default_rng(2)
    y = rng.normal(size=200)
    p = y + 0.3 * rng.normal(size=200)
    got = regress_metrics(y, p)
    assert got["mae"] == mean_absolute_error(y, p)
    assert got["mse"] == mean_squared_error(y, p)
    assert got["rmse"] == pytest.approx(math.sqrt(mean_squared_error(y, p)))
    assert got["r2"] == r2_score(y, p)
    paths = regress_plots(y, p, tmp_path)
    assert [p.name for p in paths] == ["residuals.png", "scatter.png"] and all(p.stat().st_size > 1000 for p in paths)
    paths = classify_plots((y > 0.5).astype(int), 1 / (1 + np.exp(-p)), 0.5, tmp_path)
    assert all(p.exists() for p in paths)


# ------------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("name,task", CASES)
def test_backbone_shape_gradients_and_amp(name, task):
    model = build_backbone(name, channels=C, context_len=L, task=task)
    x = _x()
    y = model(x)
    assert y.shape == (16,) and y.dtype == torch.float32
    y.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing
    with torch.autocast("cpu", dtype=torch.bfloat16):  # AMP on CPU: a training step and an eval pass
        out = model(x)
        loss = classify_loss(out, (out > 0).float(), alpha=0.5, pos_weight=2.0) if task == "classify" \
            else regress_loss(out, torch.zeros(16))
    loss.backward()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.eval()(x)
    assert out.shape == (16,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model.weights_source == "random"


@pytest.mark.parametrize("name,task", CASES)
def test_backbone_seeded_and_config_round_trip(name, task):
    options = {"dropout": 0.0}
    torch.manual_seed(7)
    a = build_backbone(name, channels=C, context_len=L, task=task, options=options)
    torch.manual_seed(7)
    b = build_backbone(name, channels=C, context_len=L, task=task, options=options)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = _x()
    assert torch.equal(a.eval()(x), b.eval()(x))
    config = json.loads(json.dumps(a.config))  # JSON-able, as it is logged and saved
    assert set(config) == {"name", "channels", "context_len", "task", "options"} and config["options"]["dropout"] == 0
    c = build_backbone(**config)
    assert {k: v.shape for k, v in c.state_dict().items()} == {k: v.shape for k, v in sa.items()}
    c.load_state_dict(sa)
    assert torch.equal(c.eval()(x), a(x))


def test_unknown_options_and_names_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="unknown option 'width'.*channels_hidden, dropout, kernel_size, layers"):
        build_backbone("conv", channels=C, context_len=L, task="classify", options={"width": 3})
    with pytest.raises(ConfigError, match="series.backbone: unknown backbone 'lstm'.*conv, ttm"):
        build_backbone("lstm", channels=C, context_len=L, task="classify")
    with pytest.raises(ConfigError, match="series.task"):
        build_backbone("conv", channels=C, context_len=L, task="forecast")
    with pytest.raises(ConfigError, match="mode"):
        build_backbone("ttm", channels=C, context_len=L, task="classify", options={"mode": "mixed"})
    with pytest.raises(ConfigError, match="no pretrained weights"):
        build_backbone("conv", channels=C, context_len=L, task="classify", pretrained_dir="anywhere")
    assert set(BACKBONES.names()) >= {"conv", "ttm"}


def test_ttm_defaults_and_options():
    assert [default_patch_length(n) for n in (3, 12, 24, 512)] == [1, 3, 6, 64]
    model = build_backbone("ttm", channels=C, context_len=L, task="classify",
                           options={"mode": "mix_channel", "scaling": None, "d_model": 8, "num_layers": 1})
    assert model.config["options"] == {"patch_length": 3, "patch_stride": 3, "d_model": 8, "num_layers": 1,
                                       "dropout": 0.1, "mode": "mix_channel", "scaling": None, "hf_config": {}}
    assert model.hf.config.num_patches == 4 and model(_x()).shape == (16,)


def test_ttm_pretrained_dir_round_trip(tmp_path):
    source = build_backbone("ttm", channels=C, context_len=L, task="classify",
                            options={"d_model": 8, "hf_config": {"expansion_factor": 3}}).eval()
    source.hf.save_pretrained(tmp_path / "saved")
    loaded = build_backbone("ttm", channels=C, context_len=L, task="classify",
                            pretrained_dir=str(tmp_path / "saved")).eval()
    assert loaded.weights_source == f"pretrained:{tmp_path / 'saved'}"
    assert loaded.config["options"] == source.config["options"]  # the folder's architecture, not the defaults
    rebuilt = build_backbone(**loaded.config)  # e.g. for a checkpoint of the fine-tuned model
    rebuilt.load_state_dict(loaded.state_dict())
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    regress = build_backbone("ttm", channels=C, context_len=L, task="regress", pretrained_dir=tmp_path / "saved",
                             options={"dropout": 0.3})
    assert regress(x).shape == (16,)  # the body is reused under another head
    assert regress.config["options"]["dropout"] == regress.hf.config.dropout == 0.3  # dropout is the user's
    with pytest.raises(DataError, match="not a folder with a saved model"):
        build_backbone("ttm", channels=C, context_len=L, task="classify", pretrained_dir=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"saved for 3 channels and context 12.*4 channels and context 12"):
        build_backbone("ttm", channels=4, context_len=L, task="classify", pretrained_dir=str(tmp_path / "saved"))
    with pytest.raises(ConfigError, match=r"d_model: 32 disagrees"):
        build_backbone("ttm", channels=C, context_len=L, task="classify", options={"d_model": 32},
                       pretrained_dir=str(tmp_path / "saved"))


@pytest.mark.parametrize("name", ["conv", "ttm"])
def test_unwrap_compiled_model_state_dict(name):
    model = build_backbone(name, channels=C, context_len=L, task="classify")
    compiled = torch.compile(model)  # wrapping compiles nothing yet: fast on any machine
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert unwrap(compiled) is model and unwrap(model) is model
    state = unwrap(compiled).state_dict()
    assert not any("_orig_mod" in k for k in state)
    build_backbone(**unwrap(compiled).config).load_state_dict(state)  # a compiled run's checkpoint, eager


@pytest.mark.slow
def test_compiled_conv_runs_and_matches_eager():
    model = build_backbone("conv", channels=C, context_len=L, task="classify").eval()
    x = _x()
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            out = compiled(x)
    except Exception as err:  # e.g. no C compiler for inductor
        pytest.skip(f"torch.compile does not work on this machine: {type(err).__name__}: {str(err)[:200]}")
    with torch.no_grad():
        assert torch.allclose(out, model(x), atol=1e-5)
    assert list(unwrap(compiled).state_dict()) == list(model.state_dict())


# --------------------------------------------------------------------------------------------- reference


def test_reference_classify_and_regress():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(600, C * L))
    w = rng.normal(size=C * L)
    y_reg = x @ w + 0.1 * rng.normal(size=600)
    ref = Reference("regress", max_train=400).fit(x[:500], y_reg[:500])
    assert ref.info["subsampled"] and ref.info["n_train"] == 400
    assert r2_score(y_reg[500:], ref.score(x[500:])) > 0.9
    y_cls = (x @ w > 1.5).astype(np.float32)
    ref = Reference("classify").fit(x[:500].reshape(500, C, L), y_cls[:500])
    p = ref.score(x[500:])
    assert p.shape == (100,) and ((p >= 0) & (p <= 1)).all()
    assert roc_auc_score(y_cls[500:], p) > 0.9
    with pytest.raises(DataError, match="one class"):
        Reference("classify").fit(x[:10], np.zeros(10))


# ----------------------------------------------------------------------------------------- learnability


def _synthetic_threshold_task(n: int, seed: int):
    """Synthetic windows: channel 0 an AR(1) series, channel 1 a noisy copy of it, channel 2 noise. The next
    step continues channel 0's last move (s + (s - s_prev) + small noise); the label: it exceeds 0.8 (about a
    sixth of the windows). The last value alone reaches F1 ~0.75, the true rule ~0.93."""
    rng = np.random.default_rng(seed)
    steps = np.zeros((n, L + 1))
    steps[:, 0] = rng.normal(size=n)
    for t in range(1, L):
        steps[:, t] = 0.9 * steps[:, t - 1] + 0.3 * rng.normal(size=n)
    steps[:, L] = 2 * steps[:, L - 1] - steps[:, L - 2] + 0.1 * rng.normal(size=n)
    x = np.stack([steps[:, :L], steps[:, :L] + rng.normal(scale=0.5, size=(n, L)), rng.normal(size=(n, L))], axis=1)
    y = (steps[:, L] > 0.8).astype(np.float32)
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)


@pytest.fixture
def one_thread():
    """Small models train fastest on one thread, and far faster than on two when another process shares the
    cores (OpenMP threads then wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_conv_learns_a_synthetic_threshold_task(one_thread):
    torch.manual_seed(0)
    x_train, y_train = _synthetic_threshold_task(4000, seed=10)
    x_val, y_val = _synthetic_threshold_task(1000, seed=11)
    x_test, y_test = _synthetic_threshold_task(1000, seed=12)
    model = build_backbone("conv", channels=C, context_len=L, task="classify")
    pos_weight = global_pos_weight(y_train.numpy())
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(x_train), (128,), generator=generator)
        loss = classify_loss(model(x_train[idx]), y_train[idx], alpha=0.5, pos_weight=pos_weight)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        val_score = torch.sigmoid(model(x_val)).numpy()
        test_score = torch.sigmoid(model(x_test)).numpy()
    tau, _ = best_threshold(y_val.numpy(), val_score)  # chosen on validation, applied to test
    assert classify_metrics(y_test.numpy(), test_score, tau)["f1"] > 0.8
