"""Pareto fronts of (size, perplexity) points: pure functions, no I/O.

A point is on the front when no other point is at least as good in both coordinates and strictly
better in one (smaller size, lower perplexity). Identical points do not dominate each other: both
are on the front (a tie is reported, not broken by input order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def on_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For each ``(size, value)`` point, whether it is on the front (both coordinates: lower is
    better). A point with a NaN or infinite coordinate is never on the front and dominates nothing."""
    finite = [math.isfinite(s) and math.isfinite(v) for s, v in points]
    order = sorted((i for i in range(len(points)) if finite[i]), key=lambda i: (points[i][0], points[i][1]))
    flags = [False] * len(points)
    best = math.inf  # lowest value among points of strictly smaller size
    k = 0
    while k < len(order):
        size = points[order[k]][0]
        group = [i for i in order[k:] if points[i][0] == size]  # equal sizes: sorted by value
        lowest = points[group[0]][1]
        if lowest < best:
            for i in group:
                if points[i][1] == lowest:
                    flags[i] = True
            best = lowest
        k += len(group)
    return flags


def front_indices(points: Sequence[tuple[float, float]]) -> list[int]:
    """The indices of the front's points in order of increasing size (the staircase to draw)."""
    flags = on_front(points)
    return sorted((i for i, f in enumerate(flags) if f), key=lambda i: (points[i][0], points[i][1], i))


def dominated_by(points: Sequence[tuple[float, float]], index: int) -> list[int]:
    """The points that dominate ``points[index]`` (empty when it is on the front)."""
    s, v = points[index]
    return [j for j, (s2, v2) in enumerate(points)
            if j != index and s2 <= s and v2 <= v and (s2 < s or v2 < v)]
