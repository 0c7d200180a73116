"""load_partial_state / transferable_share on a tiny hand-made module with exact expectations."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from graphtune.transfer.state import TransferReport, load_partial_state
from graphtune.transfer.state import SKIP_MISSING, SKIP_NODE, SKIP_UNUSED, transferable_share


class Tiny(nn.Module):
    """node_emb (N, 2) -> shared Linear(2, H) -> head Linear(H, 1); plus shared and node-specific buffers."""

    def __init__(self, num_nodes: int, hidden: int = 3, fill: float | None = None):
        super().__init__()
        self.node_emb = nn.Parameter(torch.randn(num_nodes, 2))
        self.shared = nn.Linear(2, hidden)
        self.head = nn.Linear(hidden, 1)
        self.register_buffer("scale", torch.ones(hidden))  # persistent, N-independent
        self.register_buffer("node_mask", torch.ones(num_nodes))  # persistent, node-specific
        self.register_buffer("node_cache", torch.zeros(num_nodes), persistent=False)  # never in a state
        if fill is not None:
            with torch.no_grad():
                for t in self.state_dict().values():
                    t.fill_(fill)


SHARED = ["shared.weight", "shared.bias", "head.weight", "head.bias", "scale"]
SHARED_PARAMS = 2 * 3 + 3 + 3 * 1 + 1  # 13


def test_different_node_counts_copies_shared_and_skips_node_tensors():
    src, dst = Tiny(4, fill=7.0), Tiny(6, fill=0.0)
    report = load_partial_state(dst, src.state_dict())
    assert sorted(report.copied) == sorted(SHARED)
    assert report.skipped == {"node_emb": SKIP_NODE, "node_mask": SKIP_NODE}
    assert report.transferred_params == SHARED_PARAMS
    assert report.total_params == SHARED_PARAMS + 6 * 2
    assert report.share == pytest.approx(13 / 25)
    for name in SHARED:
        assert torch.equal(dst.state_dict()[name], src.state_dict()[name])
    assert torch.equal(dst.node_emb, torch.zeros(6, 2))  # left as built for the target graph
    assert torch.equal(dst.node_mask, torch.zeros(6))


def test_node_tensors_skipped_even_when_shapes_match_unless_same_nodes():
    src, dst = Tiny(4, fill=7.0), Tiny(4, fill=0.0)
    report = load_partial_state(dst, src.state_dict())
    assert report.skipped == {"node_emb": SKIP_NODE, "node_mask": SKIP_NODE}
    assert torch.equal(dst.node_emb, torch.zeros(4, 2))  # never copied by coincidence of size

    report = load_partial_state(dst, src.state_dict(), same_nodes=True)
    assert sorted(report.copied) == sorted(SHARED + ["node_emb", "node_mask"])
    assert report.skipped == {}
    assert report.share == 1.0
    assert torch.equal(dst.node_emb, torch.full((4, 2), 7.0))


def test_shape_mismatch_is_skipped_never_truncated():
    src, dst = Tiny(4, hidden=3, fill=7.0), Tiny(4, hidden=5, fill=0.0)
    report = load_partial_state(dst, src.state_dict(), same_nodes=True)
    assert report.skipped == {
        "shared.weight": "shape mismatch (3, 2) vs (5, 2)",
        "shared.bias": "shape mismatch (3,) vs (5,)",
        "head.weight": "shape mismatch (1, 3) vs (1, 5)",
        "scale": "shape mismatch (3,) vs (5,)",
    }
    assert sorted(report.copied) == ["head.bias", "node_emb", "node_mask"]
    assert report.transferred_params == 1 + 4 * 2
    assert report.total_params == 2 * 5 + 5 + 5 + 1 + 4 * 2
    assert torch.equal(dst.shared.weight, torch.zeros(5, 2))


def test_missing_and_unused_names_are_reported():
    src, dst = Tiny(4, fill=7.0), Tiny(6, fill=0.0)
    state = dict(src.state_dict())
    del state["head.bias"]
    state["extra.weight"] = torch.ones(2)
    report = load_partial_state(dst, state)
    assert report.skipped["head.bias"] == SKIP_MISSING
    assert report.skipped["extra.weight"] == SKIP_UNUSED
    assert "head.bias" not in report.copied
    assert report.transferred_params == SHARED_PARAMS - 1
    assert torch.equal(dst.head.bias, torch.zeros(1))


def test_transferable_share_counts_only_learnable_parameters():
    model = Tiny(6)
    assert transferable_share(model) == pytest.approx(13 / 25)
    model.head.requires_grad_(False)  # frozen parameters are not learnable: out of both counts
    assert transferable_share(model) == pytest.approx(9 / 21)
    report = load_partial_state(model, Tiny(4).state_dict())
    assert report.total_params == 21 and report.transferred_params == 9


def test_share_of_a_model_without_parameters_is_one():
    model = nn.Module()
    model.register_buffer("node_profile", torch.zeros(3, 5), persistent=False)
    assert transferable_share(model) == 1.0
    report = load_partial_state(model, {})
    assert report == TransferReport(copied=[], skipped={}, transferred_params=0, total_params=0)
    assert report.share == 1.0
