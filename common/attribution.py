"""How much each neuron (channel) of a layer pushed a class's logit: activation × gradient.

For an image, a layer's output ``a`` (C × H × W) and the logit ``y_k`` of class k, the relevance of
channel c is

    R_c = Σ_{h,w} a[c, h, w] · ∂y_k / ∂a[c, h, w]

(gradient × input at the layer, summed over space; for a transformer layer over every token, the
class token included, as zeroing the channel would zero it in every token). It is the first-order Taylor estimate of how
much ``y_k`` would drop if the channel were switched off (set to zero): positive R_c means the
channel pushed the image towards class k, negative that it held it back. For a network that is
linear after the layer (e.g. global average pooling and a linear classifier) it is exact and the
R_c of all channels add up to ``y_k`` minus the bias. 08 uses it for the misclassified images of
the pairs it analyses (which neurons drove the wrong class: ``attribute_images``, shown by the
atlas); per-class relevance (13) reuses the same function. torch is imported only by the
functions that run the model, so that the atlas can quote ``ATTRIBUTION_NOTE`` without it.

Why an image was misclassified (true class T, predicted P): the relevance of the logit difference
y_P − y_T is R(P) − R(T) (the relevance is linear in the logit explained). To rank the neurons of
several layers together, each layer's values are divided by the sum of their absolute values on
that image (``contribution_shares``): each layer splits, to first order, the same logit
difference among its channels, so a channel's share of its layer's total says how much of the
error passes through it whatever the layer's size or units (−1 … 1; the shares' absolute values
add up to 1 in each layer). ``attribute_images`` keeps, per image, the ``top`` neurons of all
layers by that share with their activation maps (``WHY_NOTE`` says this on the pages).

The same measure between two layers gives the network's connections (06, ``connection_strengths``):
with ``y_j`` the spatial mean (or max) of channel j of a later layer instead of a class logit,
``C[i, j] = Σ_{h,w} a[i, h, w] · ∂y_j / ∂a[i, h, w]`` says how much channel i of the earlier layer
drives channel j, to first order; averaged over images it is the strength of the i → j connection.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator, Sequence

import numpy as np

log = logging.getLogger("neuron-atlas.attribution")

ATTRIBUTION_NOTE = ("Relevance of a neuron = its activation × the gradient of the class's logit "
                    "with respect to it, summed over the feature map: how much the logit would "
                    "drop, to first order, if the neuron were switched off. Positive: it pushed "
                    "the image towards that class.")


WHY_NOTE = ("Contribution to the error = activation × gradient of (logit of the predicted class "
            "− logit of the true class), summed over the feature map, divided by the sum of the "
            "absolute contributions of all neurons of its layer on this image: the neuron's share "
            "of the push from the true to the wrong class that passes through its layer (−1 … 1), "
            "so that neurons of all layers rank together; a layer of few channels gives each a "
            "larger share. Maps: the neuron's activation over the image, shown from 40 % of its "
            "peak on the image (yellow) to the peak (red).")
MAP_SIDE = 28  # side of the activation maps kept per (image, top neuron): small, upsampled on show


def contribution_shares(wrong: dict, right: dict) -> dict:
    """Per layer, each channel's share of the layer's absolute contribution to y_wrong − y_right:
    ``(wrong − right) / Σ |wrong − right|`` (``wrong``, ``right``: layer → C relevances of one
    image; a layer whose contributions are all 0 gets zeros)."""
    out = {}
    for layer, w in wrong.items():
        diff = np.asarray(w, np.float64) - np.asarray(right[layer], np.float64)
        total = np.abs(diff).sum()
        out[layer] = diff / total if total > 0 else np.zeros_like(diff)
    return out


def rank_contributions(wrong: dict, right: dict, top: int) -> list[tuple[str, int, float, float]]:
    """The ``top`` neurons of all layers with the largest positive share of the push towards the
    wrong class (``contribution_shares``), as (layer, channel, share, wrong − right), largest
    first; ties by layer order (as given), then channel."""
    shares = contribution_shares(wrong, right)
    order = list(shares)
    rows = [(layer, c, float(s[c]), float(wrong[layer][c] - right[layer][c]))
            for layer, s in shares.items() for c in np.flatnonzero(s > 0)]
    rows.sort(key=lambda r: (-r[2], order.index(r[0]), r[1]))
    return [(layer, int(c), share, diff) for layer, c, share, diff in rows[:top]]


@contextlib.contextmanager
def _keep_outputs(model, layer_names: Sequence[str]) -> Iterator[dict]:
    """Yield a dict filled, at each forward pass, with each layer's output tensor in the graph.

    The hook hands a clone on to the rest of the network, so that later in-place operations
    (``out += identity``, ``ReLU(inplace=True)``) change the clone, not the kept tensor whose
    gradient is asked for.
    """
    from common.models import get_module
    kept: dict = {}
    handles = []

    def make_hook(name: str):
        """Hook that keeps ``name``'s output and returns a copy for the layers after it."""
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            kept[name] = output
            return output.clone()
        return hook

    try:
        for name in layer_names:
            handles.append(get_module(model, name).register_forward_hook(make_hook(name)))
        yield kept
    finally:
        for handle in handles:
            handle.remove()


