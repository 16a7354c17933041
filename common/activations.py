"""The streaming top-k of 01_extract: the images that activate each neuron most, and where.

The ranking is total — activation descending, then image id ascending — so any order of updates
(batches, shards merged later) yields the same arrays, bit for bit.
"""
from __future__ import annotations

import numpy as np


class StreamingTopK:
    """The k largest values per channel seen so far, with their image ids and positions.

    Memory is C × k (plus C × k × h × w for the optional activation maps), whatever the number of
    images streamed through ``update``. Maps are large, so they are not reordered on every merge:
    each ranked entry points to a storage slot, and only maps of entries that enter the top-k are
    written (into the slots of the entries they push out).
    """

    def __init__(self, channels: int, k: int, map_shape: tuple[int, int] | None = None):
        """Empty buffers: value −inf and image id −1 mark slots not filled yet."""
        self.k = k
        self.values = np.full((channels, k), -np.inf, dtype=np.float32)
        self.image_ids = np.full((channels, k), -1, dtype=np.int64)
        self.y = np.zeros((channels, k), dtype=np.int32)
        self.x = np.zeros((channels, k), dtype=np.int32)
        self.slots = np.tile(np.arange(k), (channels, 1))
        self.maps = (np.zeros((channels, k, *map_shape), dtype=np.float16)
                     if map_shape is not None else None)

    def update(self, values, image_ids, y, x, maps=None) -> None:
        """Merge a batch: ``values``, ``y``, ``x`` are (B, C); ``image_ids`` (B,); ``maps`` (B, C, h, w)."""
        values = np.asarray(values, dtype=np.float32).T
        # Only channels with a candidate reaching their k-th value (−inf until k are seen) can
        # change: once the buffers are full, few do, and the others are left as they are.
        rows = np.flatnonzero((values >= self.values[:, -1:]).any(axis=1))
        if rows.size == 0:
            return
        ids = np.broadcast_to(np.asarray(image_ids, dtype=np.int64), (rows.size, values.shape[1]))
        # The maps of batch candidates j of channels c are maps[j, c] (index arrays).
        self._merge(values[rows], ids, np.asarray(y, dtype=np.int32).T[rows],
                    np.asarray(x, dtype=np.int32).T[rows],
                    None if maps is None else (lambda c, j: np.asarray(maps)[j, c]), rows)

    def merge(self, other: "StreamingTopK") -> None:
        """Fold another top-k (e.g. of another shard) into this one."""
        self._merge(other.values, other.image_ids, other.y, other.x,
                    None if other.maps is None
                    else (lambda c, j: other.maps[c, other.slots[c, j]]))

    def _merge(self, values, ids, y, x, candidate_maps, rows: np.ndarray | None = None) -> None:
        """Keep the best k of the current buffers and the (C', n) candidates of the channels
        ``rows`` (all C when None); the other channels are left as they are."""
        if rows is None:
            rows = np.arange(self.values.shape[0])
        all_values = np.concatenate([self.values[rows], values], axis=1)
        all_ids = np.concatenate([self.image_ids[rows], ids], axis=1)
        # lexsort: the last key is the primary one — value descending, then image id ascending.
        order = np.lexsort((all_ids, -all_values), axis=1)[:, : self.k]
        self.values[rows] = np.take_along_axis(all_values, order, axis=1)
        self.image_ids[rows] = np.take_along_axis(all_ids, order, axis=1)
        self.y[rows] = np.take_along_axis(np.concatenate([self.y[rows], y], axis=1), order, axis=1)
        self.x[rows] = np.take_along_axis(np.concatenate([self.x[rows], x], axis=1), order, axis=1)
        old_slots = self.slots[rows]  # a copy (fancy indexing)
        entering = order >= self.k  # ranked entries that come from the candidates
        self.slots[rows] = np.take_along_axis(old_slots, np.minimum(order, self.k - 1), axis=1)
        if not entering.any():
            return
        kept = np.zeros(old_slots.shape, dtype=bool)
        local = np.broadcast_to(np.arange(order.shape[0])[:, None], order.shape)
        kept[local[~entering], order[~entering]] = True
        # Per channel, as many old entries leave as new ones enter; both lists are in channel
        # order, so the i-th entering entry takes the i-th freed slot.
        in_c, in_pos = np.nonzero(entering)
        out_c, out_pos = np.nonzero(~kept)
        freed = old_slots[out_c, out_pos]
        channels = rows[in_c]
        self.slots[channels, in_pos] = freed
        if self.maps is not None:
            self.maps[channels, freed] = candidate_maps(channels, order[in_c, in_pos] - self.k)

    def ranked_maps(self) -> np.ndarray | None:
        """Activation maps in rank order (C × k × h × w), or None when none are kept."""
        if self.maps is None:
            return None
        # Row-wise fancy indexing copies whole maps; take_along_axis would broadcast the slots to
        # an index array as large as the maps (120 MB for a ViT-B layer at k = 100) and was 10x
        # slower.
        return self.maps[np.arange(self.maps.shape[0])[:, None], self.slots]

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The buffers as named arrays for 01_activations.npz (unfilled values saved as NaN)."""
        values = np.where(self.image_ids >= 0, self.values, np.nan).astype(np.float32)
        out = {f"{prefix}/values": values, f"{prefix}/image_ids": self.image_ids,
               f"{prefix}/y": self.y, f"{prefix}/x": self.x}
        if self.maps is not None:
            out[f"{prefix}/maps"] = self.ranked_maps()
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> "StreamingTopK":
        """Rebuild a top-k from the arrays written by :meth:`arrays`."""
        values = arrays[f"{prefix}/values"]
        maps = arrays.get(f"{prefix}/maps")
        topk = cls(values.shape[0], values.shape[1])  # the maps, if any, are set below
        topk.values = np.where(np.isnan(values), -np.inf, values).astype(np.float32)
        topk.image_ids = arrays[f"{prefix}/image_ids"]
        topk.y, topk.x = arrays[f"{prefix}/y"], arrays[f"{prefix}/x"]
        if maps is not None:
            topk.maps = np.array(maps)
        return topk
