"""GPU check: the execution layer on an accelerator, one table in a few minutes.

Run on a GPU machine: ``python benchmarks/gpu_check.py`` (``--device cuda``, <= 5 minutes on one
GPU); in CI: ``python benchmarks/gpu_check.py --device cpu --quick``. Rows:

1. dormant and active-seed ratios (wrapped/plain, active/hand-written), fp32 and bf16 autocast,
   eval forward and train forward+backward (a device clock: each block ends with a synchronize);
2. graft latency (cache hit and cold load of a rank-8 kernel onto the device) and training step
   time p99/median while kernel loads run on the cache's threads;
3. step time p99/median while a Tezzeret worker thread compiles in the background;
4. host syncs: on CUDA, ``torch.cuda.set_sync_debug_mode("error")`` over forward, backward,
   optimizer step and ``model.step()`` with an ACTIVE and a BLENDING seed (any sync raises); on
   CPU the same steps with host reads by Esper's code counted (must be 0);
5. short ``esper train`` runs (digits MLP, digits transformer) with accuracy and throughput.
   ``esper train`` has no device setting yet, so these run on the CPU on every machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

import esper
from active_seed import active_model
from dormant_overhead import CASES, forward_backward, forward_eval
from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec, SeedState
from esper.execution import InMemoryArtifactSource
from ratio_timer import compare, percentile

LOWRANK = BlueprintSpec(family="lowrank_adapter", params={"rank": 8})


def device_clock(device: torch.device) -> Callable[[], float]:
    """Wall time that first waits for the device (so a block's time includes its kernels)."""
    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``dtype`` on ``device`` (a no-op context for ``None``)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def in_autocast(run: Callable[[], object], device: torch.device, dtype: torch.dtype | None):  # type: ignore[no-untyped-def]
    def wrapped() -> object:
        with autocast(device, dtype):
            return run()

    return wrapped


def ratios(device: torch.device, trials: int, quick: bool) -> list[tuple[str, str]]:
    """Row 1: dormant and active ratios, fp32 and bf16 autocast."""
    rows = []
    clock = device_clock(device)
    dtypes: list[tuple[str, torch.dtype | None]] = [("fp32", None), ("bf16", torch.bfloat16)]
    runners = (("eval", forward_eval), ("train", forward_backward))
    cases = CASES[:1] + CASES[-1:] if quick else CASES
    for title, factory, shape in cases:
        torch.manual_seed(0)
        plain = factory().to(device)
        wrapped = esper.wrap(plain, seeds_per_layer=4)
        x = torch.randn(*shape, device=device)
        for dname, dtype in dtypes:
            for mode, runner in runners:
                result = compare(
                    in_autocast(runner(plain, x), device, dtype),
                    in_autocast(runner(wrapped, x), device, dtype),
                    trials=trials,
                    clock=clock,
                )
                rows.append((f"dormant {title} {dname} {mode}", result.row()))
    for batch in (32,) if quick else (32, 256):
        model, hand, x = active_model(batch)
        model, hand, x = model.to(device), hand.to(device), x.to(device)
        for dname, dtype in dtypes:
            for mode, runner in runners:
                result = compare(
                    in_autocast(runner(hand, x), device, dtype),
                    in_autocast(runner(model, x), device, dtype),
                    trials=trials,
                    clock=clock,
                )
                rows.append(
                    (f"active rank-8 / hand, MLP batch {batch} {dname} {mode}", result.row())
                )
    return rows


def _mlp_and_data(
    device: torch.device, **wrap_options: Any
) -> tuple[esper.MorphableModel, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    host = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    model = esper.wrap(host.to(device), **wrap_options)
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.randn(128, 64, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    return model, optimizer, x, y


def _train_step(
    model: esper.MorphableModel, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.step()


def _step_times(step: Callable[[], None], steps: int, clock: Callable[[], float]) -> list[float]:
    times = []
    for _ in range(steps):
        started = clock()
        step()
        times.append((clock() - started) * 1e3)
    return times[max(1, steps // 10) :]


def _p99_row(times: list[float]) -> str:
    median = statistics.median(times)
    return f"median {median:7.3f} ms  p99 {percentile(times, 0.99):7.3f} ms  p99/median {percentile(times, 0.99) / median:5.2f}"


def graft_latency(device: torch.device, quick: bool) -> list[tuple[str, str]]:
    """Row 2: load+graft latency on the device, and step times while loads are in flight."""
    clock = device_clock(device)
    source = InMemoryArtifactSource()
    model, optimizer, x, y = _mlp_and_data(
        device, target_layers=["2"], seeds_per_layer=1, kernel_source=source
    )
    target = model.layer("2").target()
    n = 5 if quick else 30
    ids = [source.add(create_artifact(LOWRANK, target, init_seed=s)[0]) for s in range(n)]
    cold, hit = [], []
    for kernel_id in ids:
        for timings in (cold, hit):
            started = clock()
            model.load_kernel_sync("2", seed_idx=0, kernel_artifact_id=kernel_id)
            timings.append((clock() - started) * 1e3)
            model.unload_kernel("2", seed_idx=0)
    alone = _step_times(lambda: _train_step(model, optimizer, x, y), 40 if quick else 300, clock)
    pending = iter(ids * 50)

    def step_with_loads() -> None:
        layer = model.layer("2")
        if layer.seed_states[0] is SeedState.DORMANT and not layer.pending_loads():
            layer.request_kernel(0, next(pending))
        elif layer.seed_states[0] is not SeedState.DORMANT and not layer.pending_loads():
            model.unload_kernel("2", seed_idx=0)
        _train_step(model, optimizer, x, y)

    loading = _step_times(step_with_loads, 40 if quick else 300, clock)
    return [
        ("graft, cache hit", _p99_row(hit)),
        ("graft, cold load", _p99_row(cold)),
        ("train step, no loads", _p99_row(alone)),
        ("train step, loads in flight", _p99_row(loading)),
    ]


def during_compile(device: torch.device, quick: bool) -> list[tuple[str, str]]:
    """Row 3: step time while a Tezzeret worker thread compiles."""
    from compile_pipeline import _enqueue, _library  # the same queue as that benchmark
    from esper.tezzeret import TezzeretWorker

    clock = device_clock(device)
    model, optimizer, x, y = _mlp_and_data(device)
    steps = 40 if quick else 300
    alone = _step_times(lambda: _train_step(model, optimizer, x, y), steps, clock)
    with tempfile.TemporaryDirectory() as folder:
        library = _library(Path(folder))
        _enqueue(library, 2 if quick else 24)
        worker = TezzeretWorker(library).start()
        compiling = _step_times(lambda: _train_step(model, optimizer, x, y), steps, clock)
        compiled = worker.counters["compiled"]
        worker.stop()
        library.close()
    return [
        ("train step, alone", _p99_row(alone)),
        (f"train step, compiling ({compiled} done)", _p99_row(compiling)),
    ]


@contextmanager
def counted_host_reads() -> Iterator[list[int]]:
    """Count host reads of tensors (``item``, ``float``, ``tolist``...) made by Esper's code."""
    count = [0]
    names = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(original: Any) -> Any:
        def counted(self: torch.Tensor, *args: Any) -> Any:
            if sys._getframe(1).f_globals.get("__name__", "").startswith("esper"):
                count[0] += 1
            return original(self, *args)

        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(original))
    try:
        yield count
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def host_syncs(device: torch.device, quick: bool) -> list[tuple[str, str]]:
    """Row 4: no host sync over forward, backward, optimizer and model.step()."""
    source = InMemoryArtifactSource()
    model, optimizer, x, y = _mlp_and_data(
        device, target_layers=["0", "2"], seeds_per_layer=1, kernel_source=source, blend_steps=1000
    )
    for name in ("0", "2"):
        kernel_id = source.add(create_artifact(LOWRANK, model.layer(name).target(), init_seed=1)[0])
        model.load_kernel_sync(name, seed_idx=0, kernel_artifact_id=kernel_id)
    model.layer("0").seed_layout.transition(0, SeedState.ACTIVE, where="gpu_check")
    model.layer("0").set_alpha(0, 1.0)
    model.layer("0")._select_forward()
    optimizer = torch.optim.Adam(model.parameters())  # kernels included
    _train_step(model, optimizer, x, y)  # warm-up: lazily created optimizer state
    steps = 3 if quick else 20
    states = f"{model.layer('0').seed_states[0].name} + {model.layer('2').seed_states[0].name}"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        try:
            torch.cuda.set_sync_debug_mode("error")
            for _ in range(steps):
                _train_step(model, optimizer, x, y)
            verdict = f"no sync in {steps} steps"
        except RuntimeError as exc:
            verdict = f"SYNC: {str(exc).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return [(f"set_sync_debug_mode('error'), {states}", verdict)]
    with counted_host_reads() as count:
        for _ in range(steps):
            _train_step(model, optimizer, x, y)
    verdict = "no host read" if count[0] == 0 else f"HOST READS: {count[0]}"
    return [(f"host reads by esper in {steps} steps, {states}", verdict)]


def esper_train_runs(quick: bool) -> list[tuple[str, str]]:
    """Row 5: short ``esper train`` runs (CPU: the trainer has no device setting yet)."""
    from esper.tolaria.config import load_config
    from esper.tolaria.trainer import train

    rows = []
    configs = [("digits MLP", "configs/digits.yaml")]
    if not quick:
        configs.append(("digits transformer", "configs/digits_transformer.yaml"))
    root = Path(__file__).resolve().parent.parent
    for title, path in configs:
        with tempfile.TemporaryDirectory() as folder:
            overrides = [
                f"run.dir={folder}",
                "run.id=check",
                "train.epochs=1" if quick else "train.epochs=3",
            ]
            if quick:
                overrides.append("growth.enabled=false")
            config = load_config(root / path, overrides=overrides)
            started = time.perf_counter()
            result = train(config, command="gpu_check")
            seconds = time.perf_counter() - started
        rows.append(
            (
                f"esper train {title} (cpu)",
                f"test score {result.test_score:.4f}  {result.step / seconds:7.1f} steps/s  "
                f"{result.step} steps in {seconds:.1f} s  status {result.status}",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="few trials and steps (CI)")
    parser.add_argument("--trials", type=int, default=0, help="ratio pairs (0: 5 quick, 21 else)")
    args = parser.parse_args()
    device = torch.device(args.device)
    trials = args.trials or (5 if args.quick else 21)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    started = time.perf_counter()
    print(
        f"gpu_check on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", flush=True
    )
    sections = [
        ("ratios (A/A control in brackets)", lambda: ratios(device, trials, args.quick)),
        ("graft latency", lambda: graft_latency(device, args.quick)),
        ("step time during a compile", lambda: during_compile(device, args.quick)),
        ("host syncs", lambda: host_syncs(device, args.quick)),
        ("esper train", lambda: esper_train_runs(args.quick)),
    ]
    failed = False
    for title, section in sections:
        print(f"\n## {title}", flush=True)
        try:
            for label, value in section():
                print(f"{label:60s} {value}", flush=True)
                failed = failed or value.startswith(("SYNC", "HOST READS"))
        except Exception as exc:  # one broken section must not hide the others' numbers
            failed = True
            print(f"{'FAILED':60s} {type(exc).__name__}: {exc}", flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
