"""Series backbones: windows x (B, C, L) -> (B,) logits (task "classify") or predictions (task "regress").

    model = build_backbone("conv", channels=3, context_len=12, task="classify", options={"dropout": 0.2})
    model.config          # {"name", "channels", "context_len", "task", "options" (resolved, defaults filled in)}
    model.weights_source  # "random" or "pretrained:<dir>"
    build_backbone(**model.config)   # the same architecture, freshly initialised (a checkpoint loads into it)

Backbones (registry BACKBONES, option `series.backbone`; their options come from `series.backbone_options`):

- ``ttm``: the TinyTimeMixer family through transformers' PatchTSMixer (an MLP-Mixer over patches of the
  window: IBM's TTM is the same block with adaptive patching, pretrained on many series).
  ``PatchTSMixerForTimeSeriesClassification`` / ``PatchTSMixerForRegression`` with ``num_targets=1``: both
  heads are one linear layer giving (B, 1), squeezed to (B,); the classifier's single output is a logit (its
  built-in CrossEntropyLoss is never used: GraphTune's losses take the logit). Options and defaults:
  patch_length / patch_stride (default: the largest divisor of L that gives at least 4 patches and is at most
  64, stride = patch length, i.e. non-overlapping as in TTM: L=12 -> 4 patches of 3, L=512 -> 8 patches of
  64), d_model 16, num_layers 2, dropout 0.1 (body and head), mode "common_channel" (channel-independent
  mixing, TTM's default; "mix_channel" adds explicit channel mixing), scaling "std" (per-window
  standardisation whose mean / std are fed back into the head, as TTM does; "mean" or null for none), and
  hf_config (a dict of further PatchTSMixerConfig architecture fields, default {}; a pretrained folder's
  non-default values of these are recorded there, so ``build_backbone(**model.config)`` rebuilds its
  architecture). Small on purpose: windows are short (L=12 gives 4 patches) and training runs on a few CPU
  cores; d_model 16 x 2 layers is about 4 k parameters at C=3, L=12 (transformers' defaults, d_model 8 x 3
  layers, are of the same size; TTM's released models, ~1 M parameters for L=512, would only overfit here).
  ``pretrained_dir`` loads a LOCAL folder written by ``save_pretrained`` of any PatchTSMixer model (the body
  is kept; a head of another shape, e.g. a forecasting or pretraining head, is initialised afresh). Nothing is
  ever downloaded. IBM's granite TTM checkpoints are model_type "tinytimemixer" (the granite-tsfm package),
  not PatchTSMixer, and are refused with a one-line ConfigError.
- ``conv``: a native dilated 1-D CNN: `layers` blocks Conv1d (no bias) -> BatchNorm1d -> ReLU -> Dropout with
  dilations 1, 2, 4, ... (capped so a kernel still fits the window), residual from the second block on; the
  head reads the global average AND the last time step of the features (the label is the next step, so the
  last position matters more than an average would let it) through one Linear. Options: channels_hidden 24,
  layers 3, kernel_size 3 (receptive field 15 >= L=12), dropout 0.1: about 4 k parameters at C=3, L=12.

Outputs are float32 even under bfloat16 autocast, so losses and metrics are computed in float32. Both work
with torch.compile; a compiled model's state_dict keys carry ``_orig_mod.``: save ``unwrap(model)``'s.

A new backbone is a builder ``builder(*, channels, context_len, task, **options) -> nn.Module`` registered with
``@register_backbone(name)``; its keyword-only parameters (with their defaults) are its options, so an
unknown option fails with one line listing the known ones. A builder may accept ``pretrained_dir`` and may
set ``module.resolved_options`` when some defaults depend on the data (ttm's patch length).
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from graphtune.errors import ConfigError, DataError
from graphtune.registry import Registry

__all__ = ["BACKBONES", "OPTIONS_OPTION", "TASKS", "build_backbone", "register_backbone", "unwrap"]

TASKS = ("classify", "regress")
OPTIONS_OPTION = "series.backbone_options"  # the params entry backbone options come from, for messages
_FIXED = ("channels", "context_len", "task")  # builder arguments that are not options
_PRETRAINED = "pretrained_dir"

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone", option="series.backbone")


def register_backbone(name: str):
    """Decorator registering `builder(*, channels, context_len, task, **options) -> nn.Module` as `name`."""

    def decorator(builder: Callable[..., nn.Module]):
        BACKBONES.register(name, builder, owner=builder.__module__)
        return builder

    return decorator


def build_backbone(name: str, *, channels: int, context_len: int, task: str, options: dict | None = None,
                   pretrained_dir: str | None = None) -> nn.Module:
    """The backbone `name` for windows of `channels` x `context_len`, in training mode, with `.config` and
    `.weights_source` set (see the module docstring). ConfigError (one line) for an unknown backbone, task or
    option or a bad option value; DataError for a `pretrained_dir` that is not a saved model."""
    builder = BACKBONES.get(name)
    for key, value in (("channels", channels), ("context_len", context_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"series backbone {name!r}: {key} must be a positive integer, got {value!r}")
    if task not in TASKS:
        raise ConfigError(f"series.task: expected one of {', '.join(TASKS)}, got {task!r}")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ConfigError(f"{OPTIONS_OPTION}: expected a mapping of option names to values, "
                          f"got {type(options).__name__}")
    defaults, accepts_pretrained = _builder_options(builder)
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(builder).parameters.values())
    unknown = [] if open_ended else sorted(set(options) - set(defaults))  # a **options builder checks its own
    if unknown:
        raise ConfigError(f"{OPTIONS_OPTION}: unknown option {unknown[0]!r} for backbone {name!r}; "
                          f"known options: {', '.join(sorted(defaults)) or 'none'}")
    kwargs = dict(options)
    if pretrained_dir is not None:
        if not accepts_pretrained:
            raise ConfigError(f"series.pretrained_dir: backbone {name!r} has no pretrained weights to load; "
                              f"backbones that do: {', '.join(_pretrainable()) or 'none'}")
        kwargs[_PRETRAINED] = os.fspath(pretrained_dir)
    model = builder(channels=channels, context_len=context_len, task=task, **kwargs)
    resolved = getattr(model, "resolved_options", None)
    if resolved is None:
        resolved = {**defaults, **options}
    config = {"name": name, "channels": channels, "context_len": context_len, "task": task,
              "options": dict(resolved)}
    try:  # a JSON round trip: the config is logged and saved with checkpoints, so it must be plain JSON
        config = json.loads(json.dumps(config))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{OPTIONS_OPTION}: backbone {name!r} options must be JSON values ({err})") from None
    model.config = config
    model.weights_source = "random" if pretrained_dir is None else f"pretrained:{os.fspath(pretrained_dir)}"
    return model.train()


def unwrap(model: nn.Module) -> nn.Module:
    """The module torch.compile wrapped (compiled ones keep it as `_orig_mod`); `model` itself otherwise.

    A compiled model's state_dict keys start with `_orig_mod.`; unwrap(model).state_dict() has the plain keys
    an eager model (e.g. build_backbone(**model.config)) loads."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def _builder_options(builder: Callable[..., nn.Module]) -> tuple[dict, bool]:
    """(option name -> default, whether the builder takes pretrained_dir) from the builder's signature."""
    params = inspect.signature(builder).parameters
    defaults = {p.name: p.default for p in params.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _FIXED + (_PRETRAINED,)}
    return {k: (None if v is inspect.Parameter.empty else v) for k, v in defaults.items()}, _PRETRAINED in params


