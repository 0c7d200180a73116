"""Prunable groups: the channels a model lets data-free compression remove, as the model declares them.

A group is a set of channels that leaves its producers through per-channel operations only (an optional
BatchNorm, then ReLU) and enters its consumers as input channels:

    producers --(sum)--> [norm] --> ReLU --> consumers

- producers: nn.Linear / nn.Conv2d modules whose output channels are the group's channels. Several
  producers are summed channel by channel (Graph WaveNet's skip convolutions); each channel's filter is
  then the concatenation of its rows in every producer, and its bias the sum of theirs.
- norm: the BatchNorm1d/2d over the channels between the producers and the ReLU, or None.
- consumers: nn.Linear / nn.Conv2d modules that read the channels as input channels (in_features /
  in_channels); removing channel i removes that input column from each of them.
- width: where the group's channel count lives in the model's config (a dotted path: "skip_channels",
  "widths.3", "blocks.1.0"), so that a pruned model is rebuilt from its config and loads its state
  strictly, never unpickled.

A model declares its groups in forward order with `prunable_groups()`; one whose channels feed a residual
stream, a recurrent cell or a LayerNorm declares none there (pruning would change what those mix).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PruneGroup:
    """Channels from `producers` through [norm] and ReLU into `consumers` (see the module docstring)."""

    name: str  # for messages and the per-round CSV, e.g. "fc1", "skip", "layer2.0.conv1"
    width: str  # dotted path of the channel count in the model's config
    producers: tuple[str, ...]  # dotted module names; several = summed channel by channel
    consumers: tuple[str, ...]  # dotted module names reading the channels as inputs
    norm: str | None = None  # dotted name of the BatchNorm over the channels, or None

    def modules(self) -> tuple[str, ...]:
        return self.producers + ((self.norm,) if self.norm else ()) + self.consumers


def get_path(config: dict, path: str):
    """config["a"]["b"][3] for path "a.b.3" (list indices as integers)."""
    node = config
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
    return node


def set_path(config: dict, path: str, value) -> None:
    """Set config's entry at the dotted `path` (lists are changed in place; tuples are not allowed)."""
    parts = path.split(".")
    node = get_path(config, ".".join(parts[:-1])) if len(parts) > 1 else config
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
