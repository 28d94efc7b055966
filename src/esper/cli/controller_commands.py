"""``esper tamiyo serve``: the growth controller as its own process, deciding from the bus."""

from __future__ import annotations

import argparse

from esper.cli.output import print_line
from esper.cli.parsing import (
    OneLineArgumentParser,
    integer,
    positive_int,
    positive_number,
    run_id,
    setting,
)
from esper.contracts.safety import SafetyConfig


def add_parsers(commands: argparse._SubParsersAction[OneLineArgumentParser]) -> None:
    """Add ``tamiyo serve`` to the ``esper`` sub-commands."""
    tamiyo = commands.add_parser("tamiyo", help="the growth controller").add_subparsers(
        dest="tamiyo_command", required=True
    )
    serve = tamiyo.add_parser(
        "serve", help="decide growth for a training run from its telemetry on the bus"
    )
    serve.add_argument("--bus", required=True, help="redis://host:port/db?stream_prefix=…")
    serve.add_argument(
        "--policy",
        default="bottleneck",
        help="random, round_robin, bottleneck, pretrained, or a policy file",
    )
    serve.add_argument("--run-id", type=run_id, required=True, help="the training run to serve")
    serve.add_argument("--seed", type=integer(0), default=0, help="seed of a sampling policy")
    serve.add_argument("--explore", action="store_true", help="sample actions")
    serve.add_argument("--total-steps", type=positive_int, default=None)
    serve.add_argument("--decide-every", type=positive_int, default=1, help="telemetry steps")
    serve.add_argument("--cycle-ms", type=positive_number, default=100.0)
    for flag, help_text in (  # SafetyConfig's fields: their ranges and defaults (shown) are its
        ("cooldown-steps", "steps a layer waits after an adaptation"),
        ("window-steps", "steps of the rate limit's window"),
        ("max-adaptations", "adaptations per window"),
        ("min-confidence", "0 to 1"),
        ("max-uncertainty", "refuse more uncertain proposals (default: no limit)"),
        ("max-parameter-fraction", "grafted / base parameters"),
    ):
        field = flag.replace("-", "_")
        default = SafetyConfig.model_fields[field].default
        shown = f" (default {default})" if default is not None else ""
        serve.add_argument(
            f"--{flag}", type=setting(SafetyConfig, field), default=None, help=help_text + shown
        )
    serve.add_argument("--duration", type=positive_number, default=None, help="seconds, then stop")
    serve.set_defaults(handler=_tamiyo_serve)


def _tamiyo_serve(args: argparse.Namespace) -> int:
    import signal

    from esper.oona import open_bus
    from esper.tamiyo import SafetyGates, TamiyoController, load_policy
    from esper.tolaria.growth import policy_path

    safety = SafetyGates(SafetyConfig.from_options(vars(args)))  # flags named like its fields
    policy = load_policy(policy_path(args.policy), seed=args.seed)
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
        group=f"tamiyo-{args.run_id}",  # one run's messages are never another controller's
    )

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # stop cleanly under a process manager too
    print_line(
        f"Tamiyo controller for run {args.run_id!r} with policy {policy.name!r} on {args.bus} "
        "(Ctrl-C stops it)"
    )
    try:
        controller.serve(duration_s=args.duration)
    except KeyboardInterrupt:
        print_line("stopped")  # Ctrl-C or SIGTERM: report what was decided
    finally:
        bus.close()
    print_line(f"decided {controller.adaptations} germinations: {dict(controller.counters)}")
    return 0
