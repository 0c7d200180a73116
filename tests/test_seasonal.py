"""The seasonal residual: a model's output as a correction of each node's time-of-day profile."""

from __future__ import annotations

import pytest
import torch

from graphtune.data.synthetic import synthetic_bundle
from graphtune.errors import ConfigError
from graphtune.models import build_model, list_models, model_defaults
from graphtune.models.registry import MODELS
from graphtune.models.seasonal import SeasonalResidual, seasonal_profile

# the learnable models the shared `seasonal` option applies to (node-gwn's parameters are generated per node by
# gpd, so it takes no wrapper)
LEARNABLE = [m for m in list_models() if m not in ("ha", "persistence") and MODELS.get(m).seasonal]
SMALL = {"gwnet": {"residual_channels": 4, "dilation_channels": 4, "skip_channels": 8, "end_channels": 8},
         "dcrnn": {"hidden": 4}, "dgcrn": {"hidden": 4}}


@pytest.fixture(scope="module")
def bundle():
    return synthetic_bundle(num_nodes=6, num_steps=700, seed=3)


@pytest.mark.parametrize("name", LEARNABLE)
def test_seasonal_model_is_the_profile_plus_the_core(name, bundle):
    torch.manual_seed(0)
    model = build_model(name, bundle, seasonal=True, **SMALL.get(name, {}))
    assert isinstance(model, SeasonalResidual) and model_defaults(name)["seasonal"] is False
    x, _ = bundle.batch(bundle.window_starts("test")[:5])
    model.eval()
    ha = build_model("ha", bundle)
    with torch.no_grad():
        assert torch.equal(model(x), ha(x))  # a new seasonal model forecasts exactly the profile: the gate is 0
        model.gate_raw.copy_(torch.linspace(-0.1, 0.2, bundle.t_out)[:, None])
        out = model(x)
        expected = ha(x) + model.gate * model.core(x)  # (T_out, 1) gate: one per lead time
    assert out.shape == (5, bundle.t_out, bundle.num_nodes) and torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, ha(x))
    # the profile is a buffer, never saved or transferred; the core and the gate are
    assert set(model.state_dict()) == {"gate_raw"} | {k for k in model.state_dict() if k.startswith("core.")}
    model.after_transfer()  # a transferred seasonal model starts from the target's own profile
    assert torch.count_nonzero(model.gate) == 0


def test_the_profile_is_the_historical_average_of_the_visible_data_only(bundle):
    lo, hi = bundle.splits["train"]
    starts = bundle.window_starts("train")[:40]
    view = bundle.restrict(starts)
    profile = seasonal_profile(view)
    # a slot is the mean of the visible scaled readings at that time of day; unseen slots take the node mean
    visible = view.visible_train_steps(starts)
    steps = torch.arange(lo, hi)[visible]
    slot = torch.floor(bundle.time_features[steps, 0] * bundle.steps_per_day + 1e-4).long()
    scaled = (view.target[steps].double() - view.scaler.mean) / view.scaler.std
    s = int(slot[0])
    assert profile[s].double() == pytest.approx(scaled[slot == s].mean(0), abs=1e-5)


def test_seasonal_is_not_an_option_of_the_references(bundle):
    for name in ("ha", "persistence"):
        assert "seasonal" not in model_defaults(name)
        with pytest.raises(ConfigError, match=rf"experiment\.model_kwargs: model '{name}' has no option\(s\) seasonal"):
            build_model(name, bundle, seasonal=True)


def test_a_teacher_forced_core_is_fed_its_residual_targets(bundle):
    model = build_model("dcrnn", bundle, seasonal=True, hidden=4)
    assert model.takes_targets
    seen = []
    model.core.forward = lambda x, targets=None: seen.append(targets) or torch.zeros(x.shape[0], bundle.t_out,
                                                                                     bundle.num_nodes)
    x, y = bundle.batch(bundle.window_starts("train")[:3])
    targets = torch.nan_to_num(bundle.scaler.transform(y), nan=0.0)
    model.train()
    model(x, targets=targets)
    assert torch.allclose(seen[0], targets - model.profile(x))
