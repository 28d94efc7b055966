"""Step time per ACTIVE kernel at scale (issue 15's row): Esper vs hand-written adapters.

Run: ``python benchmarks/active_kernels_scale.py [--trials 21] [--clock thread --threads 1]``.
MLP of 8 Linear(256, 256) layers (ReLU between), batch 64, Adam, one full train step (forward,
backward, optimizer step). Esper: 1-32 rank-8 ``lowrank_adapter`` kernels ACTIVE (4 seeds per
layer), each in its own optimizer group as ``attach_optimizer`` makes them; hand-written: the
same adapters as ``base(x) + Σ α·up(down(x))`` modules, all parameters in one Adam group. Also
reported: the optimizer step alone with Esper's groups vs one group holding the same parameters
(what batching the groups would save). Goal: Esper/hand <= 1.10 at 32 kernels.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

import esper
from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec, SeedState
from esper.execution import InMemoryArtifactSource
from ratio_timer import compare

WIDTH, DEPTH, BATCH, SEEDS = 256, 8, 64, 4
LOWRANK = BlueprintSpec(family="lowrank_adapter", params={"rank": 8})


class HandAdapters(nn.Module):
    """``base(x) + Σ_i α · up_i(down_i(x))``, written directly."""

    def __init__(self, base: nn.Linear, kernels: list[nn.Module]) -> None:
        super().__init__()
        self.base = base
        self.kernels = nn.ModuleList(kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for kernel in self.kernels:
            y = y + kernel.up(kernel.down(x))
        return y


def host() -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def models(kernels: int) -> tuple[esper.MorphableModel, nn.Module]:
    """(wrapped model with ``kernels`` ACTIVE kernels, hand-written equivalent)."""
    torch.manual_seed(0)
    plain = host()
    hand = host()
    hand.load_state_dict(plain.state_dict())
    source = InMemoryArtifactSource()
    names = [str(i) for i in range(0, 2 * DEPTH - 1, 2)]
    model = esper.wrap(
        plain, target_layers=names, seeds_per_layer=SEEDS, kernel_source=source, blend_steps=1
    )
    grafted: dict[str, list[nn.Module]] = {n: [] for n in names}
    for k in range(kernels):
        name, seed = names[k % DEPTH], k // DEPTH
        data, _ = create_artifact(LOWRANK, model.layer(name).target(), init_seed=k)
        kernel = model.load_kernel_sync(name, seed_idx=seed, kernel_artifact_id=source.add(data))
        with torch.no_grad():
            kernel.up.weight.normal_(0, 0.02)
        grafted[name].append(kernel)
    model.step()
    states = [s for n in names for s in model.layer(n).seed_states]
    assert states.count(SeedState.ACTIVE) == kernels
    for name in names:
        hand[int(name)] = HandAdapters(hand[int(name)], grafted[name])
    return model, hand


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor
) -> Callable[[], object]:
    model.train()

    def run() -> object:
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()
        return None

    return run


def esper_optimizer(model: esper.MorphableModel) -> torch.optim.Optimizer:
    """Adam over the base parameters plus one group per kernel (what attach_optimizer builds)."""
    optimizer = torch.optim.Adam(model.base_parameters(), lr=1e-4)
    for name in model.layer_names:
        for seed in range(SEEDS):
            kernel = model.layer(name).kernel(seed)
            if kernel is not None:
                optimizer.add_param_group({"params": list(kernel.parameters())})
    return optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=21)
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--kernels", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    print(f"torch threads {torch.get_num_threads()}, clock {args.clock}; ratio = esper / hand")
    for kernels in args.kernels:
        model, hand = models(kernels)
        x = torch.randn(BATCH, WIDTH)
        e_opt, h_opt = esper_optimizer(model), torch.optim.Adam(hand.parameters(), lr=1e-4)
        result = compare(
            train_step(hand, h_opt, x), train_step(model, e_opt, x), trials=args.trials, clock=clock
        )
        print(
            f"{kernels:2d} active rank-8 kernels, train step ({len(e_opt.param_groups)} groups vs 1)  {result.row()}"
        )
        one_group = torch.optim.Adam(list(model.parameters()), lr=1e-4)
        model(x).square().mean().backward()
        result = compare(one_group.step, e_opt.step, trials=args.trials, clock=clock)
        print(
            f"{kernels:2d} kernels, optimizer step alone: {len(e_opt.param_groups)} groups / 1 group  {result.row()}"
        )


if __name__ == "__main__":
    main()
