"""Widen: function-preserving at insertion, blended with α, culled exactly, merged on fossilize."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import esper
from esper.contracts import SeedState
from esper.errors import ConfigurationError, IllegalTransitionError


def _outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Train- and eval-mode outputs, on a copy (a train forward moves BatchNorm statistics)."""
    model = copy.deepcopy(model)
    model.train()
    train = model(x)
    model.eval()
    evaluated = model(x)
    model.train()
    return train.detach(), evaluated.detach()


def _widths(module: nn.Module) -> tuple[int, int]:
    weight = module.weight
    return weight.shape[0], weight.shape[1]


def test_widen_is_exact_at_insertion_in_train_and_eval(host_case) -> None:
    name, host, layer, x = host_case
    model = esper.wrap(host)
    before = _outputs(model, x)

    graft = model.widen(layer, 4)
    after = _outputs(model, x)

    assert graft.state is SeedState.BLENDING and graft.alpha == 0.0
    exact = name != "linear_layernorm_act_linear"  # LayerNorm: old stats blend from α = 0
    for b, a in zip(before, after, strict=True):
        if exact:
            assert torch.equal(a, b), name
        else:
            assert (a - b).abs().max() < 1e-6, name


def test_random_widen_keeps_the_function_through_the_ramp_and_the_merge(host_case) -> None:
    name, host, layer, x = host_case
    model = esper.wrap(host)
    reference = _outputs(model, x)
    model.widen(layer, 4, blend_steps=3)

    for _ in range(3):
        model.step()
    ramped = _outputs(model, x)
    model.widenings.fossilize(layer)
    merged = _outputs(model, x)

    for r, a, m in zip(reference, ramped, merged, strict=True):
        if name != "linear_layernorm_act_linear":  # zero fan-out: unchanged even at α = 1
            assert (a - r).abs().max() < 1e-5, name
        assert (m - a).abs().max() < 1e-5, name  # the merge computes what α = 1 computes


def test_fossilize_leaves_plain_wider_torch_modules(host_case) -> None:
    _name, host, layer, x = host_case
    model = esper.wrap(host)
    graft = model.widen(layer, 3, blend_steps=0)
    consumer = graft.path.consumer

    model.widenings.fossilize(layer)
    plain = model.unwrap()

    modules = dict(plain.named_modules())
    assert all(not type(m).__module__.startswith("esper") for m in plain.modules())
    out_a = _widths(modules[layer])[0]
    in_b = _widths(modules[consumer])[1]
    base_widths = {"0": 16, "conv1": 8, "fc": 32}
    assert out_a == in_b == base_widths[layer] + 3
    assert type(modules[layer]) in (nn.Linear, nn.Conv2d)
    if graft.path.norm is not None:
        norm = modules[graft.path.norm]
        assert isinstance(norm, nn.LayerNorm | nn.BatchNorm2d)
        assert norm.weight.shape[0] == base_widths[layer] + 3
    assert torch.allclose(plain(x), model(x), atol=1e-6)


def test_cull_restores_the_host_modules_exactly(host_case) -> None:
    _name, host, layer, _x = host_case
    model = esper.wrap(host)
    modules_before = {n: m for n, m in model.named_modules()}
    keys_before = {k: v.clone() for k, v in model.state_dict().items()}
    model.widen(layer, 5, blend_steps=4)
    model.step()
    model.step()

    model.widenings.cull(layer)

    assert {n: m for n, m in model.named_modules()} == modules_before
    after = model.state_dict()
    assert after.keys() == keys_before.keys()
    for key, value in keys_before.items():
        if key != "morph_step":
            assert torch.equal(after[key], value), key


def test_training_through_the_blend_and_merge_trains_the_new_units() -> None:
    torch.manual_seed(0)
    model = esper.wrap(nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 2)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.attach_optimizer(optimizer)
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    graft = model.widen("0", 4, blend_steps=5)
    fan_out = graft.wrappers["2"].weight

    for _ in range(8):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.step()
    assert graft.state is SeedState.ACTIVE
    assert fan_out.abs().sum() > 0  # the zero fan-out learned
    model.widenings.fossilize("0")
    for _ in range(3):  # and training goes on with the merged parameters
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    assert [g.get("esper_seed") for g in optimizer.param_groups] == [None]
    assert {p.shape for p in optimizer.param_groups[0]["params"]} >= {(12, 6), (2, 12)}
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    ("host", "layer", "message"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "2", "model's output"),
        (nn.Sequential(nn.Linear(4, 4), nn.Flatten(0), nn.Linear(4, 2)), "0", "Flatten"),
        (nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)), "0", "only Linear, Conv1d and Conv2d"),
        (nn.Sequential(nn.Linear(4, 4)), "nope", "no such module"),
    ],
)
def test_what_cannot_be_widened_is_refused_by_name(host, layer, message) -> None:
    model = esper.wrap(host)
    state = copy.deepcopy(model.state_dict())

    with pytest.raises(ConfigurationError, match=rf"cannot widen '{layer}'.*{message}"):
        model.widen(layer, 2)

    assert model.state_dict().keys() == state.keys()
    assert model.widenings.events["refused"] == 1


def test_a_residual_use_of_the_output_is_refused() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return self.out(torch.relu(h)) + h[:, :2]  # h is used twice

    with pytest.raises(ConfigurationError, match=r"cannot widen .fc.*used by 2 operations"):
        esper.wrap(Residual()).widen("fc", 2)


def test_bad_arguments_and_illegal_transitions() -> None:
    model = esper.wrap(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    with pytest.raises(ConfigurationError, match="k >= 1"):
        model.widen("0", 0)
    with pytest.raises(ConfigurationError, match="unknown widen init"):
        model.widen("0", 2, init="net2net")
    model.widen("0", 2, blend_steps=5)
    with pytest.raises(IllegalTransitionError, match="it is BLENDING"):
        model.widenings.fossilize("0")
    with pytest.raises(ConfigurationError, match="widen still in progress"):
        model.widen("0", 2)


def test_widen_twice_after_fossilize() -> None:
    torch.manual_seed(0)
    model = esper.wrap(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    x = torch.randn(3, 4)
    y = model(x).detach()
    for _ in range(2):
        model.widen("0", 2, blend_steps=0)
        model.widenings.fossilize("0")

    assert model.model[0].base.out_features == 8 and model.model[2].base.in_features == 8
    assert (model(x) - y).abs().max() < 1e-6


def test_a_blending_batch_norm_moves_the_host_statistics_as_the_host_would(conv_case) -> None:
    host, x = conv_case
    layer = "conv1"
    plain = esper.wrap(copy.deepcopy(host))
    model = esper.wrap(host)
    graft = model.widen(layer, 4)

    for _ in range(3):
        plain(x)
        model(x)

    norm, widened = plain.model.bn.base, model.model.bn.base
    assert torch.equal(widened.host.running_mean, norm.running_mean)
    assert torch.equal(widened.host.running_var, norm.running_var)
    assert int(widened.host.num_batches_tracked) == int(norm.num_batches_tracked) == 3
    assert widened.running_mean.abs().sum() > 0  # the new channels keep their own statistics
    model.widenings.cull(layer)
    assert torch.equal(model.model.bn.base.running_mean, norm.running_mean)
    assert graft.state.name == "DORMANT"
