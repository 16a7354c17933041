"""Forward hooks as context managers: they are always removed, even when the forward pass fails.

A hook sees a layer's output at the moment the layer returns. Torch code often changes that tensor
in place afterwards (``out += identity`` in ResNet blocks, ``ReLU(inplace=True)``), so hooks here
either reduce the output immediately (``reduce_outputs``) or keep a copy (``record_outputs``).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from common.models import get_module

log = logging.getLogger(__name__)


@contextlib.contextmanager
def reduce_outputs(model: nn.Module, layer_names: Sequence[str],
                   reducer: Callable[[torch.Tensor], object]) -> Iterator[dict[str, object]]:
    """Yield a dict that holds ``reducer(output)`` of each layer for the latest forward pass.

    ``reducer`` runs inside the hook, before any later in-place change to the output. A module
    called several times in one forward (a ReLU shared inside a block) keeps its last call and a
    warning is logged, since "the output of that layer" is then ambiguous.
    """
    results: dict[str, object] = {}
    calls: dict[str, int] = {}
    warned: set[str] = set()
    handles = []

    def make_hook(name: str):
        """Hook that stores the reduction of ``name``'s output."""
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 2 and name not in warned:
                warned.add(name)
                log.warning("layer %s runs more than once per forward pass; its last call is used",
                            name)
            results[name] = reducer(output)
        return hook

    try:
        for name in layer_names:
            handles.append(get_module(model, name).register_forward_hook(make_hook(name)))

        # A new forward pass starts: forget how often each layer ran in the previous one.
        handles.append(model.register_forward_pre_hook(lambda _m, _i: calls.clear()))
        yield results
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def record_outputs(model: nn.Module, layer_names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Yield a dict filled with a detached copy of each layer's output at every forward pass."""
    with reduce_outputs(model, layer_names, lambda out: out.detach().clone()) as results:
        yield results


@contextlib.contextmanager
def ablate_channels(model: nn.Module, channels: Mapping[str, Sequence[int]]) -> Iterator[None]:
    """Zero the given output channels of the given layers for as long as the block runs."""
    handles = []

    def make_hook(index: torch.Tensor):
        """Hook returning a copy of the output with ``index`` channels set to zero."""
        def hook(_module, _inputs, output):
            output = output.clone()
            output[:, index.to(output.device)] = 0
            return output
        return hook

    try:
        for name, chans in channels.items():
            if len(chans):
                index = torch.as_tensor(list(chans), dtype=torch.long)
                handles.append(get_module(model, name).register_forward_hook(make_hook(index)))
        yield
    finally:
        for handle in handles:
            handle.remove()
