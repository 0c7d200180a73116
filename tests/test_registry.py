"""The one generic registry: duplicates, unknown names, lazy providers; models must be ForecastModels."""

from __future__ import annotations

import sys
import types

import pytest
import torch.nn as nn

from graphtune.errors import ConfigError
from graphtune.models import build_model, register_model
from graphtune.models.registry import MODELS
from graphtune.registry import Registry


def test_register_get_names_and_errors():
    things = Registry("denoiser", option="generative.denoiser")
    things.register("mlp", 1)

    @things.register("unet")
    def unet():
        return 2

    assert things.names() == ["mlp", "unet"] and things.get("unet") is unet and "mlp" in things
    with pytest.raises(ValueError, match=r"^denoiser 'mlp' is already registered \(by "):
        things.register("mlp", 3)
    with pytest.raises(ConfigError, match=r"^generative\.denoiser: unknown denoiser 'gan'; known denoisers: mlp, unet$"):
        things.get("gan")
    with pytest.raises(ValueError, match="non-empty string"):
        things.register("", 4)


def test_providers_are_imported_on_first_use(monkeypatch):
    registry = Registry("pruner", option="compression.pruner", providers=("graphtune_test_pruners",))
    module = types.ModuleType("graphtune_test_pruners")
    imported = []

    def load(name):
        imported.append(name)
        registry.register("l2", "by-norm")
        return module

    monkeypatch.setattr("importlib.import_module", load)
    assert imported == []  # nothing happens at construction
    assert registry.get("l2") == "by-norm" and imported == ["graphtune_test_pruners"]
    registry.names()
    assert imported == ["graphtune_test_pruners"]  # once
    monkeypatch.delitem(sys.modules, "graphtune_test_pruners", raising=False)


def test_a_builder_must_return_a_forecast_model(week_bundle):
    @register_model("plain-module-test")
    def plain(bundle):
        return nn.Linear(1, 1)

    try:
        with pytest.raises(TypeError, match="not a ForecastModel"):
            build_model("plain-module-test", week_bundle)
    finally:
        MODELS.unregister("plain-module-test")
    assert "plain-module-test" not in MODELS
