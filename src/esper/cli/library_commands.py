"""``esper urza serve``, ``esper tezzeret worker``, ``esper blueprint …`` and ``esper kernel …``:
the artifact library, its compile workers, and what it holds.

Every command opens the library its options (or the ``ESPER_URZA_*`` environment) point at: the
service (``--urza``), storage URLs, or the embedded library in ``--run-dir``. The commands that
only read (``blueprint list``, ``kernel list``, ``kernel show``) never create an embedded
library: where there is none they say so.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from rich.table import Table

from esper.cli.output import console, print_line
from esper.cli.parsing import (
    OneLineArgumentParser,
    port_number,
    positive_int,
    positive_number,
    setting,
)
from esper.contracts import BlueprintSpec, BlueprintStatus
from esper.errors import ConfigurationError, KernelNotFoundError
from esper.tolaria.assignments import parse_assignment
from esper.urza.settings import ServiceLimits

if TYPE_CHECKING:
    from esper.urza import ArtifactLibrary

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
"""uvicorn's log levels."""


def add_parsers(commands: argparse._SubParsersAction[OneLineArgumentParser]) -> None:
    """Add ``urza``, ``tezzeret``, ``blueprint`` and ``kernel`` to the ``esper`` sub-commands."""
    urza = commands.add_parser("urza", help="the artifact library").add_subparsers(
        dest="urza_command", required=True
    )
    serve = urza.add_parser("serve", help="serve the library over HTTP (FastAPI + uvicorn)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=port_number, default=8765, help="TCP port (1-65535)")
    serve.add_argument("--metadata-url", default=None, help="sqlite:///path or postgresql://...")
    serve.add_argument("--blob-url", default=None, help="file:///path or s3://bucket/prefix")
    serve.add_argument("--run-dir", default=None, help="folder of the embedded defaults")
    for flag, what in (
        ("artifact-bytes", "bytes of one kernel upload (default 512 MiB)"),
        ("concurrent-uploads", "uploads at once; more are told to retry (default 8)"),
        ("kernel-parameters", "parameters of a kernel a compile job may ask for"),
    ):
        serve.add_argument(  # the type and range of ServiceLimits' field (checked once)
            f"--max-{flag}",
            type=setting(ServiceLimits, f"max_{flag.replace('-', '_')}"),
            default=None,
            help=f"most {what}",
        )
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
        type=positive_int,
        default=None,
        help="exit when this process is no longer the parent",
    )
    worker.add_argument("--poll-interval", type=positive_number, default=0.2, help="seconds")
    worker.add_argument(
        "--lease-seconds",
        type=positive_number,
        default=600.0,
        help="a claimed job may be reclaimed by another worker after this long",
    )
    worker.add_argument("--max-jobs", type=positive_int, default=None)
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
    show.add_argument("kernel_id", help="a kernel id, a unique id prefix or an alias")
    show.set_defaults(handler=_kernel_show)
    tag = kernel.add_parser("tag", help="name a kernel (an alias, like a git tag)")
    _add_library_options(tag)
    tag.add_argument("name", help="the alias, e.g. kernel-001 (not all hex digits)")
    tag.add_argument("kernel", help="a kernel id, a unique id prefix or another alias")
    tag.add_argument(
        "--move", action="store_true", help="re-point the alias if it names another kernel"
    )
    tag.set_defaults(handler=_kernel_tag)
    aliases = kernel.add_parser("aliases", help="list kernel aliases")
    _add_library_options(aliases)
    aliases.add_argument("--kernel", default=None, help="only the aliases of this kernel")
    aliases.set_defaults(handler=_kernel_aliases)


def _add_library_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--urza",
        default=None,
        help="the Urza service, http(s)://host:port (token from ESPER_URZA_TOKEN)",
    )
    parser.add_argument("--metadata-url", default=None, help="sqlite:///path or postgresql://...")
    parser.add_argument("--blob-url", default=None, help="file:///path or s3://bucket/prefix")
    parser.add_argument("--run-dir", default=None, help="folder of the embedded library")


def _open_library(args: argparse.Namespace, *, create: bool = True) -> ArtifactLibrary:
    """The library the options name; with ``create=False`` an embedded (SQLite) library must
    exist already.

    Raises:
        ConfigurationError: ``create=False`` and there is no library where the options point.
    """
    from esper.urza import open_library

    database = None if create else _embedded_database(args)
    if database is not None and not database.is_file():
        raise ConfigurationError(
            f"there is no Urza library at {database.parent} (no {database.name}; nothing was "
            "compiled there): point at one with --run-dir, --metadata-url/--blob-url or --urza"
        )
    return open_library(
        args.urza, metadata_url=args.metadata_url, blob_url=args.blob_url, run_dir=args.run_dir
    )


