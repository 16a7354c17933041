"""Where the clusters of a trace go in its picture: one column per layer, each column ordered so
that links cross little, and the p-value above which a link by connections is drawn faint. Used
by 06 (its Sankey) and 10 (the atlas's trace page)."""
from __future__ import annotations

from typing import Hashable, Iterable, Sequence

import numpy as np

SIGNIFICANT_P = 0.05  # links by connections with a larger permutation p-value are drawn faint


def column_rows(columns: Sequence[Sequence[Hashable]],
                links: Iterable[tuple[Hashable, Hashable]]) -> dict[Hashable, float]:
    """y in (0, 1) of every node of ``columns`` (lists of node keys, in column order, each in
    its default order), linked or not.

    Column by column, nodes are sorted by the mean y of the nodes that link into them from
    earlier columns (the barycentre heuristic); nodes without such links keep their default
    order after them. Rows are spread evenly: row r of n is at (r + 0.5) / n.
    """
    incoming: dict[Hashable, list[Hashable]] = {}
    for source, target in links:
        incoming.setdefault(target, []).append(source)
    rows: dict[Hashable, float] = {}
    for column in columns:
        def order(item):
            """Sort key: barycentre of placed sources, then the default order."""
            place, key = item
            ys = [rows[s] for s in incoming.get(key, []) if s in rows]
            return (0, float(np.mean(ys)), place) if ys else (1, 0.0, place)

        ranked = sorted(enumerate(column), key=order)
        for r, (_, key) in enumerate(ranked):
            rows[key] = (r + 0.5) / len(column)
    return rows
