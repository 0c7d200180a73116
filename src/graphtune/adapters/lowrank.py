"""Low-rank adapters (LoRA, Hu et al. 2021) that keep a model's state-dict names: W' = W + (alpha / r) B A.

`LowRankAdapter` takes the place of one nn.Linear or 1x1 nn.Conv1d / nn.Conv2d inside a model. It keeps the
layer's weight W frozen (`base_weight`) and its bias, and adds two trainable factors, A (r, in) and B (out, r).
B starts at zero, so an adapted model computes exactly what the source model computed, and training moves
only the low-rank update.

Three rules make an adapted model interchangeable with the plain one everywhere the project handles models:

- `state_dict()` holds the MERGED weights under the layer's own names (`<layer>.weight`, `<layer>.bias`) and
  nothing else: a stage's checkpoint, `finetune --from` and the next stage's source read an adapted model's
  state exactly as they read a plain one, and a plain model loads it strictly.
- `load_state_dict()` takes such a state: the loaded weight becomes the frozen base and B returns to zero, so
  the module then computes the loaded weights exactly. `fit` keeps its best epoch this way (it copies
  `state_dict()` and loads it back at the end). The merged weight in `state_dict()` is computed, not stored:
  writing into it in place (as `graphtune.transfer.state.load_partial_state` does with a plain model's state)
  changes nothing, so a source is loaded into the plain model before adapters are added (the strategies do).
- `weight` is a property that returns the merged weight W + (alpha / r) B A. A model that reads a layer's
  weight directly instead of calling it (dcrnn's `linear_of_concat` slices `linear.weight`) is adapted too.

Forward takes one of two paths that compute the same function:

- while the update needs gradients (training, or FLOP counting of a training step), x W^T + b + s (x A^T) B^T:
  no gradient of the frozen (out x in) weight is ever formed, which is the saving LoRA exists for;
- otherwise (evaluation, export, inference under no_grad) the plain layer with the merged weight, cached until
  a parameter changes (their version counters and storage say when): a forward costs exactly the plain model's
  operations. The merge itself (r in out multiply-adds per layer) runs once per change of the weights, at the
  first forward after it; while B is zero (a fresh adapter, or one that has just loaded a state) the merged
  weight is the base weight itself and costs nothing, so the stage loop's FLOP count of a freshly adapted model
  (FlopCounterMode) equals the plain model's.

`merge(model)` gives the plain model (a deep copy, unless inplace): every adapter replaced by the layer type it
adapted, holding the merged weight. Its state-dict keys, and values, are the adapted model's.

Why not `peft`: its LoRA layers wrap the adapted module as `base_layer`, so the state dict of an adapted model
reads `<layer>.base_layer.weight` and `<layer>.lora_A.default.weight` (checked with peft 0.21.2 on gwnet);
only `merge_and_unload()` restores the names, and the stage loop saves `state_dict()` of the model it fine-tuned
without calling it. Its layers also forward `.weight` to the base layer, so a model that reads weights
directly (dcrnn) silently runs unadapted (checked: a non-zero peft adapter leaves dcrnn's output unchanged).
It would further pull transformers and accelerate (about 6 s to import on 2 cores) for about a hundred lines
of arithmetic.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def adaptable(layer: nn.Module) -> bool:
    """True for an nn.Linear, or an nn.Conv1d / nn.Conv2d that is a per-position linear map (1x1 kernel, one
    group, zero padding): the layers whose weight is a matrix a low-rank update can be added to."""
    if isinstance(layer, nn.Linear):
        return True
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return (all(k == 1 for k in layer.kernel_size) and layer.groups == 1 and layer.padding_mode == "zeros"
                and not isinstance(layer.padding, str))
    return False


def layer_width(layer: nn.Module) -> int:
    """The largest rank an update of `layer` can have: min(in, out) of its weight matrix."""
    out_features, in_features = layer.weight.shape[:2]
    return int(min(in_features, out_features))


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of the weight matrix of an adaptable layer (a 1x1 convolution's channels)."""
    out_features, in_features = layer.weight.shape[:2]
    return int(in_features), int(out_features)


