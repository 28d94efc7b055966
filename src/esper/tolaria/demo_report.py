"""What ``esper demo`` reports: a line per epoch, then its tables, as plain text for any printer.

:func:`epoch_line` describes one :class:`~esper.tolaria.demo.EpochRecord`; :func:`demo_tables`
turns a :class:`~esper.tolaria.demo.DemoResult` into :class:`TextTable` s (seed states per layer,
the kernel cache, accuracy and parameters before and after the germination), and
:func:`closing_line` names what was grafted. The command line only renders them.
"""

from __future__ import annotations

from dataclasses import dataclass

from esper.tolaria.demo import DemoResult, EpochRecord, seed_counts

KERNEL_ID_CHARS = 12
"""Characters of a kernel id shown (a sha256 prefix)."""


@dataclass(frozen=True)
class TextTable:
    """A table of text cells.

    Attributes:
        title: shown above it.
        columns: the column headers.
        rows: one tuple of cells per row, as many as ``columns``.
        numeric: its columns hold numbers (right-aligned).
    """

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: bool = False


def epoch_line(record: EpochRecord) -> str:
    """``epoch   3  loss 0.7709  test acc 0.797  seeds: dormant 3, active 1``."""
    return (
        f"epoch {record.epoch:3d}  loss {record.train_loss:.4f}  "
        f"test acc {record.test_accuracy:.3f}  seeds: {record.seeds}"
    )


def demo_tables(result: DemoResult) -> list[TextTable]:
    """The seed-state table, the kernel-cache table (when the demo measured one) and the
    before/after summary."""
    tables = [
        TextTable(
            "seed states",
            ("layer", "kind", "seeds", "kernel params", "kernel ids"),
            tuple(
                (
                    layer.layer_name,
                    str(layer.layer_kind),
                    seed_counts(layer.seeds_by_state),
                    str(layer.kernel_parameters),
                    ", ".join(k[:KERNEL_ID_CHARS] for k in layer.kernel_ids if k) or "-",
                )
                for layer in result.layers
            ),
        )
    ]
    if result.cache is not None:
        cache, p50 = result.cache, result.cache.load_latency_ms_p50
        counters = (cache.entries, cache.bytes, cache.hits, cache.misses, cache.evictions)
        tables.append(
            TextTable(
                "kernel cache",
                ("entries", "bytes", "hits", "misses", "evictions", "load p50 ms"),
                ((*map(str, counters), f"{p50:.2f}" if p50 is not None else "-"),),
                numeric=True,
            )
        )
    before = str(result.parameters_before)
    tables.append(
        TextTable(
            "before / after germination",
            ("", "test accuracy", "parameters"),
            (
                (
                    f"before (epoch {result.germinated_at_epoch})",
                    f"{result.accuracy_before:.4f}",
                    before,
                ),
                ("after", f"{result.accuracy_after:.4f}", str(result.parameters_after)),
                ("static host, same run without growth", f"{result.accuracy_static:.4f}", before),
            ),
            numeric=True,
        )
    )
    return tables


def closing_line(result: DemoResult) -> str:
    """``germinated {spec} in layer 'fc1' (kernel 3f2a…); 8.1s``."""
    blueprint = result.blueprint.canonical_json() if result.blueprint else "-"
    return (
        f"germinated {blueprint} in layer {result.germinated_layer!r} "
        f"(kernel {result.kernel_id[:KERNEL_ID_CHARS]}); {result.wall_seconds:.1f}s"
    )
