"""Which layers of each model form its transferable core, and what kind each one is.

A low-rank adapter goes on an nn.Linear or a 1x1 convolution whose weight came from the source model. Which
of those count is a property of the architecture, so each model declares it here by registered name, as
module-name patterns (fnmatch: `*` matches any run of characters, dots included) per layer kind:

    temporal   layers that mix along time: temporal convolutions, window encoders, recurrent gates
    graph      layers that mix along the graph: the channel mixing of diffusion convolutions, attention
               projections over the nodes, the filter generators of a dynamic graph
    head       input and output projections: start convolutions, skip and end convolutions, regressions
    prompt     layers fed by node descriptors rather than readings (hypernet's prompt encoder, FiLM, generator)

A recurrent cell whose gates are diffusion convolutions (dcrnn, dgcrn) mixes along both axes, so its gates
are `temporal` and `graph` at once: they are adapted when either kind is asked for.

Node-specific tensors (names with "node_", graphtune.transfer.state) are never part of the core: a transfer
re-creates them for the target graph, and the adapter strategies train them whole, as freeze-transferred
does. A model wrapped by the shared `seasonal` option keeps its layers under `core.`; the patterns match the
names inside it, and the wrapper's gate (reset for the target by `after_transfer`) trains whole as well.

`core_layers` fails (ValueError) when a pattern matches no adaptable layer of the built model, so a renamed
layer cannot silently drop out of a layout; the tests build every model with a layout and call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch.nn as nn

from graphtune.adapters.lowrank import adaptable, layer_shape
from graphtune.config import ADAPTER_KINDS
from graphtune.errors import ConfigError
from graphtune.transfer.state import is_node_specific

KINDS = ADAPTER_KINDS  # defined with the params section that names them

_DCRNN_GATES = ("encoder.*.gates", "encoder.*.candidate", "decoder.*.gates", "decoder.*.candidate")
_DGCRN_GATES = ("encoder.gates", "encoder.candidate", "decoder.gates", "decoder.candidate")

LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "gwnet": {"temporal": ("temporal_convs.*",), "graph": ("graph_convs.*.mlp",),
              "head": ("start_conv", "skip_convs.*", "end_conv_1", "end_conv_2")},
    "bigst": {"temporal": ("input_emb",), "graph": ("query", "key", "mixers.*"), "head": ("regression",)},
    "hypernet": {"temporal": ("encoder.0", "encoder.2"), "graph": ("graph.mlp",),
                 "prompt": ("prompt_encoder.0", "prompt_encoder.2", "film", "generator")},
    "baseline": {"temporal": ("temporal",), "graph": ("graph.mlp",), "head": ("head",)},
    "dcrnn": {"temporal": _DCRNN_GATES, "graph": _DCRNN_GATES, "head": ("projection",)},
    "dgcrn": {"temporal": _DGCRN_GATES, "graph": _DGCRN_GATES + ("encoder.hyper.*", "decoder.hyper.*"),
              "head": ("projection",)},
}

WRAPPER_TRAINABLE = ("gate_raw",)  # the seasonal wrapper's gate: closed again for every target (models.seasonal)


def register_layout(model: str, layout: dict[str, tuple[str, ...]]) -> None:
    """Declare the core layers of registered model `model`: {kind: module-name patterns}, kinds from KINDS."""
    unknown = sorted(set(layout) - set(KINDS))
    if unknown:
        raise ValueError(f"layout of {model!r}: unknown layer kind(s) {', '.join(unknown)}; kinds: {', '.join(KINDS)}")
    if model in LAYOUTS:
        raise ValueError(f"layout of {model!r} is already registered")
    LAYOUTS[model] = {kind: tuple(patterns) for kind, patterns in layout.items()}


@dataclass(frozen=True)
class Layer:
    """One adaptable layer of a built model: its module name, kinds and weight-matrix shape."""

    name: str
    kinds: tuple[str, ...]
    fan_in: int
    fan_out: int
    bias: int  # bias elements (0 without a bias)
    module: str  # the layer type, for messages

    @property
    def width(self) -> int:
        """The largest useful rank: min(in, out)."""
        return min(self.fan_in, self.fan_out)

    def lowrank_params(self, rank: int) -> int:
        """Elements of a rank-`rank` update: A (rank, in) and B (out, rank)."""
        return rank * (self.fan_in + self.fan_out)

    def describe(self) -> str:
        return f"{self.name} ({self.module} {self.fan_in} -> {self.fan_out})"


def has_layout(model: str) -> bool:
    return model in LAYOUTS


def _inner(model: nn.Module) -> tuple[nn.Module, str]:
    """The model whose layers the layout names, and the prefix of its names in `model` ('core.' when wrapped)."""
    from graphtune.models.seasonal import SeasonalResidual

    if isinstance(model, SeasonalResidual):
        return model.core, "core."
    return model, ""


def core_layers(model: nn.Module, name: str) -> list[Layer]:
    """The adaptable core layers of `model` (registered as `name`), in module order.

    ConfigError (naming experiment.model) for a model without a layout; ValueError when a pattern of its
    layout matches no adaptable layer (the layout is out of date with the model).
    """
    if name not in LAYOUTS:
        raise ConfigError(f"experiment.model: the adapter strategies know the layers of {', '.join(sorted(LAYOUTS))}; "
                          f"{name} has no adapter layout (graphtune.adapters.layouts.register_layout declares one)")
    inner, prefix = _inner(model)
    layout = LAYOUTS[name]
    candidates = [(n, m) for n, m in inner.named_modules() if n and adaptable(m) and not is_node_specific(n)]
    kinds_of: dict[str, list[str]] = {}
    for kind, patterns in layout.items():
        for pattern in patterns:
            hits = [n for n, _ in candidates if fnmatchcase(n, pattern)]
            if not hits:
                raise ValueError(f"adapter layout of {name}: {pattern!r} ({kind}) matches no nn.Linear or 1x1 "
                                 f"convolution of the built model")
            for n in hits:
                kinds_of.setdefault(n, [])
                if kind not in kinds_of[n]:
                    kinds_of[n].append(kind)
    layers = []
    for n, module in candidates:
        if n in kinds_of:
            fan_in, fan_out = layer_shape(module)
            bias = module.bias.numel() if module.bias is not None else 0
            layers.append(Layer(prefix + n, tuple(k for k in KINDS if k in kinds_of[n]), fan_in, fan_out, bias,
                                type(module).__name__))
    return layers


def present_kinds(layers: list[Layer]) -> list[str]:
    """The kinds that at least one of `layers` has, in KINDS order."""
    return [k for k in KINDS if any(k in layer.kinds for layer in layers)]


def select(layers: list[Layer], kinds) -> list[Layer]:
    """The layers that have any of `kinds`."""
    wanted = set(kinds)
    return [layer for layer in layers if wanted.intersection(layer.kinds)]


def shared_parameters(model: nn.Module) -> int:
    """Learnable elements of `model` that are not node-specific: the same for every city (the share's basis)."""
    return sum(p.numel() for n, p in model.named_parameters() if not is_node_specific(n))


def bias_parameters(model: nn.Module) -> int:
    """Elements of every non-node-specific parameter named `bias` (what adapter.bias: all unfreezes)."""
    return sum(p.numel() for n, p in model.named_parameters() if is_bias(n) and not is_node_specific(n))


def is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "bias"
