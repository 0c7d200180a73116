"""Window lengths (prepare.t_in, prepare.t_out) given as a number of steps or as a duration.

A number of steps means a different time span in every city: 12 steps are one hour at 5-minute
sampling and half a day at hourly sampling. A duration ("1h", "90min", "2d": pandas.Timedelta
syntax) means the same span everywhere and is converted to steps with each city's sampling
interval when its bundle is made (`window_steps`). A duration that is not a whole number of
the city's steps is an error, never rounded: a window of 1.5 steps does not exist.

This module imports neither pandas nor torch at import time: graphtune.config declares its check
and `graphtune cities` loads that without either.
"""

from __future__ import annotations

import math
import warnings

from graphtune.checks import Check, integer
from graphtune.errors import ConfigError

_STEPS = integer(min=1)
_NS_PER_MINUTE = 60 * 10**9


def parse_duration(value):
    """`value` as a positive pandas.Timedelta, or None when it is not a duration string.

    A duration names its unit ("12" alone would be 12 nanoseconds to pandas): strings without
    a letter, empty strings and durations <= 0 are not durations.
    """
    if not isinstance(value, str) or not any(c.isalpha() for c in value):
        return None
    import pandas as pd  # only for a duration string: the common integer case needs no pandas

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas 3 deprecates the lower-case day unit ("2d") with a warning
        try:
            duration = pd.Timedelta(value.strip())
        except (ValueError, TypeError, OverflowError):
            return None
    if duration is pd.NaT or duration <= pd.Timedelta(0):
        return None
    return duration


class steps_or_duration(Check):  # noqa: N801 - lower case like the other checks in graphtune.checks
    """An integer number of steps >= 1, or a positive duration string ("1h", "90min", "15min", "2d")."""

    description = 'an integer number of steps >= 1 or a duration such as "1h", "90min", "2d"'

    def accepts(self, value) -> bool:
        return _STEPS.accepts(value) or parse_duration(value) is not None


def window_steps(value, interval_minutes: float, option: str, city: str = "") -> int:
    """The number of steps of `value` (steps, or a duration string) at `interval_minutes` per step.

    window_steps(12, 5, "prepare.t_in") == 12
    window_steps("1h", 5, "prepare.t_in") == 12; window_steps("1h", 60, "prepare.t_in") == 1
    window_steps("90min", 60, "prepare.t_in")  # ConfigError: 1.5 steps is not a whole number
    """
    steps_or_duration()(value, option)
    if _STEPS.accepts(value):
        return int(value)
    duration = parse_duration(value)
    step_ns = round(float(interval_minutes) * _NS_PER_MINUTE)
    if not (math.isfinite(interval_minutes) and step_ns > 0):
        raise ConfigError(f"{option}: cannot convert {value!r} to steps: the sampling interval is {interval_minutes!r}")
    steps, rest = divmod(duration.value, step_ns)
    if rest:
        where = f"city {city}" if city else "the city"
        raise ConfigError(f"{option}: {value!r} is {duration.value / step_ns:g} steps of {where}'s "
                          f"{interval_minutes:g}-minute interval, not a whole number; give a multiple of "
                          f"{interval_minutes:g} min or a number of steps")
    return int(steps)
