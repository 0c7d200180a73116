"""PA-DFCR's iterative schedule: per-round rates, cumulative rates, widths and lambdas.

A total channel compression C (the share of each group's channels removed) is reached in k rounds of
equal multiplicative steps:

    p      = 1 - (1 - C)^(1/k)          per-round rate, so (1 - p)^k = 1 - C
    cum_t  = 1 - (1 - p)^t              cumulative rate after round t (cum_k = C)
    n_t    = round(n0 * (1 - cum_t))    channels a group of n0 keeps after round t, never below 1

Widths are rounded, not floored: upstream's `int(512 * (1 - 0.5000000000000004))` keeps 255 of 512 at
C = 0.5. The last round uses C itself, so the final width is exactly round(n0 * (1 - C)) whatever k is.
k = 1 is one-shot LBYL.

Lambdas: round 1 uses (l1, l2); from round 2 on they follow the cumulative rate after the round,
    l1_t = l1 * exp(k1 * cum_t)   (k1 = 0.2: more weight on the BN offsets as the layer thins)
    l2_t = l2 * exp(-k2 * cum_t)  (k2 = 0.1: less ridge, since fewer kept channels must carry more)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from graphtune.errors import ConfigError


def check_ratio(ratio, option: str = "compress.ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ConfigError(f"{option}: expected a compression ratio in [0, 1), got {ratio!r}")
    return float(ratio)


def check_rounds(rounds, option: str = "compress.rounds") -> int:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"{option}: expected a whole number of rounds >= 1, got {rounds!r}")
    return rounds


def per_round_rate(ratio: float, rounds: int) -> float:
    """p with (1 - p)^rounds = 1 - ratio."""
    return 1.0 - (1.0 - check_ratio(ratio)) ** (1.0 / check_rounds(rounds))


def cumulative_rate(ratio: float, rounds: int, t: int) -> float:
    """The share removed after round t (0 <= t <= rounds); exactly `ratio` at t = rounds."""
    if t >= rounds:
        return float(ratio)
    return 1.0 - (1.0 - per_round_rate(ratio, rounds)) ** t


def width_after(n0: int, ratio: float, rounds: int, t: int) -> int:
    """Channels kept after round t by a group that started with n0."""
    return max(1, round(n0 * (1.0 - cumulative_rate(ratio, rounds, t))))


def format_ratio(ratio: float) -> str:
    """C for file names: '0.29' for 0.29 (upstream's int(0.29 * 100) names it 28), '0.5', '0.125'."""
    text = f"{ratio:.6f}".rstrip("0").rstrip(".")
    return text or "0"


@dataclass(frozen=True)
class Round:
    """One round of the schedule."""

    t: int  # 1..k
    rate: float  # the per-round rate p
    cumulative: float  # cum_t after this round
    lambda1: float
    lambda2: float


def schedule(ratio: float, rounds: int, lambda1: float, lambda2: float, k1: float = 0.2, k2: float = 0.1) -> list[Round]:
    """The k rounds of compressing by `ratio` with their lambdas (see the module docstring)."""
    p = per_round_rate(ratio, rounds)
    out = []
    for t in range(1, rounds + 1):
        cum = cumulative_rate(ratio, rounds, t)
        l1, l2 = (lambda1, lambda2) if t == 1 else (lambda1 * math.exp(k1 * cum), lambda2 * math.exp(-k2 * cum))
        out.append(Round(t, p, cum, l1, l2))
    return out
