"""Comparing the neurons of two runs in a shared semantic space (SemanticLens's model comparison).

Each neuron of a run is a unit vector (04's text, image or fused embedding). Two runs embedded by
the same embedders live in one space, so a neuron of run A can be matched to the neuron of run B
whose vector is closest (cosine), and a layer of A can be set against a layer of B by the mean,
over A's neurons, of their best-match similarity in B (asymmetric: B's layer may hold more).
Concepts (05's clusters) are compared by their centroids.
"""
from __future__ import annotations

import numpy as np

from common.embedders import l2_normalise


def best_matches(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``a``, the index of the most similar row of ``b`` and that cosine."""
    sim = l2_normalise(a, np.float64) @ l2_normalise(b, np.float64).T
    best = sim.argmax(axis=1)
    return best, sim[np.arange(len(a)), best]


def alignment_matrix(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> np.ndarray:
    """Layers of A × layers of B: mean over A's layer of its neurons' best-match cosine in B's."""
    out = np.zeros((len(a), len(b)))
    for i, va in enumerate(a.values()):
        for j, vb in enumerate(b.values()):
            out[i, j] = best_matches(va, vb)[1].mean() if len(va) and len(vb) else np.nan
    return out


def centroids(vectors: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit mean vector of each cluster label (labels sorted) and the labels."""
    keys = np.unique(labels)
    return l2_normalise(np.stack([vectors[labels == k].mean(axis=0) for k in keys]),
                        np.float64), keys