def _embedded_database(args: argparse.Namespace) -> Path | None:
    """The SQLite file the options open (``None`` for a service or a database server)."""
    from esper.urza import UrzaSettings

    settings = UrzaSettings.from_env()
    if args.urza is not None or (
        args.metadata_url is None and args.blob_url is None and settings.url is not None
    ):
        return None
    metadata_url = args.metadata_url or settings.metadata_url
    if metadata_url is None:
        folder = Path(args.run_dir) if args.run_dir is not None else settings.run_dir
        return folder.expanduser() / "urza.sqlite3"
    if urlsplit(metadata_url).scheme.split("+")[0] != "sqlite" or ":///" not in metadata_url:
        return None
    path = metadata_url.split(":///", 1)[1].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _urza_serve(args: argparse.Namespace) -> int:
    from esper.tezzeret import RegistryCatalog
    from esper.urza import UrzaSettings, serve

    settings = UrzaSettings.from_env()
    if settings.token is None:
        raise ConfigurationError(
            "the Urza service needs a bearer token: set ESPER_URZA_TOKEN to a secret value "
            "(clients send the same value)"
        )
    settings = settings.with_options(vars(args))  # the flags named like its fields
    print_line(f"Urza service on http://{args.host}:{args.port} (Ctrl-C stops it)")
    serve(
        host=args.host,
        port=args.port,
        settings=settings,
        catalog=RegistryCatalog(),  # POST /blueprints and compile jobs checked against it
        log_level=args.log_level.lower(),
    )
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
    print_line(f"Tezzeret worker {worker.worker_id} compiling jobs (Ctrl-C stops it)")
    try:
        handled = worker.run(max_jobs=args.max_jobs, stop_when_idle=args.stop_when_idle)
    except KeyboardInterrupt:
        handled = sum(worker.counters.values())
    finally:
        library.close()
        if bus is not None:
            bus.close()
    print_line(f"handled {handled} jobs: {dict(worker.counters)}")
    return 0


def _blueprint_submit(args: argparse.Namespace) -> int:
    from esper.blueprints import parse_params

    params = dict(
        parse_assignment(text, what="--param", example="--param rank=8") for text in args.param
    )
    spec = BlueprintSpec(family=args.family, params=params)
    parse_params(spec)  # unknown family or bad parameters: fail here, before storing anything
    library = _open_library(args)
    try:
        record = library.submit_blueprint(spec, name=args.name)
    finally:
        library.close()
    print_line(f"{record.blueprint_id}  {record.status.value}  {spec.canonical_json()}")
    return 0


def _blueprint_list(args: argparse.Namespace) -> int:
    library = _open_library(args, create=False)
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
    library = _open_library(args, create=False)
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
    library = _open_library(args, create=False)
    try:
        metadata = library.get_kernel_metadata(library.resolve_kernel(args.kernel_id))
    finally:
        library.close()
    console.print_json(metadata.model_dump_json())
    return 0


def _kernel_tag(args: argparse.Namespace) -> int:
    library = _open_library(args, create=False)
    try:
        kernel_id = library.resolve_kernel(args.kernel)
        previous = _alias_target(library, args.name)
        alias = library.tag_kernel(args.name, kernel_id, move=args.move)
    finally:
        library.close()
    moved = previous is not None and previous != alias.kernel_id
    change = f" (moved from {previous})" if moved else ""
    print_line(f"{alias.name} -> {alias.kernel_id}{change}")
    return 0


def _alias_target(library: ArtifactLibrary, name: str) -> str | None:
    """The kernel the alias ``name`` names now, or ``None`` (also for a name that is no alias)."""
    from esper.contracts.kernel_aliases import alias_problem

    if alias_problem(name) is not None:
        return None  # tag_kernel says why
    try:
        return library.resolve_kernel(name)
    except KernelNotFoundError:
        return None


def _kernel_aliases(args: argparse.Namespace) -> int:
    library = _open_library(args, create=False)
    try:
        kernel_id = library.resolve_kernel(args.kernel) if args.kernel else None
        found = library.list_aliases(kernel_id=kernel_id)
    finally:
        library.close()
    table = Table(title=f"kernel aliases ({len(found)})")
    for column in ("alias", "kernel id"):
        table.add_column(column)
    for alias in found:
        table.add_row(alias.name, alias.kernel_id)
    console.print(table)
    return 0