def channel_attribution(model, layer_names: Sequence[str], images, classes,
                        maps: dict | None = None) -> tuple[dict, object]:
    """Activation × gradient of each image's class logit, summed over space, per layer.

    ``images`` is a batch (B × 3 × H × W, already normalised for the model). ``classes`` holds the
    class whose logit is explained, one per image (B,), or several such rows (T × B) to explain T
    classes per image from a single forward pass. Returns ``{layer: B × C}`` relevances and the
    explained logits (B,) — or ``T × B × C`` and ``T × B`` for T rows. Each image's logit depends
    only on its own input in eval mode, so the gradient of the summed logits gives every image
    its own gradient. The model's parameters get no gradient (only layer outputs are
    differentiated). A dict passed as ``maps`` receives each layer's activations on its grid of
    positions (B × C × H × W, on the CPU; the patch tokens of a transformer layer).
    """
    import torch
    from common.hooks import output_layouts
    device = next(model.parameters()).device
    images = images.to(device)
    classes = torch.as_tensor(classes, dtype=torch.long, device=device)
    rows = classes if classes.ndim == 2 else classes[None]
    relevances: dict[str, list] = {name: [] for name in layer_names}
    explained = []
    with torch.enable_grad(), _keep_outputs(model, layer_names) as kept:
        logits = model(images)
        if logits.ndim != 2:
            raise ValueError(f"the model returned a {tuple(logits.shape)} tensor; class logits "
                             f"(batch × classes) are needed for attribution")
        missing = [n for n in layer_names if n not in kept]
        if missing:
            raise ValueError(f"layers {missing} did not run in the forward pass")
        layouts = output_layouts(model, {n: kept[n].shape for n in layer_names},
                                 tuple(images.shape[-2:]))
        if maps is not None:
            maps.update({n: layouts[n].to_grid(kept[n].detach()).float().cpu()
                         for n in layer_names})
        for t, row in enumerate(rows):
            chosen = logits.gather(1, row[:, None])[:, 0]
            grads = torch.autograd.grad(chosen.sum(), [kept[n] for n in layer_names],
                                        retain_graph=t + 1 < len(rows))
            for name, grad in zip(layer_names, grads):
                product = kept[name].detach() * grad
                # Sum over every position (cells, or every token; none for a B × C output).
                relevances[name].append(layouts[name].per_channel(product).sum(2).float().cpu())
            explained.append(chosen.detach().float().cpu())
    if classes.ndim == 2:
        return {n: torch.stack(v) for n, v in relevances.items()}, torch.stack(explained)
    return {n: v[0] for n, v in relevances.items()}, explained[0]


def connection_strengths(model, layer_names: Sequence[str], images,
                         aggregate: str = "mean") -> dict[tuple[str, str], np.ndarray]:
    """Activation × gradient from each layer of ``layer_names`` to the next one to run, summed
    over a batch of ``images`` (B × 3 × H × W, normalised for the model).

    For consecutive layers (a, b) it returns ``C`` (channels of a × channels of b, float64) with
    ``C[i, j] = Σ_images Σ_positions a_i · ∂y_j/∂a_i``, where ``y_j`` is channel j of b reduced
    over its positions (``aggregate``: ``mean`` or ``max`` of its grid, the patch grid for tokens)
    and a_i's positions are all of them (class token included), as in ``channel_attribution``.
    Divide by B for the mean over images. A later layer that does not depend on the earlier one
    gives zeros. One forward pass; one backward pass per channel of each later layer, over the
    part of the network between the two layers.
    """
    import torch
    from common.hooks import output_layouts
    if aggregate not in ("mean", "max"):
        raise ValueError(f"aggregate must be mean or max, got {aggregate!r}")
    device = next(model.parameters()).device
    images = images.to(device)
    out = {}
    with torch.enable_grad(), _keep_outputs(model, layer_names) as kept:
        model(images)
        missing = [n for n in layer_names if n not in kept]
        if missing:
            raise ValueError(f"layers {missing} did not run in the forward pass")
        layouts = output_layouts(model, {n: kept[n].shape for n in layer_names},
                                 tuple(images.shape[-2:]))
        ran = list(kept)  # the order in which the layers ran: depth order, whatever was asked
        pairs = list(zip(ran, ran[1:]))
        for a, b in pairs:
            grid = layouts[b].to_grid(kept[b]).flatten(2)  # B × M × cells
            targets = grid.mean(2) if aggregate == "mean" else grid.amax(2)
            start = time.perf_counter()
            out[(a, b)] = _drive(kept[a], targets, layouts[a]).numpy()
            log.info("connections %s → %s: %d backward passes over %d images in %.1f s", a, b,
                     targets.shape[1], len(images), time.perf_counter() - start)
    return out


