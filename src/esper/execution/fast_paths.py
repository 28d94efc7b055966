"""PyTorch's inference fast paths and what a seeded layer does about each of them.

* ``nn.TransformerEncoderLayer``'s fused path (``torch._transformer_encoder_layer_fwd``) reads
  its children's weights directly and never calls them, so it would silently drop grafted
  kernels. PyTorch turns it off when any child has a forward hook, so a layer inside one
  registers :func:`disable_fused_fast_paths` while its kernels run.
* ``nn.TransformerEncoder`` (``enable_nested_tensor=True``) turns a padded batch into a nested
  tensor in eval under ``torch.no_grad()`` and runs its layers on it. Strided nested tensors
  support few operations, so kernels run on each sequence of the batch on its own
  (:func:`unbind_sequences`, :func:`nest_like`): the result equals the dense computation at every
  real position, and padding stays exactly zero as PyTorch's own path leaves it.
* ``nn.MultiheadAttention``'s native fast path and scaled-dot-product attention run inside the
  base module; kernels read its output, so nothing needs to change for them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def has_hooks(module: nn.Module) -> bool:
    """Whether a module has forward/backward hooks of its own (then it must be called, not
    bypassed by binding its ``forward``)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def disable_fused_fast_paths(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook registered while kernels run; its presence is the point.

    Fused inference paths such as ``nn.TransformerEncoderLayer``'s read their children's weights
    directly and skip the children's forwards, which would silently drop grafted kernels. They
    are disabled whenever a child module has a forward hook, so running kernels register this one.
    """


def unbind_sequences(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The components of a nested tensor, each with a batch dimension of one: ``(1, T_i, C)``."""
    return [component.unsqueeze(0) for component in tensor.unbind()]


def nest_like(pieces: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unbind_sequences`: a nested tensor in the layout of ``like``."""
    return torch.nested.as_nested_tensor([p.squeeze(0) for p in pieces], layout=like.layout)


def flatten_units(tensor: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``(M, C)``: every position of a dense or nested output as a row of its ``C`` units."""
    if tensor.is_nested:
        return torch.cat([flatten_units(piece, channel_dim) for piece in unbind_sequences(tensor)])
    if channel_dim == 1:
        tensor = tensor.movedim(1, -1)  # (N, *S, C)
    return tensor.reshape(-1, tensor.shape[-1])  # (M, C)
