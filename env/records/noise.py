"""The one noise rule of the rig's timings (make bench's table, make compare's ratios).

A figure is the median of several measurements (steady windows, logged steps); it is noise-bound
when they spread wider than ±NOISE_SPREAD around it (half their range over the median), because
a ratio of two such figures can then move by as much on a rerun without anything having changed.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

NOISE_SPREAD = 0.10


def spread(values: Sequence[float]) -> float | None:
    """Half the range of the measurements relative to their median (±spread); None for fewer than two."""
    if len(values) < 2:
        return None
    middle = statistics.median(values)
    return (max(values) - min(values)) / 2 / middle if middle else None


def noise_bound(values: Sequence[float], limit: float = NOISE_SPREAD) -> bool:
    """True when the measurements cannot carry a ratio: fewer than two, or spread beyond ±limit."""
    measured = spread(values)
    return measured is None or measured > limit
