"""One rank of the lockstep-growth test (launched by torchrun, or alone as the reference run).

Trains a small wrapped MLP on a fixed global batch split across ranks; rank 0 decides, at step
``--decide-at``, to germinate a kernel; the decision is broadcast and every rank loads the kernel
(rank 1 from a deliberately slow source) and grafts it when all ranks have it. Each rank writes
its final parameters, seed states, alphas, per-step losses and the graft step to ``--out``.

The single-process reference (``--graft-at G``) waits for the kernel and grafts at boundary G.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import esper
from esper.blueprints import create_artifact
from esper.contracts import AdaptationAction, AdaptationDecision, BlueprintSpec, SeedState
from esper.core.lockstep import LockstepGrowth
from esper.execution import InMemoryArtifactSource

SPEC = BlueprintSpec(family="residual_mlp", params={"hidden": 8, "activation": "tanh"})


class SlowSource(InMemoryArtifactSource):
    """An in-memory source whose fetches take ``delay`` seconds (a rank with a slow link)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def fetch(self, kernel_id: str) -> bytes:
        time.sleep(self.delay)
        return super().fetch(kernel_id)


def _finished(args: argparse.Namespace, step: int, graft_step: int | None) -> bool:
    if args.steps is not None:
        return step >= args.steps
    if graft_step is not None:
        return step >= graft_step + args.after_graft
    return step >= 10_000  # the kernel never arrived: stop, and let the test fail on it


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--decide-at", type=int, default=5)
    parser.add_argument("--after-graft", type=int, default=20, help="steps to train after it")
    parser.add_argument("--graft-at", type=int, default=None, help="reference run: graft here")
    parser.add_argument("--steps", type=int, default=None, help="reference run: total steps")
    args = parser.parse_args()
    torch.set_num_threads(1)

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    source = SlowSource(delay=0.3 if rank == 1 else 0.0)
    model = esper.wrap(host, kernel_source=source, blend_steps=5)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, generator=generator)
    y = torch.randint(0, 4, (32,), generator=generator)
    shard = slice(rank * 32 // world, (rank + 1) * 32 // world)

    lockstep = LockstepGrowth(model) if distributed else None
    trained: nn.Module = lockstep.ddp() if lockstep else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.attach_optimizer(optimizer, lr=0.1)
    losses, graft_step = [], None
    step = 0
    while not _finished(args, step, graft_step):
        step += 1
        loss = nn.functional.cross_entropy(trained(x[shard]), y[shard])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        global_loss = loss.detach().clone()
        if distributed:
            dist.all_reduce(global_loss)
        losses.append(float(global_loss) / world)

        decisions = []
        if step == args.decide_at and rank == 0:
            decisions = [
                AdaptationDecision(
                    run_id="lockstep",
                    step=step,
                    action=AdaptationAction.GERMINATE,
                    layer_name="0",
                    seed_idx=0,
                    blueprint=SPEC,
                    policy="test",
                    confidence=1.0,
                    uncertainty=0.0,
                )
            ]
        if lockstep is not None:
            decisions = lockstep.broadcast(decisions)
        for decision in decisions:
            assert decision.blueprint is not None
            data, _ = create_artifact(decision.blueprint, model.layer(decision.layer_name).target())
            model.request_kernel(
                decision.layer_name, seed_idx=decision.seed_idx, kernel_artifact_id=source.add(data)
            )
        if lockstep is None:
            if args.graft_at is not None and step == args.graft_at:
                for layer_name, seed_idx, _ in model.pending_loads():
                    model.layer(layer_name)._pending[seed_idx].result(timeout=30)
            model.step(graftable={} if step != args.graft_at else None)
        elif lockstep.step():
            del trained  # the old wrapper's gradient hooks go with it
            trained = lockstep.ddp()
        if graft_step is None and model.seed_state("0", 0) is SeedState.BLENDING:
            graft_step = step

    # health accumulators hold this rank's own data until read: read them (averaged in lockstep)
    signals = lockstep.collect_telemetry() if lockstep else model.collect_telemetry()
    layer = model.layer("0")
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(
        {name: t.detach().contiguous() for name, t in model.state_dict().items()},
        args.out / f"rank{rank}.safetensors",
    )
    summary = {
        "losses": losses,
        "steps": step,
        "graft_step": graft_step,
        "states": [s.name for s in layer.seed_states],
        "alphas": layer.seed_layout.alpha.tolist(),
        "param_groups": len(optimizer.param_groups),
        "telemetry": [signal.model_dump(mode="json", exclude={"timestamp"}) for signal in signals],
    }
    (args.out / f"rank{rank}.json").write_text(json.dumps(summary))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
