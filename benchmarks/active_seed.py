"""One active seed vs a hand-written module computing the same thing (ratio).

Run: ``python benchmarks/active_seed.py [--trials 31] [--clock thread --threads 1]``. The model
is the MLP 784-512-512-10 with a rank-8 ``lowrank_adapter`` kernel ACTIVE (alpha 1) on its middle
layer; the baseline is the same MLP whose middle layer is a hand-written
``base(x) + alpha * up(down(x))`` module sharing the same weights. Goal (issue 13): <= 1.05, eval
forward and train forward+backward. The same model with its seed FOSSILIZED is then timed
against its own ``unwrap()`` (goal: <= 1.05).

``--clock thread`` times this thread's CPU time instead of wall time: on a CPU shared with other
jobs the wall-clock A/A control swings by 10-30%, the thread clock's by a few percent.

Guard variants measured on the way (thread clock, one thread, the blend ops alone, batch 32 /
256): the guard as it is (``nan_to_num`` of the output, a masked 0-dim scale, ``addcmul``) 11 /
42 us; ``addcmul(y, where(isfinite(sum), k, 0), alpha)`` 22 / 109 us, because ``where`` with a
broadcast 0-dim condition is slow on a CPU (82 us alone at 256 vs 17 us for ``nan_to_num``);
``where(flag, addcmul(...), y)`` 20 / 111 us. With the backward counted (a forward+backward of
the blend alone) ``where`` wins: 166 vs 198 us at (64, 256), 541 vs 809 us at (256, 512), even
at (32, 512); so the blend uses ``where`` when the output needs a gradient. Sharing one ``FiniteGradient`` among a layer's
seeds instead of one per seed: 32 kernels (``active_kernels_scale.py``) 1.36 -> 1.27.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import esper
from dormant_overhead import forward_backward, forward_eval, mlp
from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec, SeedState
from esper.execution import InMemoryArtifactSource
from ratio_timer import compare


class HandWrittenAdapter(nn.Module):
    """``base(x) + alpha * up(down(x))``: what an active rank-r seed computes, written directly."""

    def __init__(self, base: nn.Linear, down: nn.Linear, up: nn.Linear, alpha: float) -> None:
        super().__init__()
        self.base, self.down, self.up = base, down, up
        self.register_buffer("alpha", torch.tensor(alpha))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.alpha * self.up(self.down(x))


def active_model(
    batch: int, activation: str = "identity"
) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(morphable model with one ACTIVE rank-8 seed, equivalent hand-written model, input).

    With an ``activation`` other than identity the hand-written model is not equivalent (it has
    none); such a model serves only the fossilized-vs-``unwrap()`` rows (a kernel that cannot be
    merged into the host's weights)."""
    torch.manual_seed(0)
    plain = mlp()
    source = InMemoryArtifactSource()
    model = esper.wrap(plain, target_layers=["2"], kernel_source=source, blend_steps=1)
    spec = BlueprintSpec(family="lowrank_adapter", params={"rank": 8, "activation": activation})
    data, _ = create_artifact(spec, model.layer("2").target(), init_seed=0)
    kernel = model.load_kernel_sync("2", seed_idx=0, kernel_artifact_id=source.add(data))
    model.step()
    assert model.seed_state("2", 0) is SeedState.ACTIVE
    with torch.no_grad():
        kernel.up.weight.normal_(0, 0.02)
    hand = mlp()
    hand.load_state_dict(plain.state_dict())
    hand[2] = HandWrittenAdapter(hand[2], kernel.down, kernel.up, 1.0)
    x = torch.randn(batch, 784)
    if activation == "identity":
        torch.testing.assert_close(model(x), hand(x))
    return model, hand, x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=31)
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    runners = (("eval fwd", forward_eval), ("train fwd+bwd", forward_backward))
    print(f"torch threads {torch.get_num_threads()}, clock {args.clock}")
    print("ratio = esper active seed / hand-written module")
    fossilized = []
    for batch in (32, 256):
        model, hand, x = active_model(batch)
        for mode, runner in runners:
            result = compare(runner(hand, x), runner(model, x), trials=args.trials, clock=clock)
            print(f"MLP 784-512-512-10 batch {batch:3d}, rank-8 seed  {mode:14s} {result.row()}")
        model.fossilize("2", seed_idx=0)
        fossilized.append(("merged", batch, model, model.unwrap(), x))
        model, _, x = active_model(batch, activation="gelu")
        model.fossilize("2", seed_idx=0)
        fossilized.append(("gelu, kept", batch, model, model.unwrap(), x))
    print("ratio = esper, seed FOSSILIZED / its own unwrap() (which merges a linear kernel)")
    for kind, batch, model, plain, x in fossilized:
        for mode, runner in runners:
            result = compare(runner(plain, x), runner(model, x), trials=args.trials, clock=clock)
            print(f"MLP batch {batch:3d}, fossilized kernel ({kind:10s}) {mode:14s} {result.row()}")


if __name__ == "__main__":
    main()
