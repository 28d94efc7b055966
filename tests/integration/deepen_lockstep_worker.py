"""One rank of the DEEPEN lockstep test (launched by torchrun with 2 gloo ranks).

Every rank trains a wrapped GPT on its half of fixed batches; at step 3 every rank inserts a
block (the same call, the same RNG state), the lockstep sees the structural change and the DDP
wrapper is rebuilt; the block ramps, turns ACTIVE and is fossilized on every rank. Each rank
writes its losses, whether the replicas ended identical and a checksum per parameter.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import esper
from deepen_hosts import GPT
from esper import SeedState
from esper.core.lockstep import LockstepGrowth


def main() -> None:
    """Train, deepen in lockstep, fossilize; write ``rank<r>.json`` to ``--out``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--init", default="fresh")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = esper.wrap(GPT(), seeds_per_layer=1, health_every=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.attach_optimizer(optimizer)
    lockstep = LockstepGrowth(model)
    replica = lockstep.ddp()
    losses, rebuilt_at = [], []
    for step in range(10):
        tokens = torch.randint(0, 17, (8, 9), generator=torch.Generator().manual_seed(step))
        tokens = tokens[rank * 4 : (rank + 1) * 4]  # this rank's half
        loss = nn.functional.cross_entropy(
            replica(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 3:
            model.deepen(into="blocks", index=1, init=args.init, blend_steps=3)
        for inserted in model.inserted_blocks:
            if inserted.state is SeedState.ACTIVE:
                model.fossilize_block(inserted.block_id)
        if lockstep.step():
            replica = lockstep.ddp()
            rebuilt_at.append(step)
        losses.append(loss.item())
    result = {
        "losses": losses,
        "rebuilt_at": rebuilt_at,
        "identical": lockstep.replicas_identical(),
        "states": [b.state.name for b in model.inserted_blocks],
        "groups": len(optimizer.param_groups),
        "checksums": [float(p.double().sum()) for p in model.parameters()],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