def _drive(source, targets, layout):
    """Σ_images Σ_positions source · ∂targets[:, j]/∂source for every later channel j, as a
    C × M float64 tensor: one backward pass per j. (A vectorised pass,
    ``is_grads_batched``, was 1.6 times slower on the demo's CPU — 707 s against 434 s for
    ``_blocks.8`` → ``_blocks.15`` on 16 images — and held gigabytes of gradients at once.)"""
    import torch
    total = torch.zeros(source.shape[layout.channel_axis], targets.shape[1], dtype=torch.float64)
    seed = torch.zeros_like(targets)
    for j in range(targets.shape[1]):
        seed.zero_()
        seed[:, j] = 1
        g, = torch.autograd.grad(targets, [source], grad_outputs=seed, retain_graph=True,
                                 allow_unused=True)
        if g is None:
            continue  # the later layer does not depend on the earlier one
        per = layout.per_channel(source.detach() * g)  # B × C × positions
        total[:, j] = per.sum((0, 2)).double().cpu()
    return total


def attribute_images(bundle, layers: Sequence[str], jobs: Sequence[tuple[int, str, int, int]],
                     batch_size: int, top: int = 0, load=None) -> dict[int, dict]:
    """Relevance of every channel of ``layers`` to two classes of each image, by activation ×
    gradient: ``jobs`` holds (image id, path, wrong class, right class) — for a misclassified
    image its predicted and its true class. Images go through the model as 01 prepared them
    (``common.rerun.image_batches``; ``load``: path → tensor, to inject), ``batch_size`` at a
    time.

    Returns ``image id → {"wrong": {layer: C float32}, "right": …, "logit_wrong",
    "logit_right"}``; an image that cannot be read is skipped (logged). With ``top`` > 0 a record
    also holds ``"top"``, ``rank_contributions``' ``top`` neurons of all layers, and ``"maps"``,
    their activation maps on this image (``top`` × ``MAP_SIDE`` × ``MAP_SIDE`` float32,
    resampled bilinearly from the layer's grid).
    """
    import torch.nn.functional as F
    from common.rerun import image_batches
    out = {}
    # Each image goes in with its place in ``jobs`` as its "label", to find its classes again.
    items = [(i, path, k) for k, (i, path, _, _) in enumerate(jobs)]
    for ids, places, batch in image_batches(bundle, items, batch_size, desc="08 relevance",
                                            load=load):
        chosen = [jobs[k] for k in places]
        grids: dict | None = {} if top > 0 else None
        relevance, logits = channel_attribution(bundle.model, layers, batch,
                                                [[c[2] for c in chosen], [c[3] for c in chosen]],
                                                maps=grids)
        for b, i in enumerate(ids):
            out[i] = {"wrong": {L: np.asarray(relevance[L][0, b].numpy()) for L in layers},
                      "right": {L: np.asarray(relevance[L][1, b].numpy()) for L in layers},
                      "logit_wrong": float(logits[0, b]), "logit_right": float(logits[1, b])}
            if grids is not None:
                ranked = rank_contributions(out[i]["wrong"], out[i]["right"], top)
                picked = [grids[layer][b, c][None, None] for layer, c, _, _ in ranked]
                out[i]["top"] = ranked
                out[i]["maps"] = np.stack([
                    F.interpolate(m, size=(MAP_SIDE, MAP_SIDE), mode="bilinear",
                                  align_corners=False, antialias=True)[0, 0].numpy()
                    for m in picked]) if picked else np.zeros((0, MAP_SIDE, MAP_SIDE), np.float32)
    return out
