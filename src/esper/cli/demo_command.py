"""``esper demo``: grow a small MLP on digits by hand and print what happened."""

from __future__ import annotations

import argparse

from esper.cli.output import console
from esper.cli.parsing import OneLineArgumentParser, positive_int


def add_parsers(commands: argparse._SubParsersAction[OneLineArgumentParser]) -> None:
    """Add ``demo`` to the ``esper`` sub-commands."""
    demo = commands.add_parser("demo", help="grow a small MLP on digits and print what happened")
    demo.add_argument("--epochs", type=positive_int, default=40)
    demo.add_argument(
        "--germinate-at", type=positive_int, default=20, help="epoch of germination (<= --epochs)"
    )
    demo.add_argument("--hidden", type=positive_int, default=8, help="hidden width of the host MLP")
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from rich.table import Table

    from esper.tolaria.demo import EpochRecord, run_demo

    console.print("[bold]esper demo[/bold]: an MLP on digits that grows its first layer mid-run")

    def show(record: EpochRecord) -> None:
        console.print(
            f"epoch {record.epoch:3d}  loss {record.train_loss:.4f}  "
            f"test acc {record.test_accuracy:.3f}  seeds: {record.seeds}"
        )

    result = run_demo(
        epochs=args.epochs, germinate_at_epoch=args.germinate_at, hidden=args.hidden, on_epoch=show
    )
    seeds = Table(title="seed states")
    for column in ("layer", "kind", "seeds", "kernel params", "kernel ids"):
        seeds.add_column(column)
    for layer in result.layers:
        states = ", ".join(f"{s.name.lower()} {n}" for s, n in layer.seeds_by_state.items() if n)
        kernels = ", ".join(k[:12] for k in layer.kernel_ids if k) or "-"
        seeds.add_row(
            layer.layer_name, layer.layer_kind.value, states, str(layer.kernel_parameters), kernels
        )
    console.print(seeds)
    if result.cache is not None:
        cache = Table(title="kernel cache")
        for column in ("entries", "bytes", "hits", "misses", "evictions", "load p50 ms"):
            cache.add_column(column, justify="right")
        p50 = result.cache.load_latency_ms_p50
        cache.add_row(
            str(result.cache.entries),
            str(result.cache.bytes),
            str(result.cache.hits),
            str(result.cache.misses),
            str(result.cache.evictions),
            f"{p50:.2f}" if p50 is not None else "-",
        )
        console.print(cache)
    summary = Table(title="before / after germination")
    for column in ("", "test accuracy", "parameters"):
        summary.add_column(column, justify="right")
    summary.add_row(
        f"before (epoch {result.germinated_at_epoch})",
        f"{result.accuracy_before:.4f}",
        str(result.parameters_before),
    )
    summary.add_row("after", f"{result.accuracy_after:.4f}", str(result.parameters_after))
    summary.add_row(
        "static host, same run without growth",
        f"{result.accuracy_static:.4f}",
        str(result.parameters_before),
    )
    console.print(summary)
    blueprint = result.blueprint.canonical_json() if result.blueprint else "-"
    console.print(
        f"germinated {blueprint} in layer {result.germinated_layer!r} "
        f"(kernel {result.kernel_id[:12]}); {result.wall_seconds:.1f}s"
    )
    return 0
