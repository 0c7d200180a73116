"""Low-rank adapters for the transfer loop: frozen source weights, trainable low-rank updates, merged for export.

    lowrank.py    LowRankAdapter (LoRA that keeps the plain layer's state-dict names), add_adapters, merge
    layouts.py    which layers of each model form its transferable core, by kind (temporal, graph, head, prompt)
    capacity.py   choose_capacity: the pure rule that sizes a city's adapters, and the prompt distance
    strategy.py   the transfer strategies `adapter` and `topology-adapter` (registered on import)

Importing this package registers both strategies.
"""

from graphtune.adapters import strategy  # noqa: F401 - registers adapter and topology-adapter
from graphtune.adapters.capacity import Capacity, CapacitySettings, Diagnostics, choose_capacity, prompt_distance
from graphtune.adapters.layouts import Layer, core_layers, register_layout
from graphtune.adapters.lowrank import LowRankAdapter, add_adapters, adapters_of, merge

__all__ = ["Capacity", "CapacitySettings", "Diagnostics", "Layer", "LowRankAdapter", "add_adapters", "adapters_of",
           "choose_capacity", "core_layers", "merge", "prompt_distance", "register_layout"]
