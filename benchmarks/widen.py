"""The widen operator: cost of a grown model vs a static one, function preservation, event time.

Run: ``python benchmarks/widen.py [--trials 31]``. For each architecture a host is wrapped and one
layer widened by ``k`` units; the baseline is a plain PyTorch model of the *final* shape, built
from scratch. Reported:

* per-step training time (forward + backward + Adam step) of the grown model over the static
  model's, while blending (α = 0.5, wrappers in place) and after fossilize (merged into plain
  wider modules); goals ≤ 1.3 and ≤ 1.05;
* max |Δ output| at insertion (α = 0, train and eval) and across the merge (α = 1 vs merged);
* the time of one widen event (``widen`` + ``fossilize`` with an attached Adam, optimizer
  surgery included), median of 7.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import esper
from ratio_timer import compare


class GPTBlock(nn.Module):
    """Pre-norm attention + fc -> GELU -> proj MLP (the block of a small GPT)."""

    def __init__(self, dim: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.proj(self.act(self.fc(self.ln_2(x))))


class ConvNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> Conv -> pooled linear head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(self.relu(self.bn(self.conv1(x)))).mean(dim=(2, 3)))


def mlp(width: int = 256) -> nn.Module:
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 256), nn.ReLU(),
                         nn.Linear(256, 10))  # fmt: skip


def mlp_layer_norm(width: int = 256) -> nn.Module:
    return nn.Sequential(nn.Linear(784, width), nn.LayerNorm(width), nn.GELU(),
                         nn.Linear(width, 10))  # fmt: skip


Case = tuple[
    Callable[[int], nn.Module], int, str, int, Callable[[], tuple[torch.Tensor, torch.Tensor]]
]
CASES: dict[str, Case] = {
    "mlp linear-relu-linear": (mlp, 256, "0", 128, lambda: (torch.randn(128, 784), torch.randint(10, (128,)))),
    "mlp linear-layernorm-gelu": (mlp_layer_norm, 256, "0", 128,
                                  lambda: (torch.randn(128, 784), torch.randint(10, (128,)))),
    "conv-bn-relu-conv": (ConvNet, 32, "conv1", 16,
                          lambda: (torch.randn(32, 3, 16, 16), torch.randint(10, (32,)))),
    "gpt block fc-gelu-proj": (lambda w: GPTBlock(128, w), 256, "fc", 128,
                               lambda: (torch.randn(16, 32, 128), torch.randn(16, 32, 128))),
}  # fmt: skip
"""name -> (host factory taking the widened layer's width, width, layer, k, batch)."""


def loss_of(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if target.dtype == torch.int64:
        return F.cross_entropy(output, target)
    return F.mse_loss(output, target)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> Callable[[], None]:  # fmt: skip
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of(model(x), y).backward()
        optimizer.step()

    return step


def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    diffs = []
    for mode in (True, False):
        a, b = copy.deepcopy(a).train(mode), copy.deepcopy(b).train(mode)
        with torch.no_grad():
            diffs.append((a(x) - b(x)).abs().max().item())
    return max(diffs)


def grown(name: str, *, fossilize: bool) -> tuple[esper.MorphableModel, torch.optim.Optimizer]:
    factory, width, layer, k, _ = CASES[name]
    torch.manual_seed(0)
    model = esper.wrap(factory(width))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.attach_optimizer(optimizer)
    graft = model.widen(layer, k, blend_steps=0 if fossilize else 2)
    if fossilize:
        model.widenings.fossilize(layer)
    else:
        model.step()  # α = 0.5
        assert graft.alpha == 0.5
    return model, optimizer


def static(name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    factory, width, _, k, _ = CASES[name]
    torch.manual_seed(0)
    model = factory(width + k)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def preservation(name: str) -> tuple[float, float]:
    """max |Δ| at insertion (α = 0) and across the merge (α = 1 -> plain)."""
    factory, width, layer, k, batch = CASES[name]
    x, _ = batch()
    torch.manual_seed(0)
    model = esper.wrap(factory(width))
    before = copy.deepcopy(model)
    graft = model.widen(layer, k, blend_steps=1)
    inserted = max_diff(before, model, x)
    with torch.no_grad():  # a non-zero fan-out, so the merge has something to merge
        graft.wrappers[graft.path.consumer].weight.normal_(0, 0.05)
    model.step()
    at_one = copy.deepcopy(model)
    model.widenings.fossilize(layer)
    return inserted, max_diff(at_one, model, x)


def event_ms(name: str) -> float:
    factory, width, layer, k, batch = CASES[name]
    x, y = batch()
    times = []
    for _ in range(7):
        torch.manual_seed(0)
        model = esper.wrap(factory(width))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.attach_optimizer(optimizer)
        train_step(model, optimizer, x, y)()  # the optimizer has state to move
        start = time.perf_counter()
        model.widen(layer, k, blend_steps=0)
        model.widenings.fossilize(layer)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=31)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'architecture':28s} {'phase':10s} {'grown / static train step':44s}")
    rows = []
    for name in CASES:
        x, y = CASES[name][4]()
        base, base_opt = static(name)
        for phase, fossilize in (("blending", False), ("fossilized", True)):
            model, optimizer = grown(name, fossilize=fossilize)
            result = compare(train_step(base, base_opt, x, y), train_step(model, optimizer, x, y),
                             trials=args.trials)  # fmt: skip
            print(f"{name:28s} {phase:10s} {result.row()}")
        inserted, merged = preservation(name)
        rows.append((name, inserted, merged, event_ms(name)))
    print(f"\n{'architecture':28s} {'max|Δ| insert':>14s} {'max|Δ| merge':>13s} {'event ms':>9s}")
    for name, inserted, merged, ms in rows:
        print(f"{name:28s} {inserted:14.2e} {merged:13.2e} {ms:9.2f}")


if __name__ == "__main__":
    main()
