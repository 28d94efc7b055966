"""Hugging Face hosts: a wrapped GPT-2 / Llama with every seed dormant vs the plain model (ratio),
and the same with one rank-8 kernel running per seeded kind, for scale.

Run: ``python benchmarks/hf_host_overhead.py [--trials 21]`` (needs the ``hf`` extra). Models are
built from small configs (nothing downloaded): GPT-2 with 2 layers of width 128, seeds on every
``Conv1D`` and the token embedding; Llama with 2 layers of width 128, seeds on every RMSNorm and
the token embedding. Target for dormant seeds: <= 1.03, as for the torch layers.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
import transformers
from torch import nn

import esper
from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec
from esper.execution import InMemoryArtifactSource
from ratio_timer import RatioResult, compare

VOCAB = 512


def gpt2() -> nn.Module:
    """GPT-2, 2 layers, width 128, 4 heads."""
    config = transformers.GPT2Config(
        n_layer=2, n_embd=128, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def llama() -> nn.Module:
    """Llama, 2 layers, width 128, 4 heads, MLP 256."""
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0,
        eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


CASES: list[tuple[str, Callable[[], nn.Module], list[str]]] = [
    ("GPT-2 2x128 (Conv1D + wte)", gpt2, ["kind:hf_conv1d", "kind:embedding"]),
    ("Llama 2x128 (RMSNorm + embed)", llama, ["kind:rms_norm", "kind:embedding"]),
]


def forward_eval(model: nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    model.eval()

    def run() -> object:
        with torch.no_grad():
            return model(input_ids=ids).logits

    return run


def train_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    model.train()

    def run() -> object:
        loss = model(input_ids=ids).logits.float().square().mean()
        loss.backward()
        return loss

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=21)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (args.batch, args.tokens))
    print(f"batch {args.batch} x {args.tokens} tokens, {torch.get_num_threads()} threads")
    for label, build, targets in CASES:
        plain = build()
        source = InMemoryArtifactSource()
        dormant = esper.wrap(copy.deepcopy(plain), target_layers=targets, kernel_source=source)
        assert torch.equal(forward_eval(dormant, ids)(), forward_eval(plain, ids)())  # type: ignore[arg-type]
        grown = esper.wrap(copy.deepcopy(plain), target_layers=targets, kernel_source=source)
        spec = BlueprintSpec(family="lowrank_adapter", params={"rank": 8})
        for name in grown.layer_names:
            data, _ = create_artifact(spec, grown.layer(name).target())
            grown.load_kernel_sync(name, seed_idx=0, kernel_artifact_id=source.add(data))
            grown.set_seed_alpha(name, seed_idx=0, alpha=1.0)
        rows: list[tuple[str, RatioResult]] = []
        for mode, make in (("eval forward", forward_eval), ("train fwd+bwd", train_step)):
            rows.append(
                (
                    f"{mode}, dormant",
                    compare(make(plain, ids), make(dormant, ids), trials=args.trials),
                )
            )
            rows.append(
                (
                    f"{mode}, 1 kernel/layer",
                    compare(make(plain, ids), make(grown, ids), trials=args.trials),
                )
            )
        print(f"\n{label}: {len(dormant.layer_names)} seeded layers")
        for name, result in rows:
            print(f"  {name:28s} {result.row()}")


if __name__ == "__main__":
    main()