class LowRankAdapter(nn.Module):
    """A frozen linear map plus a trainable low-rank update (see the module docstring).

    layer: the nn.Linear or 1x1 convolution to adapt; its weight and bias Parameters are taken over as they are
    (their requires_grad decides whether the bias trains; the weight is always frozen here).
    rank: r, at least 1 and at most min(in, out). alpha: the update is scaled by alpha / r.
    """

    def __init__(self, layer: nn.Module, rank: int, alpha: float):
        super().__init__()
        if not adaptable(layer):
            raise ValueError(f"{type(layer).__name__} cannot take a low-rank adapter (an nn.Linear or a 1x1 "
                             "convolution with one group and zero padding can)")
        width = layer_width(layer)
        if not 1 <= rank <= width:
            raise ValueError(f"rank {rank} is outside [1, {width}] for {type(layer).__name__} {layer_shape(layer)}")
        in_features, out_features = layer_shape(layer)
        self.rank, self.alpha, self.scale = int(rank), float(alpha), float(alpha) / int(rank)
        self.kind = type(layer)  # rebuilt by `plain()`
        if isinstance(layer, nn.Linear):
            self._options = {"in_features": in_features, "out_features": out_features}
        else:
            self._options = {"in_channels": in_features, "out_channels": out_features, "kernel_size": 1,
                             "stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
        self.base_weight = layer.weight
        self.base_weight.requires_grad_(False)
        self.bias = layer.bias  # None or the layer's own Parameter
        factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own initialisation, as LoRA's
        self._merged: tuple[tuple, torch.Tensor] | None = None  # (versions, merged weight) of the no-grad path
        self._update_is_zero()

    # ------------------------------------------------------------------ weights
    def delta(self) -> torch.Tensor:
        """The update (alpha / r) B A in the shape of the layer's weight."""
        return (self.scale * (self.lora_B @ self.lora_A)).view_as(self.base_weight)

    @property
    def weight(self) -> torch.Tensor:
        """The merged weight W + (alpha / r) B A (differentiable in A and B while gradients are on)."""
        if self._update_needs_grad():
            return self.base_weight + self.delta()
        return self._cached_weight()

    def _update_needs_grad(self) -> bool:
        return torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad)

    def _key(self) -> tuple:
        """What the cached merged weight depends on: each parameter's version counter, storage, device and dtype."""
        tensors = (self.base_weight, self.lora_A, self.lora_B)
        return tuple((t._version, t.data_ptr(), t.device, t.dtype) for t in tensors)

    def _cached_weight(self) -> torch.Tensor:
        """The merged weight without autograd history, recomputed only when a parameter changed."""
        key = self._key()
        if self._merged is None or self._merged[0] != key:
            with torch.no_grad():
                self._merged = (key, self.base_weight + self.delta())
        return self._merged[1]

    def _update_is_zero(self) -> None:
        """Record that B is zero: the merged weight is then the base weight itself, with nothing to compute."""
        self._merged = (self._key(), self.base_weight.detach())

    # ------------------------------------------------------------------ forward
    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, first: bool) -> torch.Tensor:
        """The adapted layer's operation with `weight` (out, in) as a matrix; `first`: the layer's own stride,
        padding and dilation (the second factor of the update is a plain 1x1 map)."""
        if self.kind is nn.Linear:
            return F.linear(x, weight, bias)
        conv = F.conv1d if self.kind is nn.Conv1d else F.conv2d
        extra = (1,) * (1 if self.kind is nn.Conv1d else 2)
        weight = weight.reshape(*weight.shape[:2], *extra)
        if first:
            o = self._options
            return conv(x, weight, bias, stride=o["stride"], padding=o["padding"], dilation=o["dilation"])
        return conv(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._update_needs_grad():  # training: the low-rank path, no gradient of the frozen weight
            out = self._linear(x, self.base_weight.flatten(1), self.bias, first=True)
            low = self._linear(x, self.lora_A, None, first=True)
            return out + self.scale * self._linear(low, self.lora_B, None, first=False)
        return self._linear(x, self._cached_weight().flatten(1), self.bias, first=True)

    # ------------------------------------------------------------------ state dict: the plain layer's
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        with torch.no_grad():
            destination[prefix + "weight"] = (self.base_weight + self.delta()).detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = {"weight": self.base_weight, "bias": self.bias}
        for name, param in own.items():
            key = prefix + name
            if param is None:
                continue
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if tuple(value.shape) != tuple(param.shape):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from "
                                  f"checkpoint, the shape in current model is {tuple(param.shape)}.")
                continue
            with torch.no_grad():
                param.copy_(value)
                if name == "weight":
                    self.lora_B.zero_()  # the module now computes exactly the loaded weight
                    self._update_is_zero()
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0] not in own:
                    unexpected_keys.append(key)

    # ------------------------------------------------------------------ the plain layer
    def plain(self) -> nn.Module:
        """The adapted layer type holding the merged weight and the bias (trainable, as a built layer)."""
        factory = {"device": self.base_weight.device, "dtype": self.base_weight.dtype}
        layer = self.kind(**self._options, bias=self.bias is not None, **factory)
        with torch.no_grad():
            layer.weight.copy_(self.base_weight + self.delta())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        in_features, out_features = self.base_weight.shape[1], self.base_weight.shape[0]
        return f"{self.kind.__name__} {in_features} -> {out_features}, rank={self.rank}, alpha={self.alpha:g}"


def add_adapters(model: nn.Module, names: list[str], rank: int, alpha: float) -> dict[str, LowRankAdapter]:
    """Replace each named layer of `model` (in place) by a LowRankAdapter of it; returns name -> adapter."""
    adapters = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        adapter = LowRankAdapter(getattr(parent, child), rank, alpha)
        setattr(parent, child, adapter)
        adapters[name] = adapter
    return adapters


def adapters_of(model: nn.Module) -> dict[str, LowRankAdapter]:
    """name -> every LowRankAdapter inside `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankAdapter)}


def merge(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The plain model: every adapter folded into the layer type it adapted (see the module docstring).

    The result's state-dict keys are the unadapted model's, its outputs the adapted model's (up to float
    rounding). `inplace=False` leaves `model` as it is and merges a deep copy.
    """
    merged = model if inplace else copy.deepcopy(model)
    for name, adapter in adapters_of(merged).items():
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name) if parent_name else merged
        setattr(parent, child, adapter.plain())
    return merged
