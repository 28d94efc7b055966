"""DEEPEN: function preservation at insertion, the time of one deepen event, and the per-step cost
of a deepened model against the static model of the same depth (ratios).

Run: ``python benchmarks/deepen.py [--trials 31]``.

* Preservation: max |output after - output before| at insertion (α = 0) per architecture and
  initialisation, and for fresh blocks also at α = 1 (zero output projections).
* Event: wall time of ``model.deepen(...)`` with an attached Adam (surgery + optimizer group),
  median of 21, and as a fraction of one training step of the model.
* Per step (forward + backward + Adam step, batch 64): a transformer host (d=64, 4 heads) grown
  from 2 to 3 blocks and fossilized, against a static 3-block model: the unwrapped model, and the
  wrapped one with every seed dormant; also while the block is blending. Goal <= 1.05 fossilized.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import esper
from esper.tasks.hosts import ConvNet, TinyTransformer, build_mlp
from ratio_timer import compare

FEATURES, CLASSES = 64, 10


def _host(kind: str, depth: int = 2) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return build_mlp(FEATURES, CLASSES, hidden=(64, 64))
    if kind == "cnn1d":
        return ConvNet((4, 16), CLASSES, channels=(16, 16))
    if kind == "cnn2d":
        return ConvNet((1, 8, 8), CLASSES, channels=(16, 16))
    return TinyTransformer(FEATURES, CLASSES, d_model=64, heads=4, depth=depth, ff=256)


PRESERVATION = [
    ("mlp", "after Linear->ReLU", {"after": "act1"}),
    ("cnn1d", "after Conv1d->ReLU", {"after": "features.act1"}),
    ("cnn2d", "after Conv2d->ReLU", {"after": "features.act2"}),
    ("transformer", "into blocks, fresh", {"into": "blocks", "index": 1}),
    ("transformer", "into blocks, copy (G_stack)", {"into": "blocks", "index": 2, "init": "copy"}),
]


def preservation() -> None:
    """Print the max abs output change at insertion for each architecture."""
    print("function preservation at insertion (max |after - before|, train mode)")
    x = torch.randn(32, FEATURES)
    for kind, where, arguments in PRESERVATION:
        model = esper.wrap(_host(kind), seeds_per_layer=1)
        before = model(x)
        model.deepen(**arguments, blend_steps=1)  # type: ignore[arg-type]
        at_zero = (model(x) - before).abs().max().item()
        model.step()
        at_one = (model(x) - before).abs().max().item()
        one = f"{at_one:.3g}" if arguments.get("init") != "copy" else "n/a (a copy changes it)"
        print(f"  {kind:12s} {where:30s} alpha 0: {at_zero:.3g}   alpha 1: {one}")


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                y: torch.Tensor) -> Callable[[], object]:  # fmt: skip
    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def event_time() -> None:
    """Print the median wall time of one deepen event, and of one training step."""
    x, y = torch.randn(64, FEATURES), torch.randint(0, CLASSES, (64,))
    base = esper.wrap(_host("transformer", depth=4), seeds_per_layer=1)
    for init in ("fresh", "copy"):
        times = []
        for _ in range(21):
            model = copy.deepcopy(base)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            model.attach_optimizer(optimizer)
            start = time.perf_counter()
            model.deepen(into="blocks", index=2, init=init)
            times.append(time.perf_counter() - start)
        step = _train_step(model, optimizer, x, y)
        step()
        step_times = []
        for _ in range(11):
            start = time.perf_counter()
            step()
            step_times.append(time.perf_counter() - start)
        event, one_step = statistics.median(times), statistics.median(step_times)
        print(
            f"  deepen event ({init:5s}, d=64, 4 blocks): {event * 1e3:6.2f} ms "
            f"= {event / one_step:4.2f} training steps (batch 64)"
        )


def per_step(trials: int) -> None:
    """Print per-step time ratios of a grown model against the static model of its depth."""
    x, y = torch.randn(64, FEATURES), torch.randint(0, CLASSES, (64,))
    static = _host("transformer", depth=3)
    grown = esper.wrap(_host("transformer", depth=2), seeds_per_layer=1)
    blending = copy.deepcopy(grown)
    inserted = grown.deepen(into="blocks", index=1, init="copy", blend_steps=1)
    grown.step()
    grown.fossilize_block(inserted.block_id)
    blending.deepen(into="blocks", index=1, init="copy", blend_steps=100)
    blending.step()

    def steps(model: nn.Module) -> Callable[[], object]:
        return _train_step(model, torch.optim.Adam(model.parameters(), lr=1e-4), x, y)

    baseline = steps(static)
    print(f"per training step vs a static 3-block model (median of {trials} pairs)")
    for name, variant in [
        ("grown 2->3, fossilized, unwrap()", grown.unwrap()),
        ("grown 2->3, fossilized, wrapped (dormant seeds)", grown),
        ("grown 2->3, blending (alpha 0.01)", blending),
    ]:
        print(f"  {name:48s} {compare(baseline, steps(variant), trials=trials).row()}")


def main() -> None:
    """Run the three measurements."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=31)
    args = parser.parse_args()
    torch.set_num_threads(1)
    preservation()
    event_time()
    per_step(args.trials)


if __name__ == "__main__":
    main()
