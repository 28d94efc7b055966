"""Optimizer state follows a widen's merge: old slice kept, new entries zero (or their own)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import esper

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
}


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=generator)
        y = torch.randn(16, 3, generator=generator)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if isinstance(model, esper.MorphableModel):
            model.step()


def _host() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _padded(value: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    pad = list(shape)
    pad[dim] = shape[dim] - value.shape[dim]
    return torch.cat([value, value.new_zeros(pad)], dim=dim)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_merged_training_matches_a_hand_made_wide_reference(kind: str) -> None:
    model = esper.wrap(_host())
    optimizer = OPTIMIZERS[kind](model.parameters())
    model.attach_optimizer(optimizer)
    _train(model, optimizer, 3, seed=1)
    narrow = {name: p.detach().clone() for name, p in model.model.named_parameters()}
    narrow_state = {
        name: {
            k: v.clone() if isinstance(v, torch.Tensor) else v
            for k, v in optimizer.state[p].items()
        }
        for name, p in model.model.named_parameters()
    }

    model.widen("0", 4, blend_steps=0)
    model.widenings.fossilize("0")
    wide = {name: p.detach().clone() for name, p in model.model.named_parameters()}

    # the reference: a plain network of the final shape, its optimizer state written by hand
    reference = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    reference.load_state_dict({k.replace("base.", ""): v for k, v in wide.items()})
    ref_optimizer = OPTIMIZERS[kind](reference.parameters())
    dims = {"0.weight": 0, "0.bias": 0, "2.weight": 1, "2.bias": None}
    for ref_name, param in reference.named_parameters():
        name = ref_name.replace(".", ".base.", 1)
        state = {}
        for key, value in narrow_state[name].items():
            dim = dims[ref_name]
            if isinstance(value, torch.Tensor) and value.dim() > 0 and dim is not None:
                value = _padded(value, param.shape, dim)  # old slice kept, new entries zero
            state[key] = value
        ref_optimizer.state[param] = state
    assert torch.equal(wide["0.base.weight"][:8], narrow["0.base.weight"])
    assert torch.equal(wide["2.base.weight"][:, 8:], torch.zeros(3, 4))

    _train(model, optimizer, 2, seed=2)
    _train(reference, ref_optimizer, 2, seed=2)

    for ref_name, param in reference.named_parameters():
        grown = dict(model.model.named_parameters())[ref_name.replace(".", ".base.", 1)]
        assert torch.allclose(grown, param, atol=1e-6, rtol=0), ref_name
        for key, value in ref_optimizer.state[param].items():
            assert torch.allclose(
                torch.as_tensor(optimizer.state[grown][key]), torch.as_tensor(value)
            )


def test_units_trained_while_blending_keep_their_adam_moments_bias_rescaled() -> None:
    model = esper.wrap(_host())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.attach_optimizer(optimizer)
    _train(model, optimizer, 5, seed=1)
    graft = model.widen("0", 2, blend_steps=2)
    _train(model, optimizer, 3, seed=3)  # the units' group took 3 steps, the host 8
    fan_in = graft.wrappers["0"].weight
    host_weight = model.model[0].base.host.weight
    units = {k: v.clone() for k, v in optimizer.state[fan_in].items()}
    host = {k: v.clone() for k, v in optimizer.state[host_weight].items()}

    model.widenings.fossilize("0")

    merged = optimizer.state[model.model[0].base.weight]
    assert merged["step"] == host["step"] == 8
    beta1, beta2 = optimizer.param_groups[0]["betas"]
    torch.testing.assert_close(merged["exp_avg"][:8], host["exp_avg"], rtol=0, atol=0)
    torch.testing.assert_close(
        merged["exp_avg"][8:], units["exp_avg"] * (1 - beta1**8) / (1 - beta1**3)
    )
    torch.testing.assert_close(
        merged["exp_avg_sq"][8:], units["exp_avg_sq"] * (1 - beta2**8) / (1 - beta2**3)
    )
    assert [g.get("esper_seed") for g in optimizer.param_groups] == [None]
    assert fan_in not in optimizer.state


def test_cull_drops_the_units_group_and_its_state() -> None:
    model = esper.wrap(_host())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.attach_optimizer(optimizer)
    base_params = list(optimizer.param_groups[0]["params"])
    graft = model.widen("0", 2, blend_steps=2)
    assert [g.get("esper_seed") for g in optimizer.param_groups] == [None, "widen:0:0"]
    _train(model, optimizer, 1, seed=1)
    units = graft.new_unit_parameters()

    model.widenings.cull("0")

    assert len(optimizer.param_groups) == 1
    assert all(
        p is q for p, q in zip(optimizer.param_groups[0]["params"], base_params, strict=True)
    )
    assert not any(p in optimizer.state for p in units)
