"""The ``esper`` command line: parse arguments, call the library, print the result.

Run ``esper --help`` for the commands.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from esper.contracts import BlueprintSpec, BlueprintStatus
from esper.errors import ConfigurationError, EsperError

if TYPE_CHECKING:
    from esper.urza import ArtifactLibrary

console = Console()


def _demo(args: argparse.Namespace) -> int:
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


def _tamiyo_serve(args: argparse.Namespace) -> int:
    import signal

    from esper.oona import open_bus
    from esper.tamiyo import SafetyConfig, SafetyGates, TamiyoController, load_policy

    safety = SafetyGates(
        SafetyConfig(
            cooldown_steps=args.cooldown_steps,
            window_steps=args.window_steps,
            max_adaptations=args.max_adaptations,
            min_confidence=args.min_confidence,
            max_uncertainty=args.max_uncertainty,
            max_parameter_fraction=args.max_parameter_fraction,
        )
    )
    policy = load_policy(args.policy, seed=args.seed)
    bus = open_bus(args.bus)
    controller = TamiyoController(
        bus,
        policy,
        run_id=args.run_id,
        safety=safety,
        total_steps=args.total_steps,
        decide_every_steps=args.decide_every,
        cycle_s=args.cycle_ms / 1e3,
        explore=args.explore,
    )

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # stop cleanly under a process manager too
    console.print(
        f"Tamiyo controller for run {args.run_id!r} with policy {policy.name!r} on {args.bus} "
        "(Ctrl-C stops it)"
    )
    try:
        controller.serve(duration_s=args.duration)
    finally:
        bus.close()
    console.print(f"decided {controller.adaptations} germinations: {dict(controller.counters)}")
    return 0


def _open_library(args: argparse.Namespace) -> ArtifactLibrary:
    from esper.urza import open_library

    return open_library(
        args.urza, metadata_url=args.metadata_url, blob_url=args.blob_url, run_dir=args.run_dir
    )


def _urza_serve(args: argparse.Namespace) -> int:
    from esper.tezzeret import RegistryCatalog
    from esper.urza import UrzaSettings, serve

    settings = UrzaSettings.from_env()
    if settings.token is None:
        raise ConfigurationError(
            "the Urza service needs a bearer token: set ESPER_URZA_TOKEN to a secret value "
            "(clients send the same value)"
        )
    overrides = {"metadata_url": args.metadata_url, "blob_url": args.blob_url}
    if args.run_dir is not None:
        overrides["run_dir"] = args.run_dir
    limits = ("max_artifact_bytes", "max_concurrent_uploads", "max_kernel_parameters")
    overrides["limits"] = settings.limits.updated(**{k: getattr(args, k) for k in limits})
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    console.print(f"Urza service on http://{args.host}:{args.port} (Ctrl-C stops it)")
    level, catalog = args.log_level.lower(), RegistryCatalog()
    serve(host=args.host, port=args.port, settings=settings, catalog=catalog, log_level=level)
    return 0


def _tezzeret_worker(args: argparse.Namespace) -> int:
    from esper.oona import open_bus
    from esper.tezzeret import TezzeretWorker

    library = _open_library(args)
    bus = open_bus(args.bus) if args.bus else None
    worker = TezzeretWorker(
        library,
        bus,
        worker_id=args.worker_id,
        poll_interval_s=args.poll_interval,
        lease_seconds=args.lease_seconds,
        parent_pid=args.parent_pid,
    )
    console.print(f"Tezzeret worker {worker.worker_id} compiling jobs (Ctrl-C stops it)")
    try:
        handled = worker.run(max_jobs=args.max_jobs, stop_when_idle=args.stop_when_idle)
    except KeyboardInterrupt:
        handled = sum(worker.counters.values())
    finally:
        library.close()
        if bus is not None:
            bus.close()
    console.print(f"handled {handled} jobs: {dict(worker.counters)}")
    return 0


def _parse_param(text: str) -> tuple[str, int | float | bool | str]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigurationError(f"--param expects key=value, got {text!r}")
    value: int | float | bool | str = raw
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    else:
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                continue
    return key, value


def _blueprint_submit(args: argparse.Namespace) -> int:
    from esper.blueprints import parse_params

    spec = BlueprintSpec(family=args.family, params=dict(_parse_param(p) for p in args.param))
    parse_params(spec)  # unknown family or bad parameters: fail here, before storing anything
    library = _open_library(args)
    try:
        record = library.submit_blueprint(spec, name=args.name)
    finally:
        library.close()
    console.print(f"{record.blueprint_id}  {record.status.value}  {spec.canonical_json()}")
    return 0


def _blueprint_list(args: argparse.Namespace) -> int:
    library = _open_library(args)
    try:
        records = library.list_blueprints(BlueprintStatus(args.status) if args.status else None)
    finally:
        library.close()
    table = Table(title=f"blueprints ({len(records)})")
    for column in ("id", "name", "status", "spec", "reason"):
        table.add_column(column)
    for record in records:
        table.add_row(
            record.blueprint_id[:12],
            record.name or "",
            record.status.value,
            record.spec.canonical_json(),
            record.reason or "",
        )
    console.print(table)
    return 0


def _kernel_list(args: argparse.Namespace) -> int:
    library = _open_library(args)
    try:
        kernels = library.find_kernels(blueprint_id=args.blueprint)
    finally:
        library.close()
    table = Table(title=f"kernels ({len(kernels)})")
    for column in ("id", "blueprint", "target", "params", "bytes", "latency us"):
        table.add_column(column)
    for kernel in kernels:
        latency = kernel.characterization.latency_us_median if kernel.characterization else None
        table.add_row(
            kernel.kernel_id[:12],
            kernel.blueprint.family,
            kernel.target.describe(),
            str(kernel.parameter_count),
            str(kernel.size_bytes),
            f"{latency:.1f}" if latency is not None else "-",
        )
    console.print(table)
    return 0


def _kernel_show(args: argparse.Namespace) -> int:
    library = _open_library(args)
    try:
        metadata = library.get_kernel_metadata(args.kernel_id)
    finally:
        library.close()
    console.print_json(metadata.model_dump_json())
    return 0


def _train(args: argparse.Namespace) -> int:
    from esper.tolaria.config import load_config
    from esper.tolaria.progress import RichProgress
    from esper.tolaria.trainer import resume_config, train

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from esper.tolaria.distributed import launch

        return launch(args.nproc, _without_nproc(args.argv))
    if args.resume is not None:
        config = resume_config(args.resume, args.overrides)
    elif args.config is not None:
        config = load_config(args.config, overrides=args.overrides)
    else:
        raise ConfigurationError(
            "esper train needs --config configs/<name>.yaml (or --resume runs/<run-id>)"
        )
    with RichProgress(console) as progress:
        result = train(
            config,
            resume=args.resume,
            observer=progress,
            stop_after_epoch=args.stop_after_epoch,
        )
    if not result.primary:
        return 0  # another rank of a distributed run: rank 0 reports
    console.print(
        f"run {result.folder.run_id} {result.status} at epoch {result.epoch}: test score "
        f"{result.test_score:.4f}, {result.parameters} parameters; report: "
        f"{result.folder.report_path}"
    )
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` / ``--nproc=N`` option (each rank runs one process)."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            kept.append(token)
    return kept


def _report(args: argparse.Namespace) -> int:
    from esper.tolaria.report import write_report

    path = write_report(args.run, compare=args.compare)
    console.print(f"report written to {path}")
    return 0


def _runs(args: argparse.Namespace) -> int:
    from esper.tolaria.run_folder import list_runs

    rows = list_runs(args.dir)
    table = Table(title=f"runs in {args.dir} ({len(rows)})")
    for column in ("run", "status", "data", "host", "epoch", "test score", "params", "seeds"):
        table.add_column(column, no_wrap=column in ("run", "status"))
    for row in rows:
        score = f"{row.test_score:.4f} {row.score_name}" if row.test_score is not None else "-"
        table.add_row(
            row.run_id,
            row.status,
            row.dataset,
            row.host,
            f"{row.epoch}/{row.epochs}",
            score,
            str(row.parameters if row.parameters is not None else "-"),
            row.seeds,
        )
    console.print(table)
    return 0


def _add_library_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--urza",
        default=None,
        help="the Urza service, http(s)://host:port (token from ESPER_URZA_TOKEN)",
    )
    parser.add_argument("--metadata-url", default=None, help="sqlite:///path or postgresql://...")
    parser.add_argument("--blob-url", default=None, help="file:///path or s3://bucket/prefix")
    parser.add_argument("--run-dir", default=None, help="folder of the embedded library")


def build_parser() -> argparse.ArgumentParser:
    """The ``esper`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="esper", description="Morphogenetic training for PyTorch."
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="grow a small MLP on digits and print what happened")
    demo.add_argument("--epochs", type=int, default=40)
    demo.add_argument("--germinate-at", type=int, default=20, help="epoch of germination")
    demo.add_argument("--hidden", type=int, default=8, help="hidden width of the host MLP")
    demo.set_defaults(handler=_demo)

    tamiyo = commands.add_parser("tamiyo", help="the growth controller").add_subparsers(
        dest="tamiyo_command", required=True
    )
    serve_tamiyo = tamiyo.add_parser(
        "serve", help="decide growth for a training run from its telemetry on the bus"
    )
    serve_tamiyo.add_argument("--bus", required=True, help="redis://host:port/db?stream_prefix=…")
    serve_tamiyo.add_argument(
        "--policy", default="bottleneck", help="random, round_robin, bottleneck, or a policy file"
    )
    serve_tamiyo.add_argument("--run-id", required=True, help="the training run to serve")
    serve_tamiyo.add_argument("--seed", type=int, default=0, help="seed of a sampling policy")
    serve_tamiyo.add_argument("--explore", action="store_true", help="sample actions")
    serve_tamiyo.add_argument("--total-steps", type=int, default=None)
    serve_tamiyo.add_argument("--decide-every", type=int, default=1, help="telemetry steps")
    serve_tamiyo.add_argument("--cycle-ms", type=float, default=100.0)
    serve_tamiyo.add_argument("--cooldown-steps", type=int, default=100)
    serve_tamiyo.add_argument("--window-steps", type=int, default=500)
    serve_tamiyo.add_argument("--max-adaptations", type=int, default=4, help="per window")
    serve_tamiyo.add_argument("--min-confidence", type=float, default=0.0)
    serve_tamiyo.add_argument("--max-uncertainty", type=float, default=None)
    serve_tamiyo.add_argument("--max-parameter-fraction", type=float, default=0.5)
    serve_tamiyo.add_argument("--duration", type=float, default=None, help="seconds, then stop")
    serve_tamiyo.set_defaults(handler=_tamiyo_serve)

    urza = commands.add_parser("urza", help="the artifact library").add_subparsers(
        dest="urza_command", required=True
    )
    serve = urza.add_parser("serve", help="serve the library over HTTP (FastAPI + uvicorn)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--metadata-url", default=None, help="sqlite:///path or postgresql://...")
    serve.add_argument("--blob-url", default=None, help="file:///path or s3://bucket/prefix")
    serve.add_argument("--run-dir", default=None, help="folder of the embedded defaults")
    for flag, what in (("artifact-bytes", "kernel upload bytes (512 MiB)"),
                       ("concurrent-uploads", "uploads at once (8)"),
                       ("kernel-parameters", "kernel parameters a job may ask for")):  # fmt: skip
        serve.add_argument(f"--max-{flag}", type=int, default=None, help=f"most {what}")
    serve.set_defaults(handler=_urza_serve)

    tezzeret = commands.add_parser("tezzeret", help="the blueprint compiler").add_subparsers(
        dest="tezzeret_command", required=True
    )
    worker = tezzeret.add_parser("worker", help="claim and compile jobs from Urza")
    _add_library_options(worker)
    worker.add_argument("--bus", default=None, help="announce kernel.ready on redis://...")
    worker.add_argument("--worker-id", default=None)
    worker.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit when this process is no longer the parent",
    )
    worker.add_argument("--poll-interval", type=float, default=0.2, help="seconds")
    worker.add_argument(
        "--lease-seconds",
        type=float,
        default=600.0,
        help="a claimed job may be reclaimed by another worker after this long",
    )
    worker.add_argument("--max-jobs", type=int, default=None)
    worker.add_argument("--stop-when-idle", action="store_true")
    worker.set_defaults(handler=_tezzeret_worker)

    blueprint = commands.add_parser("blueprint", help="blueprints in Urza").add_subparsers(
        dest="blueprint_command", required=True
    )
    submit = blueprint.add_parser("submit", help="store a blueprint spec")
    _add_library_options(submit)
    submit.add_argument("--family", required=True, help="lowrank_adapter, residual_mlp, ...")
    submit.add_argument("--param", action="append", default=[], help="key=value (repeatable)")
    submit.add_argument("--name", default=None)
    submit.set_defaults(handler=_blueprint_submit)
    listing = blueprint.add_parser("list", help="list blueprints")
    _add_library_options(listing)
    listing.add_argument("--status", choices=[s.value for s in BlueprintStatus], default=None)
    listing.set_defaults(handler=_blueprint_list)

    kernel = commands.add_parser("kernel", help="compiled kernels in Urza").add_subparsers(
        dest="kernel_command", required=True
    )
    kernels = kernel.add_parser("list", help="list kernels")
    _add_library_options(kernels)
    kernels.add_argument("--blueprint", default=None, help="only kernels of this blueprint id")
    kernels.set_defaults(handler=_kernel_list)
    show = kernel.add_parser("show", help="a kernel's metadata as JSON")
    _add_library_options(show)
    show.add_argument("kernel_id")
    show.set_defaults(handler=_kernel_show)

    train = commands.add_parser(
        "train", help="train (and grow) a model from a run config; writes runs/<run-id>/"
    )
    train.add_argument("--config", default=None, help="a run config, e.g. configs/digits.yaml")
    train.add_argument("--resume", default=None, help="continue the run folder runs/<run-id>")
    train.add_argument(
        "--stop-after-epoch", type=int, default=None, help="stop after this epoch's checkpoint"
    )
    train.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="train on N ranks under torch.distributed (DDP on CPU via gloo), growing in lockstep",
    )
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=2")
    train.set_defaults(handler=_train)

    report = commands.add_parser("report", help="regenerate a run's report.md and plots")
    report.add_argument("run", help="the run folder, runs/<run-id>")
    report.add_argument("--compare", action="append", default=[], help="another run folder")
    report.set_defaults(handler=_report)

    runs = commands.add_parser("runs", help="list the runs in a folder")
    runs.add_argument("--dir", default="runs", help="folder of run folders (default runs)")
    runs.set_defaults(handler=_runs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``esper`` command."""
    import esper

    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    esper.configure_logging(args.log_level.upper())
    try:
        return int(args.handler(args))
    except EsperError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
