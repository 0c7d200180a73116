"""Facts about a sensor graph, and node positions derived from the graph alone.

`graph_stats` counts what `prepare` reports and records in meta.json ("graph"): directed edges,
isolated nodes and weakly connected components. `spectral_coordinates` gives a city without
sensor locations two coordinates per node from its graph (Laplacian eigenmaps), so that models
which read positions (hypernet's node prompts) still tell its nodes apart.

Conventions: adj is (N, N) with adj[i, j] > 0 for an edge i -> j. Self-loops (the diagonal, which
DCRNN's pickles set to 1) are not edges here: they connect a node to nothing else.
"""

from __future__ import annotations

import numpy as np

# Gap between the boxes of two connected components in `spectral_coordinates`, in units of the largest
# component's half-width: wide enough that no two components ever share a position.
_COMPONENT_GAP = 0.5


def _links(adj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) node indices of every edge i -> j with i != j and a non-zero weight."""
    adj = np.asarray(adj)
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"the adjacency must be a square matrix, got shape {adj.shape}")
    src, dst = np.nonzero(adj)
    keep = src != dst
    return src[keep], dst[keep]


def component_labels(adj: np.ndarray) -> np.ndarray:
    """(N,) int64: the weakly connected component of every node (edge direction ignored).

    Components are numbered 0, 1, ... in the order of their lowest node index; an isolated node is a
    component of its own. Union-find with every edge processed at once per round: each round hooks the
    larger root of every edge whose ends still differ onto the smaller one, then points every node at its
    root, until no edge joins two components. numpy only, memory O(N + E).
    """
    src, dst = _links(adj)
    parent = np.arange(np.asarray(adj).shape[0])  # parent[i] <= i always, so no cycle can form
    while True:
        a, b = parent[src], parent[dst]  # roots of both ends
        differ = a != b
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(a, b)[differ], np.minimum(a, b)[differ])
        while True:  # path compression: after it, parent[i] is the root of i
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return np.unique(parent, return_inverse=True)[1].astype(np.int64)  # a root is its component's lowest node


def graph_stats(adj: np.ndarray) -> dict[str, int]:
    """{"edges", "isolated", "components"} of a directed weighted graph.

    edges: directed edges with a non-zero weight, self-loops not counted (a symmetric pair counts twice,
    as a DCRNN adjacency stores it). isolated: nodes with no edge to or from another node.
    components: weakly connected components, isolated nodes included.
    """
    src, dst = _links(adj)
    n = np.asarray(adj).shape[0]
    linked = np.zeros(n, dtype=bool)
    linked[src] = True
    linked[dst] = True
    components = int(component_labels(adj).max()) + 1 if n else 0
    return {"edges": int(src.size), "isolated": int(n - linked.sum()), "components": components}


def spectral_coordinates(adj: np.ndarray) -> np.ndarray:
    """(N, 2) float64 node positions from the graph alone: Laplacian eigenmaps (Belkin & Niyogi, 2003).

    The graph is made undirected (W = (A + A^T) / 2, self-loops dropped) and each weakly connected
    component is embedded on its own, since a disconnected graph's Laplacian has one zero eigenvalue per
    component, whose eigenvectors only say which component a node is in. Within a component, the two
    coordinates are the eigenvectors of the symmetric normalized Laplacian L = I - D^-1/2 W D^-1/2 for its
    2nd and 3rd smallest eigenvalues (after the trivial one), mapped back by D^-1/2: the solutions of
    L_rw v = lambda v, the random-walk Laplacian. On a path graph the first coordinate is cos(pi i / (n - 1))
    along the path: monotone, as a position along a road should be.

    Deterministic: each coordinate's sign is chosen so that its first clearly non-zero entry (node order)
    is positive, and it is scaled to a largest magnitude of 1. A component of two nodes has one non-trivial
    eigenvector (its second coordinate is 0); a single node sits at its component's centre. Components are
    laid side by side along the first axis, largest first (ties: lowest node first), each scaled by
    sqrt(its size / the largest's size) so that small components stay small, with a gap between them so
    that no two components share a position. Cost: one dense eigendecomposition per component, O(n^3).
    With repeated eigenvalues (a cycle, a grid) the eigenvectors are a basis of their eigenspace, which
    LAPACK picks; the positions are then one valid embedding among several.
    """
    adj = np.asarray(adj, dtype=np.float64)
    n = adj.shape[0]
    weights = np.abs(adj) + np.abs(adj.T)  # undirected; 2W, which leaves the normalized Laplacian unchanged
    np.fill_diagonal(weights, 0.0)
    labels = component_labels(adj)
    members = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1 if n else 0)]
    members.sort(key=lambda nodes: (-nodes.size, int(nodes[0])))
    coords = np.zeros((n, 2), dtype=np.float64)
    right = None  # right edge of the components placed so far
    for nodes in members:
        radius = float(np.sqrt(nodes.size / members[0].size))
        centre = 0.0 if right is None else right + _COMPONENT_GAP + radius
        coords[nodes] = _eigenmap(weights[np.ix_(nodes, nodes)]) * radius + np.array([centre, 0.0])
        right = centre + radius
    return coords


def _eigenmap(weights: np.ndarray) -> np.ndarray:
    """(n, 2) coordinates of one connected component with symmetric weights `weights` (n, n), in [-1, 1]."""
    n = weights.shape[0]
    out = np.zeros((n, 2), dtype=np.float64)
    if n < 2:
        return out
    inv_sqrt_degree = 1.0 / np.sqrt(weights.sum(axis=1))  # connected: every degree > 0
    laplacian = np.eye(n) - inv_sqrt_degree[:, None] * weights * inv_sqrt_degree[None, :]
    _, vectors = np.linalg.eigh(laplacian)  # eigenvalues ascending; column 0 is the trivial D^1/2 1
    for k in range(min(2, n - 1)):
        v = vectors[:, k + 1] * inv_sqrt_degree  # the random-walk eigenvector
        scale = np.abs(v).max()
        first = np.flatnonzero(np.abs(v) > 1e-6 * scale)[0]  # the first entry that is not round-off
        out[:, k] = v / scale * np.sign(v[first])
    return out
