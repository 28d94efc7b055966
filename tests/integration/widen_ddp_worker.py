"""One rank of the widen lockstep test: every rank widens at the same step, DDP rebuilt.

Run under ``torchrun --nproc_per_node 2``. Each rank trains its own shard of a synthetic batch;
at step 4 every rank widens ``0`` by 4 units (blend 3 steps), at step 8 fossilizes it, and the
DDP wrapper is rebuilt after each structural change. Writes ``rank<r>.json`` (shapes, whether
the replicas were identical after each event) and ``rank<r>.safetensors`` (the final state).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import esper
from esper.core.lockstep import LockstepGrowth


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = esper.wrap(nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.attach_optimizer(optimizer)
    lockstep = LockstepGrowth(model)
    replica = lockstep.ddp()
    data = torch.Generator().manual_seed(100 + rank)
    identical = {}
    for step in range(12):
        if step == 4:
            model.widen("0", 4, blend_steps=3)
            replica = lockstep.ddp()
            identical["after_widen"] = lockstep.replicas_identical()
        if step == 8:
            model.widenings.fossilize("0")
            replica = lockstep.ddp()
            identical["after_fossilize"] = lockstep.replicas_identical()
        x, y = torch.randn(16, 6, generator=data), torch.randn(16, 3, generator=data)
        loss = nn.functional.mse_loss(replica(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.step()
    identical["end"] = lockstep.replicas_identical()
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / f"rank{rank}.safetensors"))
    report = {
        "identical": identical,
        "widths": [model.model[0].base.out_features, model.model[3].base.in_features],
        "param_groups": len(optimizer.param_groups),
    }
    (args.out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
