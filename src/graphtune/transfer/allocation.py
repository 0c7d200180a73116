"""Spending one fine-tuning budget across several target cities: uniformly, or where diagnostics say it pays.

`transfer.allocation` (none | uniform | diagnostics) with `transfer.total_budget` B: the targets together may
fine-tune on B x (all their training windows). Each target's curve becomes two points: the probe, at the
first of `transfer.fractions` (f0), and its allocated share s_k, with

    sum_k s_k * W_k = B * sum_k W_k,    f0 <= s_k <= 1            (W_k: target k's training windows)

- uniform: s_k = B for every target.
- diagnostics: before any target is fine-tuned, each is measured from the source model the first target
  starts from:
      zero      val MAE of the source model on the target (zero-shot)
      probe     val MAE after fine-tuning on the probe fraction f0 (the stage's own first point: same seed,
                same windows, so it is the point the stage then records)
      ha        val MAE of the historical average fitted on the probe's windows only
      difficulty  the graph's difficulty proxy (graphtune.profiling)
  and gets the need

      need_k = (probe_k / ha_k) * (1 + gain_k) * (difficulty_k / mean difficulty) ** 0.5
      gain_k = (zero_k - probe_k) / zero_k / f0     (relative val gain per unit of budget at the probe)

  (the remaining gap to a trivial baseline after the probe, larger where data helped fast and where the graph
  is harder); the shares are proportional to the need, filled up to the budget with each share kept in
  [f0, 1] (`allocate`: water-filling by bisection on the proportionality factor).

Every measurement uses the validation split and the probe's training windows, never the test split: the
allocation is model selection. Diagnostics are measured from the source of the first target; in a chain
(each stage starts from the previous one), later targets then start from a different model than the one
they were measured with (stated in the README).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from graphtune.errors import ConfigError

ALLOCATIONS = ("none", "uniform", "diagnostics")


@dataclass(frozen=True)
class Diagnostics:
    """What is measured of one target before its budget is allocated (val MAE in the city's units)."""

    city: str
    windows: int  # training windows of the target
    zero: float  # the source model, zero-shot
    probe: float  # after fine-tuning on the probe fraction
    ha: float  # the historical average fitted on the probe's windows
    difficulty: float  # graph difficulty proxy
    probe_fraction: float

    @property
    def gain(self) -> float:
        """Relative val gain per unit of budget at the probe (0 when the probe did not help)."""
        if self.zero <= 0:
            return 0.0
        return max(0.0, (self.zero - self.probe) / self.zero / self.probe_fraction)

    def need(self, mean_difficulty: float) -> float:
        ratio = self.probe / self.ha if self.ha > 0 else 1.0
        spread = (self.difficulty / mean_difficulty) ** 0.5 if mean_difficulty > 0 else 1.0
        return max(1e-9, ratio * (1.0 + self.gain) * spread)

    def to_dict(self, mean_difficulty: float) -> dict:
        return asdict(self) | {"gain": self.gain, "need": self.need(mean_difficulty)}


def check_allocation(allocation: str, total_budget: float, fractions: list[float], target_days: list[float],
                     n_targets: int) -> None:
    """ConfigError (naming the option) for an allocation that cannot be made."""
    if allocation == "none":
        return
    if n_targets < 2:
        raise ConfigError(f"transfer.allocation: {allocation} shares one budget across target cities; it needs at "
                          f"least two (got {n_targets})")
    if target_days:
        raise ConfigError("transfer.allocation: allocates fractions of each target's data; drop transfer.target_days")
    if total_budget < float(fractions[0]):
        raise ConfigError(f"transfer.total_budget: {total_budget:g} is below the probe fraction "
                          f"(transfer.fractions[0] = {fractions[0]:g}) every target spends first")


def uniform(windows: dict[str, int], total: float) -> dict[str, float]:
    return {city: float(total) for city in windows}


def allocate(needs: dict[str, float], windows: dict[str, int], total: float, floor: float) -> dict[str, float]:
    """Shares s_k = clip(c * need_k, floor, 1) with c chosen so that sum s_k W_k = total * sum W_k.

    A pure function: needs > 0, windows > 0, floor <= total <= 1. With equal needs it gives every target
    `total`; a target at 1 or at the floor passes what it cannot take to the others."""
    budget = total * sum(windows.values())

    def spent(c: float) -> float:
        return sum(min(1.0, max(floor, c * needs[k])) * windows[k] for k in needs)

    lo, hi = 0.0, 1.0 / min(needs.values())  # spent(hi) = every share at 1
    if spent(hi) <= budget:
        return {k: 1.0 for k in needs}
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(mid) < budget else (lo, mid)
    c = (lo + hi) / 2
    return {k: min(1.0, max(floor, c * needs[k])) for k in needs}


def diagnostics_shares(diags: list[Diagnostics], total: float, floor: float) -> tuple[dict[str, float], list[dict]]:
    """The diagnostics rule: (city -> share, the diagnostics as records with their need)."""
    mean_difficulty = sum(d.difficulty for d in diags) / len(diags)
    needs = {d.city: d.need(mean_difficulty) for d in diags}
    shares = allocate(needs, {d.city: d.windows for d in diags}, total, floor)
    return shares, [d.to_dict(mean_difficulty) | {"share": shares[d.city]} for d in diags]