def _pretrainable() -> list[str]:
    return [n for n in BACKBONES.names() if _builder_options(BACKBONES.get(n))[1]]


# ------------------------------------------------------------------------------------------ option checks


def _int(key: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{OPTIONS_OPTION}.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _fraction(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{OPTIONS_OPTION}.{key}: expected a number in [0, 1), got {value!r}")
    return float(value)


def _choice(key: str, value, allowed: tuple):
    if value not in allowed:
        shown = ", ".join("null" if a is None else repr(a) for a in allowed)
        raise ConfigError(f"{OPTIONS_OPTION}.{key}: expected one of {shown}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------- conv


class _ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, dilation: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel_size, dilation=dilation, padding="same", bias=False)
        self.norm = nn.BatchNorm1d(c_out)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.norm(self.conv(x))))


class ConvBackbone(nn.Module):
    """Dilated 1-D CNN (see the module docstring): x (B, C, L) -> (B,)."""

    def __init__(self, channels: int, context_len: int, *, hidden: int, layers: int, kernel_size: int,
                 dropout: float):
        super().__init__()
        # dilations 1, 2, 4, ... but never wider than the window: a kernel spanning more than L steps only
        # reads padding
        cap = max(1, (context_len - 1) // max(kernel_size - 1, 1))
        self.blocks = nn.ModuleList(
            _ConvBlock(channels if i == 0 else hidden, hidden, kernel_size, min(2 ** i, cap), dropout)
            for i in range(layers))
        self.head = nn.Linear(2 * hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h) if i == 0 else h + block(h)
        features = torch.cat([h.mean(dim=-1), h[..., -1]], dim=1)  # (B, 2 * hidden)
        return self.head(features).squeeze(-1).float()


@register_backbone("conv")
def _conv(*, channels: int, context_len: int, task: str, channels_hidden: int = 24, layers: int = 3,
          kernel_size: int = 3, dropout: float = 0.1) -> nn.Module:
    return ConvBackbone(channels, context_len, hidden=_int("channels_hidden", channels_hidden),
                        layers=_int("layers", layers), kernel_size=_int("kernel_size", kernel_size),
                        dropout=_fraction("dropout", dropout))


# -------------------------------------------------------------------------------------------------- ttm

# PatchTSMixerConfig fields `hf_config` may set: architecture only (the options above cover the rest; the
# head's size and loss are fixed by the task)
_HF_ARCH_FIELDS = {
    "expansion_factor": 2, "gated_attn": True, "norm_mlp": "LayerNorm", "self_attn": False, "self_attn_heads": 1,
    "use_positional_encoding": False, "positional_encoding_type": "sincos", "head_aggregation": "max_pool",
    "norm_eps": 1e-5, "init_std": 0.02,
}
_TTM_ARCH = ("patch_length", "patch_stride", "d_model", "num_layers", "mode", "scaling")


def default_patch_length(context_len: int) -> int:
    """The largest divisor of `context_len` that leaves at least 4 patches and is at most 64 (1 for L < 4)."""
    fits = [d for d in range(1, min(64, context_len // 4) + 1) if context_len % d == 0]
    return fits[-1] if fits else 1


class PatchTSMixerBackbone(nn.Module):
    """transformers' PatchTSMixer classification / regression model on x (B, C, L) -> (B,)."""

    def __init__(self, hf_model: nn.Module, task: str):
        super().__init__()
        self.hf = hf_model
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.hf(past_values=x.transpose(1, 2), return_loss=False)  # transformers' layout: (B, L, C)
        y = out.prediction_outputs if self.task == "classify" else out.regression_outputs  # (B, 1)
        return y.squeeze(-1).float()


@register_backbone("ttm")
def _ttm(*, channels: int, context_len: int, task: str, patch_length: int | None = None,
         patch_stride: int | None = None, d_model: int = 16, num_layers: int = 2, dropout: float = 0.1,
         mode: str = "common_channel", scaling: str | None = "std", hf_config: dict | None = None,
         pretrained_dir: str | None = None) -> nn.Module:
    given = {k: v for k, v in (("patch_length", patch_length), ("patch_stride", patch_stride)) if v is not None}
    patch_length = default_patch_length(context_len) if patch_length is None else _int("patch_length", patch_length)
    patch_stride = patch_length if patch_stride is None else _int("patch_stride", patch_stride)
    if patch_length > context_len:
        raise ConfigError(f"{OPTIONS_OPTION}.patch_length: {patch_length} is longer than the context "
                          f"({context_len} steps)")
    options = {"patch_length": patch_length, "patch_stride": patch_stride, "d_model": _int("d_model", d_model),
               "num_layers": _int("num_layers", num_layers), "dropout": _fraction("dropout", dropout),
               "mode": _choice("mode", mode, ("common_channel", "mix_channel")),
               "scaling": _choice("scaling", scaling, ("std", "mean", None)),
               "hf_config": _hf_config(hf_config)}

    from transformers import (  # slow to import: only when a ttm backbone is built
        PatchTSMixerConfig,
        PatchTSMixerForRegression,
        PatchTSMixerForTimeSeriesClassification,
    )

    cls = PatchTSMixerForTimeSeriesClassification if task == "classify" else PatchTSMixerForRegression
    head = {"num_targets": 1, "loss": "mse", "output_range": None, "head_dropout": options["dropout"]}
    if pretrained_dir is None:
        config = PatchTSMixerConfig(
            context_length=context_len, num_input_channels=channels, patch_length=patch_length,
            patch_stride=patch_stride, d_model=options["d_model"], num_layers=options["num_layers"],
            dropout=options["dropout"], mode=options["mode"], scaling=options["scaling"],
            **options["hf_config"], **head)
        hf_model = cls(config)
    else:
        hf_model, options = _ttm_pretrained(cls, PatchTSMixerConfig, Path(pretrained_dir), channels, context_len,
                                            options, given, head)
    model = PatchTSMixerBackbone(hf_model, task)
    model.resolved_options = options
    return model


def _hf_config(value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{OPTIONS_OPTION}.hf_config: expected a mapping of PatchTSMixerConfig fields, "
                          f"got {value!r}")
    unknown = sorted(set(value) - set(_HF_ARCH_FIELDS))
    if unknown:
        raise ConfigError(f"{OPTIONS_OPTION}.hf_config: field {unknown[0]!r} is not one it may set; "
                          f"it may set: {', '.join(sorted(_HF_ARCH_FIELDS))}")
    return dict(value)


def _ttm_pretrained(cls, config_cls, folder: Path, channels: int, context_len: int, options: dict, given: dict,
                    head: dict):
    """(the model loaded from `folder`, the options it really has). Architecture options the user set must
    agree with the folder's (an option equal to its default counts as not set); dropout is the user's."""
    config_file = folder / "config.json"
    if not folder.is_dir() or not config_file.is_file():
        raise DataError(f"series.pretrained_dir: {folder} is not a folder with a saved model (no config.json there)")
    try:
        saved = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"series.pretrained_dir: {config_file} is not readable JSON "
                        f"({' '.join(str(err).split())})") from None
    model_type = saved.get("model_type") if isinstance(saved, dict) else None
    if model_type != "patchtsmixer":
        raise ConfigError(f"series.pretrained_dir: {folder} holds a {model_type!r} model; the ttm backbone loads "
                          f"transformers PatchTSMixer models (model_type 'patchtsmixer') only")
    config = config_cls.from_pretrained(folder, local_files_only=True)
    if config.num_input_channels != channels or config.context_length != context_len:
        raise ConfigError(f"series.pretrained_dir: {folder} was saved for {config.num_input_channels} channels and "
                          f"context {config.context_length}, the data have {channels} channels and context "
                          f"{context_len}")
    scaling = "mean" if config.scaling is True else config.scaling  # transformers reads True as "mean"
    folder_options = {"patch_length": config.patch_length, "patch_stride": config.patch_stride,
                      "d_model": config.d_model, "num_layers": config.num_layers, "mode": config.mode,
                      "scaling": scaling}
    folder_hf = {k: getattr(config, k) for k, default in _HF_ARCH_FIELDS.items()
                 if getattr(config, k, default) != default}
    user = {**given, **{k: options[k] for k in ("d_model", "num_layers", "mode", "scaling")
                        if options[k] != _TTM_DEFAULTS[k]}}
    have = dict(folder_options)
    for key, value in options["hf_config"].items():
        user[f"hf_config.{key}"] = value
        have[f"hf_config.{key}"] = folder_hf.get(key, _HF_ARCH_FIELDS[key])
    for key, value in user.items():
        if have[key] != value:
            raise ConfigError(f"{OPTIONS_OPTION}.{key}: {value!r} disagrees with the pretrained model in {folder} "
                              f"({have[key]!r}); leave it out to use the pretrained one")
    try:
        model = cls.from_pretrained(folder, local_files_only=True, ignore_mismatched_sizes=True,
                                    dtype=torch.float32, dropout=options["dropout"], **head)
    except (OSError, ValueError) as err:
        raise DataError(f"series.pretrained_dir: cannot load the model in {folder} "
                        f"({' '.join(str(err).split())})") from None
    resolved = {**folder_options, "dropout": options["dropout"], "hf_config": folder_hf}
    return model, {key: resolved[key] for key in options}  # the same key order as a random build's


_TTM_DEFAULTS = {k: v.default for k, v in inspect.signature(_ttm).parameters.items()}
