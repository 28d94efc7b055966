"""Dormant-seed overhead: wrapped model with every seed dormant vs the plain model (ratio).

Run: ``python benchmarks/dormant_overhead.py [--trials 31] [--clock thread --threads 1]``
(``--clock thread``: this thread's CPU time, steadier on a shared machine; see ratio_timer). Target on a 2-core CPU: <= 1.03 for
eval forward and for train forward+backward. If ``peft`` is installed, PEFT LoRA with its adapter
disabled is measured on the same models, side by side.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time
from collections.abc import Callable

import torch
from torch import nn

import esper
from ratio_timer import RatioResult, compare


def mlp() -> nn.Module:
    """MLP 784-512-512-10."""
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x2 with a residual connection, pooled into a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.stem(x)))  # (B, 16, 28, 28)
        h = torch.relu(self.bn2(self.conv(h)) + h)
        return self.head(h.mean(dim=(2, 3)))  # (B, 10)


def transformer() -> nn.Module:
    """One TransformerEncoderLayer, d_model 128, 4 heads, batch first."""
    return nn.TransformerEncoderLayer(128, 4, dim_feedforward=256, dropout=0.0, batch_first=True)


CASES: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("MLP 784-512-512-10, batch 32", mlp, (32, 784)),
    ("MLP 784-512-512-10, batch 256", mlp, (256, 784)),
    ("small CNN 28x28, batch 32", SmallCNN, (32, 1, 28, 28)),
    ("TransformerEncoderLayer d128, batch 16x32", transformer, (16, 32, 128)),
]


def forward_eval(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    model.eval()

    def run() -> object:
        with torch.no_grad():
            return model(x)

    return run


def forward_backward(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    model.train()

    def run() -> object:
        model(x).sum().backward()
        return None

    return run


def peft_disabled(model: nn.Module) -> nn.Module | None:
    """The model with PEFT LoRA (rank 8) on its Linear layers, adapters disabled; None without peft."""
    if importlib.util.find_spec("peft") is None:
        return None
    from peft import LoraConfig, get_peft_model

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, target_modules=names))
    wrapped.base_model.disable_adapter_layers()
    for param in wrapped.parameters():  # PEFT freezes the base; train it, as the others do
        param.requires_grad_(True)
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=31)
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; ratio = wrapped/plain")
    for title, factory, shape in CASES:
        plain = factory()
        wrapped = esper.wrap(plain, seeds_per_layer=4)
        peft_model = peft_disabled(plain)
        x = torch.randn(*shape)
        for mode, runner in (("eval fwd", forward_eval), ("train fwd+bwd", forward_backward)):
            result: RatioResult = compare(
                runner(plain, x), runner(wrapped, x), trials=args.trials, clock=clock
            )
            line = f"{title:44s} {mode:14s} esper {result.row()}"
            if peft_model is not None:
                peft_result = compare(
                    runner(plain, x), runner(peft_model, x), trials=args.trials, clock=clock
                )
                line += f" | peft-disabled {peft_result.ratio:6.3f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
