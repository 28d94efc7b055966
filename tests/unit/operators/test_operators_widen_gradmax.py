"""GradMax init: function-preserving, and its new fan-in gets the largest first gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import esper
from esper.errors import ConfigurationError
from esper.operators import GradMaxBatch
from esper.operators.widen_init import gradient_correlation


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 4))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(64, 10, generator=generator), torch.randn(64, 4, generator=generator)


def _fan_in_gradient(model: esper.MorphableModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    graft = model.widenings.get("0")
    fan_in = graft.wrappers["0"].weight
    model.zero_grad()
    nn.functional.mse_loss(model(x), y, reduction="sum").backward()
    assert fan_in.grad is not None
    return fan_in.grad


def test_gradmax_is_exact_at_every_alpha_and_maximises_the_first_fan_in_gradient() -> None:
    x, y = _data()
    model = esper.wrap(_mlp())
    expected = model(x).detach()
    batch = GradMaxBatch(lambda: nn.functional.mse_loss(model(x), y, reduction="sum"))
    k = 3

    graft = model.widen("0", k, init="gradmax", blend_steps=1, gradmax_batches=[batch])
    assert torch.equal(model(x), expected)  # α = 0
    model.step()
    assert graft.alpha == 1.0
    assert torch.equal(model(x), expected)  # α = 1: zero fan-in, tanh(0) = 0
    assert torch.count_nonzero(graft.wrappers["0"].weight) == 0
    gradmax_norm = _fan_in_gradient(model, x, y).norm()

    # the bound it reaches: column norm c times the top-k singular values of M = Σ δ_B xᵀ
    reference = esper.wrap(_mlp())
    correlation = gradient_correlation(
        reference,
        reference.model[0],
        reference.model[2],
        [GradMaxBatch(lambda: nn.functional.mse_loss(reference(x), y, reduction="sum"))],
    )
    singular = torch.linalg.svdvals(correlation)[:k]
    c = reference.model[2].base.weight.detach().double().norm(dim=0).mean()
    torch.testing.assert_close(gradmax_norm.double(), c * singular.norm(), rtol=1e-4, atol=0)

    # random orthogonal fan-outs of the same column norms (GradMax's constraint set) do worse
    for seed in range(10):
        other = esper.wrap(_mlp())
        other.widen("0", k, init="gradmax", blend_steps=0, gradmax_batches=[
            GradMaxBatch(lambda m=other: nn.functional.mse_loss(m(x), y, reduction="sum"))
        ])  # fmt: skip
        fan_out = other.widenings.get("0").wrappers["2"].weight
        with torch.no_grad():
            random = torch.randn(fan_out.shape, generator=torch.Generator().manual_seed(seed))
            fan_out.copy_(torch.linalg.qr(random).Q * c.float())
        assert _fan_in_gradient(other, x, y).norm() < gradmax_norm


def test_random_init_has_a_trained_fan_out_but_zero_fan_out_gradient_on_fan_in() -> None:
    x, y = _data()
    model = esper.wrap(_mlp())
    model.widen("0", 3, init="random", blend_steps=0)

    assert _fan_in_gradient(model, x, y).abs().max() == 0  # zero fan-out: fan-in learns later


def test_gradmax_keeps_the_gpt_mlp_function(gpt_case) -> None:
    host, x = gpt_case
    layer = "fc"
    model = esper.wrap(host)
    expected = model(x).detach()
    target = torch.randn_like(expected)
    batch = GradMaxBatch(lambda: nn.functional.mse_loss(model(x), target))

    graft = model.widen(layer, 8, init="gradmax", blend_steps=0, gradmax_batches=[batch])
    model.widenings.fossilize(layer)

    assert graft.init == "gradmax"
    assert (model(x) - expected).abs().max() < 1e-6
    assert model.model.proj.base.weight[:, 32:].abs().sum() > 0  # the fan-out is not zero


@pytest.mark.parametrize(
    ("host", "message"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "ReLU's derivative"),
        (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)), "a norm"),
    ],
)
def test_gradmax_where_it_cannot_work_is_refused(host: nn.Module, message: str) -> None:
    model = esper.wrap(host)
    before = copy.deepcopy(model.state_dict())

    with pytest.raises(ConfigurationError, match=message):
        model.widen("0", 2, init="gradmax", gradmax_batches=[])

    assert model.state_dict().keys() == before.keys()


def test_a_widen_failing_half_way_leaves_the_host_exact_and_training_going() -> None:
    x, y = _data()
    model = esper.wrap(_mlp())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.attach_optimizer(optimizer)
    expected = model(x).detach()

    def failing_loss() -> torch.Tensor:
        model(x).sum().backward()  # gradients flow, then the batch fails
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="data loader died"):
        model.widen("0", 2, init="gradmax", gradmax_batches=[GradMaxBatch(failing_loss)])

    assert torch.equal(model(x), expected)
    assert all(p.grad is None for p in model.parameters())  # gradients as they were
    assert len(optimizer.param_groups) == 1 and model.widenings.events["refused"] == 1
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    assert nn.functional.mse_loss(model(x), y) < loss
