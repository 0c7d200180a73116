"""Move a trained model's weights to the same model built for another city (another node count).

Every model keeps its node-specific tensors (node embeddings, per-node heads) under names that
contain "node_"; everything else is independent of the number of nodes. Transfer copies each tensor
of the source state whose name and shape match the target model, and leaves node-specific tensors
as freshly initialised for the target graph unless both models describe the same nodes. Nothing
is ever truncated or padded to make a shape fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

NODE_MARKER = "node_"  # the naming contract: a tensor is node-specific iff its name contains this

SKIP_NODE = "node-specific: re-created for the target graph"
SKIP_MISSING = "missing in source"
SKIP_UNUSED = "not in the target model"


def is_node_specific(name: str) -> bool:
    """True for tensors whose size or meaning depends on the graph's nodes (by the naming contract)."""
    return NODE_MARKER in name


@dataclass
class TransferReport:
    """What `load_partial_state` did: copied tensor names, skipped names with the reason, parameter counts."""

    copied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    transferred_params: int = 0  # learnable parameter elements copied from the source
    total_params: int = 0  # learnable parameter elements of the target model

    @property
    def share(self) -> float:
        """Fraction of the target's learnable parameters that came from the source (1.0 if it has none)."""
        return self.transferred_params / self.total_params if self.total_params else 1.0


def _learnable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def load_partial_state(model: nn.Module, state: dict, *, same_nodes: bool = False) -> TransferReport:
    """Copy into `model` every tensor of `state` whose name and shape match; return what happened.

    Node-specific tensors are skipped unless `same_nodes` (the source was trained on these very nodes),
    even when their shapes happen to agree: node 3 of one city is not node 3 of another. Persistent
    buffers (e.g. batch-norm statistics) follow the same rules; non-persistent ones are never in a state.
    """
    target = model.state_dict()  # tensors share storage with the model's parameters and buffers
    learnable = _learnable(model)
    report = TransferReport(total_params=sum(p.numel() for p in learnable.values()))
    with torch.no_grad():
        for name, dst in target.items():
            if name not in state:
                report.skipped[name] = SKIP_MISSING
                continue
            src = state[name]
            if is_node_specific(name) and not same_nodes:
                report.skipped[name] = SKIP_NODE
            elif tuple(src.shape) != tuple(dst.shape):
                report.skipped[name] = f"shape mismatch {tuple(src.shape)} vs {tuple(dst.shape)}"
            else:
                dst.copy_(src)
                report.copied.append(name)
                if name in learnable:
                    report.transferred_params += dst.numel()
    for name in state:
        if name not in target:
            report.skipped[name] = SKIP_UNUSED
    return report


def transferable_share(model: nn.Module) -> float:
    """Fraction of learnable parameters that are not node-specific (1.0 for a model without parameters)."""
    learnable = _learnable(model)
    total = sum(p.numel() for p in learnable.values())
    shared = sum(p.numel() for name, p in learnable.items() if not is_node_specific(name))
    return shared / total if total else 1.0
