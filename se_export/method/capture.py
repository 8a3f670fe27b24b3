"""Forward hooks that capture what a module receives, and a row buffer to collect it.

Calibration needs the inputs of one decoder layer (or one linear inside it) for every chunk of
calibration windows. A pre-hook grabs them and raises to stop the forward there, so nothing after
the target is computed; ``RowBuffer`` collects the chunks without ``torch.cat``'s double peak.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn


class _Stop(Exception):
    pass


def layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_decoder_inputs(model: nn.Module, layers: nn.ModuleList, calib: torch.Tensor, batch_size: int):
    """Hidden states entering layer 0 and the keyword arguments each layer call gets, per chunk."""
    states: list[torch.Tensor] = []
    kwargs_list: list[dict] = []

    def grab(_module, args, kwargs):
        kwargs = dict(kwargs)
        states.append((args[0] if args else kwargs.pop("hidden_states")).detach())
        kwargs_list.append(kwargs)
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for chunk in calib.split(batch_size):
            with contextlib.suppress(_Stop):
                model(chunk, use_cache=False)
    finally:
        handle.remove()
    return states, kwargs_list


def capture_input(target: nn.Module, run: Callable[[], object]) -> torch.Tensor:
    """Input of ``target`` while ``run()`` executes, flattened to [tokens, in]; stops there."""
    grabbed: list[torch.Tensor] = []

    def grab(_module, args):
        grabbed.append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        raise _Stop

    handle = target.register_forward_pre_hook(grab)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if not grabbed:
        raise RuntimeError(f"{type(target).__name__} was not called; the architecture adapter is wrong")
    return grabbed[0]


def capture_inputs(targets: list[nn.Module], run: Callable[[], object]) -> list[torch.Tensor]:
    """Inputs of every module in ``targets`` (flattened to [tokens, features]) while ``run()``
    executes; stops at the last target, which must be called last."""
    grabbed: dict[int, torch.Tensor] = {}

    def hook(i: int):
        def grab(_module, args):
            grabbed[i] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if i == len(targets) - 1:
                raise _Stop
        return grab

    handles = [t.register_forward_pre_hook(hook(i)) for i, t in enumerate(targets)]
    try:
        run()
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(grabbed) < len(targets):
        missing = [type(targets[i]).__name__ for i in range(len(targets)) if i not in grabbed]
        raise RuntimeError(f"{', '.join(missing)} not called before the MLP; the architecture adapter is wrong")
    return [grabbed[i] for i in range(len(targets))]


class RowBuffer:
    """One ``[rows, ...]`` tensor filled block by block as activations are captured. Why:
    ``torch.cat`` of a list holds every block and the result at once, twice the size of a layer's
    captured activations (65,536 x 11,008 fp32 is 2.9 GB at a 7B model's down projection); here
    the peak is the result plus one block."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.at = 0
        self.out: torch.Tensor | None = None

    def add(self, block: torch.Tensor) -> None:
        if self.out is None:
            self.out = torch.empty(self.rows, *block.shape[1:], dtype=block.dtype)
        self.out[self.at:self.at + block.shape[0]] = block
        self.at += block.shape[0]

    def result(self) -> torch.Tensor:
        if self.out is None or self.at != self.rows:
            raise RuntimeError(f"expected {self.rows} rows of activations, got {self.at}")
        return self.out


def stack_rows(blocks: Iterable[torch.Tensor], rows: int) -> torch.Tensor:
    """``torch.cat(list(blocks))`` of ``rows`` rows, holding one block at a time (``RowBuffer``)."""
    buffer = RowBuffer(rows)
    for block in blocks:
        buffer.add(block)
    return buffer.result()


def count_rows(states: list[torch.Tensor]) -> int:
    return sum(h.numel() // h.shape[-1] for h in states)
