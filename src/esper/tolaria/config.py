"""Run configuration: the typed form of a ``configs/*.yaml`` file plus ``key=value`` overrides.

A config file has one section per concern (``run``, ``data``, ``host``, ``seeds``, ``train``,
``growth``, ``urza``); every section is a strict Pydantic model, so a misspelt key fails with a
message naming it, the section's valid keys and the closest match::

    config = load_config("configs/digits.yaml", overrides=["train.epochs=2", "run.dir=/tmp/x"])

Override values are parsed as YAML (``train.lr=3e-3``, ``host.hidden=[16,16]``,
``growth.enabled=false``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator

from esper.contracts.safety import (
    AdaptationCount,
    Confidence,
    CooldownSteps,
    LossSpikeTolerance,
    ParameterFraction,
)
from esper.errors import ConfigurationError
from esper.tolaria.assignments import parse_assignment
from esper.tolaria.bounded_input import clip, excerpt, load_yaml, read_config_text
from esper.tolaria.config_renames import rename_old_keys
from esper.tolaria.operator_config import OperatorsSection, Section

MAX_LISTED_PROBLEMS = 10
"""Problems of an invalid config listed in its error (then a count of the others)."""

RUN_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$"
"""A run id (and a run name): a folder name that is not hidden, not ``.``/``..``, not an option
(no leading ``-``), at most 100 characters, of letters, digits, ``_``, ``.`` and ``-``."""


class RunSection(Section):
    """Where a run lives and what makes it reproducible."""

    name: str = Field(default="run", max_length=60)
    """Prefix of the run id (``<name>-<timestamp>``)."""
    id: str | None = None
    """Fixed run id (default: generated from ``name`` and the start time)."""
    dir: Path = Path("runs")
    """Folder holding run folders (``<dir>/<run-id>/``)."""
    seed: int = 0
    """Seeds model initialisation, data order and the policy."""
    threads: int = Field(default=1, ge=1)
    """``torch.set_num_threads`` for the run (1 keeps runs bit-reproducible and shares CPUs)."""

    @field_validator("name", "id")
    @classmethod
    def _folder_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(RUN_ID_PATTERN, value):
            raise ValueError(
                "a run name or id is a folder name: up to 100 letters, digits, '_', '.' or '-', "
                "not starting with '.' or '-' (so never '.' or '..')"
            )
        return value


class DigitsData(Section):
    """scikit-learn digits: 1797 8x8 images, 10 classes."""

    name: Literal["digits"] = "digits"
    batch_size: int = Field(default=64, ge=1)
    validation_fraction: float = Field(default=0.1, ge=0, lt=1)
    """Training examples held out for growth decisions' validation (never the test split)."""
    test_fraction: float = Field(default=0.2, gt=0, lt=1)


class Mnist1dData(Section):
    """MNIST-1D, generated offline: length-40 signals, 10 classes."""

    name: Literal["mnist1d"] = "mnist1d"
    batch_size: int = Field(default=64, ge=1)
    validation_fraction: float = Field(default=0.1, ge=0, lt=1)
    num_samples: int = Field(default=5000, ge=100)
    data_seed: int = 42


class RegressionData(Section):
    """Synthetic teacher–student regression."""

    name: Literal["regression"] = "regression"
    batch_size: int = Field(default=64, ge=1)
    validation_fraction: float = Field(default=0.1, ge=0, lt=1)
    num_samples: int = Field(default=2000, ge=10)
    in_features: int = Field(default=16, ge=1)
    out_features: int = Field(default=1, ge=1)
    teacher_hidden: int = Field(default=32, ge=1)
    noise: float = Field(default=0.05, ge=0)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)


DataSection = Annotated[DigitsData | Mnist1dData | RegressionData, Field(discriminator="name")]


class MlpHost(Section):
    """A multilayer perceptron (``fc1 … out``)."""

    kind: Literal["mlp"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [32])
    activation: Literal["relu", "gelu", "tanh", "identity"] = "relu"


class CnnHost(Section):
    """Convolutions (``conv1 …``), global average pooling and a Linear ``head``."""

    kind: Literal["cnn"] = "cnn"
    channels: list[int] = Field(default_factory=lambda: [16, 16])
    kernel_size: int = Field(default=3, ge=1)
    activation: Literal["relu", "gelu", "tanh", "identity"] = "relu"


class TransformerHost(Section):
    """Patch tokens, pre-norm transformer blocks (``blocks.<i>.{attn,ff1,ff2,ln1,ln2}``), a head."""

    kind: Literal["transformer"] = "transformer"
    patch: int = Field(default=8, ge=1)
    d_model: int = Field(default=32, ge=1)
    heads: int = Field(default=4, ge=1)
    depth: int = Field(default=2, ge=1)
    ff: int = Field(default=64, ge=1)


HostSection = Annotated[MlpHost | CnnHost | TransformerHost, Field(discriminator="kind")]


class SeedsSection(Section):
    """Which layers carry seeds and how grafts blend in (arguments of :func:`esper.wrap`)."""

    target: list[str] | None = None
    """Layer names, ``.suffix`` names or layer kinds (``kind:rms_norm``, ``kind:hf_conv1d``, any
    registered kind); ``None``: every Linear/Conv layer of the host."""
    per_layer: int = Field(default=2, ge=1)
    blend_steps: int = Field(default=30, ge=1)
    health_every: int = Field(default=10, ge=1)


class TrainSection(Section):
    """The optimisation."""

    epochs: int = Field(default=20, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-2, gt=0)
    kernel_lr: float | None = Field(default=None, gt=0)
    """Learning rate of grafted kernels' parameter groups (default: ``lr``)."""
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0)
    """SGD only."""
    log_every: int = Field(default=1, ge=1)
    """Write a step record to ``metrics.jsonl`` every this many steps."""
    checkpoint: bool = True
    """Write ``checkpoints/epoch-<k>`` after every epoch (needed by ``--resume``)."""


class GrowthSection(Section):
    """When and how Tamiyo grows the model.

    Decisions are taken synchronously at fixed step intervals and a germinated kernel is grafted
    exactly ``graft_delay`` steps after its decision (the loop waits at that boundary only if the
    background compile has not finished by then), so growth events — and resumed runs — are
    deterministic in step. Every compatible catalog blueprint is precompiled for every seeded
    layer before training starts (``precompile``, ``warm_start``), so germinations find their
    kernels compiled.

    The safety keys (``max_adaptations``, ``cooldown_steps``, ``max_parameter_fraction``,
    ``min_confidence``, ``loss_spike_tolerance``) are fields of
    :class:`~esper.contracts.safety.SafetyConfig`, with its names and ranges (only the defaults
    differ; the rate limit's window is the whole run). Their old names
    (:data:`~esper.tolaria.config_renames.RENAMED_KEYS`)
    still load, with a warning.
    """

    enabled: bool = True
    operators: OperatorsSection = Field(default_factory=OperatorsSection)
    """Which operators decisions may use (residual kernels; widen and deepen sizes)."""
    policy: str = "bottleneck"
    """``bottleneck``, ``random``, ``round_robin`` (baselines), ``pretrained`` (the GNN policy
    shipped with Esper), or the path of a GNN policy saved by ``GNNPolicy.save``."""
    bus: str = "memory://"
    """Where decisions, refusals and rewards are published for observers (``redis://…``)."""
    controller: Literal["inline", "service"] = "inline"
    """Who decides. ``inline``: the run's own Tamiyo, synchronously every ``decide_every`` steps
    (deterministic; a resumed run repeats the uninterrupted one). ``service``: a controller in
    another process, ``esper tamiyo serve --bus <growth.bus> --run-id <run id>``, deciding from
    the telemetry the run publishes on ``bus`` (a ``redis://`` URL); its decisions are applied
    at the step boundary after they arrive (growth then depends on timing; ``policy`` and
    ``decide_every`` are the service's own). See :mod:`esper.tolaria.service_controller`."""

    @field_validator("controller")
    @classmethod
    def _service_needs_redis(cls, value: str, info: ValidationInfo) -> str:
        bus = info.data.get("bus")
        if (
            value == "service"
            and isinstance(bus, str)
            and not bus.startswith(("redis://", "rediss://"))
        ):
            raise ValueError(
                f"service needs growth.bus to be a redis:// URL, not {excerpt(bus, limit=40)} "
                "(its controller, esper tamiyo serve, is another process); e.g. "
                "growth.bus=redis://127.0.0.1:6379/0"
            )
        return value

    decide_every: int = Field(default=50, ge=1)
    """Steps between controller decisions."""
    telemetry_every: int = Field(default=10, ge=1)
    """Steps between telemetry flushes (health signals to Tamiyo)."""
    start_step: int = Field(default=100, ge=0)
    """No decision before this step (let the host's health settle)."""
    stop_fraction: float = Field(default=0.8, gt=0, le=1)
    """No germination after this fraction of the run's steps (leave time to train grafts)."""
    graft_delay: int | None = Field(default=10, ge=1)
    """Steps between a GERMINATE decision and its graft. The loop waits at that boundary if the
    background compile has not finished (``executor.stall_ms`` in ``run.json``). ``null``: graft
    as soon as the kernel is loaded — never waits, but growth then depends on timing and a
    resumed run is no longer exact."""
    precompile: bool = True
    """Queue a compile of every catalog blueprint for every seeded layer when the run starts."""
    warm_start: bool = True
    """Wait before step 1 until the queued compiles (or one warm-up compile) are done: the
    compiler's cold start (``torch.export``'s first use, a worker process's start-up) is then paid
    before training instead of at the first germination's due boundary. ``false``: they compile
    in the background during the first steps."""
    evaluation_steps: int = Field(default=100, ge=1)
    """Steps after a seed turns ACTIVE before it is evaluated (reward; fossilize or cull)."""
    max_adaptations: AdaptationCount = 4
    """Germinations allowed in the run (formerly ``max_seeds``)."""
    cooldown_steps: CooldownSteps = 100
    """Steps a layer waits after a germination before it may grow again."""
    max_parameter_fraction: ParameterFraction = 1.0
    """Grafted parameters may not exceed this fraction of the base parameters (formerly
    ``max_parameter_ratio``)."""
    min_confidence: Confidence = 0.0
    """Refuse decisions the policy is less sure of."""
    loss_spike_tolerance: LossSpikeTolerance = 0.5
    """Cull a graft whose evaluation-window mean loss rises more than this fraction above the
    pre-graft mean (0.5: by half; formerly ``loss_spike_ratio``, which was 1 + this)."""


class UrzaSection(Section):
    """Where kernels are stored and compiled."""

    url: str | None = None
    """Shared Urza service (``http://host:port``); ``None``: the embedded library."""
    dir: Path | None = None
    """Folder of the embedded library (default ``<run.dir>/urza``, shared by the runs there)."""
    worker: Literal["process", "thread", "none"] = "process"
    """Who compiles: ``process``, a Tezzeret worker process started with the run (compiles never
    compete with training for the interpreter lock; its start-up, a few seconds, is waited for
    before step 1 with ``growth.warm_start``); ``thread``, a worker thread in the training process
    (ready sooner, but a compile slows the steps it overlaps); ``none``, external workers
    (``esper tezzeret worker``)."""


class RunConfig(Section):
    """A whole run: what ``esper train --config`` reads."""

    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DigitsData)
    host: HostSection = Field(default_factory=MlpHost)
    seeds: SeedsSection = Field(default_factory=SeedsSection)
    train: TrainSection = Field(default_factory=TrainSection)
    growth: GrowthSection = Field(default_factory=GrowthSection)
    urza: UrzaSection = Field(default_factory=UrzaSection)

    def to_yaml(self) -> str:
        """The resolved config as YAML (what a run folder keeps as ``config.yaml``)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# -- loading --------------------------------------------------------------------------------------


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["train.epochs=2", "host.hidden=[16, 16]"]`` -> nested dict; values parsed as YAML
    (:func:`~esper.tolaria.assignments.parse_assignment`).

    Raises:
        ConfigurationError: an override is not ``dotted.key=value``.
    """
    tree: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_assignment(
            text, what="override", example="train.epochs=2 or run.dir=/tmp/x"
        )
        parts = key.split(".")
        if not all(parts):
            raise ConfigurationError(
                f"override {excerpt(text)} has an empty part in its key; write "
                "section.key=value, e.g. train.epochs=2"
            )
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigurationError(
                    f"override {excerpt(text)} conflicts with another override"
                )
            node = child
        node[parts[-1]] = value
    return tree


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in, recursively for nested mappings."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_dict(data: Mapping[str, Any], *, source: str = "config") -> RunConfig:
    """Validate a nested dict as a :class:`RunConfig`.

    Raises:
        ConfigurationError: naming each bad key (with the section's valid keys) or bad value.
    """
    data = rename_old_keys(data, source=source)
    for section, tag, default in (("data", "name", "digits"), ("host", "kind", "mlp")):
        if isinstance(data.get(section), Mapping) and tag not in data[section]:
            data[section] = {tag: default, **data[section]}
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        problems = [_describe_error(error) for error in errors[:MAX_LISTED_PROBLEMS]]
        if len(errors) > MAX_LISTED_PROBLEMS:
            problems.append(f"… and {len(errors) - MAX_LISTED_PROBLEMS} more")
        raise ConfigurationError(
            f"invalid run config ({source}):\n  " + "\n  ".join(problems)
        ) from None


def load_config(path: str | Path | None = None, *, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config (or start from the defaults) and apply ``key=value`` overrides.

    Raises:
        ConfigurationError: the file is missing or not a YAML mapping, or a key/value is invalid.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = read_config_text(path)
        except FileNotFoundError:
            raise ConfigurationError(missing_config_message(Path(path))) from None
        loaded = load_yaml(text, source=f"config file {source}")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigurationError(
                f"config file {source} must be a mapping of sections (run:, data:, host:, …), "
                f"got a {type(loaded).__name__}"
            )
        data = rename_old_keys(loaded or {}, source=f"config file {source}")
    tree = rename_old_keys(parse_overrides(overrides), source="overrides")
    if overrides:
        source += " with overrides " + excerpt(" ".join(overrides), limit=200)
    return config_from_dict(merge(data, tree), source=source)


def preset_folders(missing: Path) -> list[Path]:
    """Where to look for the preset configs: the missing file's folder, ``./configs``, and the
    ``configs/`` of the source checkout Esper runs from (if it is one)."""
    checkout = Path(__file__).resolve().parents[3] / "configs"
    candidates = [missing.parent, Path("configs"), checkout]
    found: list[Path] = []
    for folder in candidates:
        if (
            folder.is_dir()
            and any(folder.glob("*.yaml"))
            and folder.resolve() not in {f.resolve() for f in found}
        ):
            found.append(folder)
    return found


def missing_config_message(path: Path) -> str:
    """The error for a config file that does not exist: the closest preset and all of them."""
    message = f"config file {path} does not exist"
    folders = preset_folders(path)
    if not folders:
        return message + "; the presets are in the configs/ folder of the Esper repository"
    presets = sorted(folders[0].glob("*.yaml"))
    close = difflib.get_close_matches(path.name, [p.name for p in presets], n=1)
    hint = f"; did you mean {folders[0] / close[0]}?" if close else ";"
    return f"{message}{hint} The presets: {', '.join(str(p) for p in presets)}"


def _describe_error(error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    where = ".".join(clip(str(part), limit=40) for part in _user_path(loc))
    if error["type"] == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1])[:100], valid, n=1)
        hint = f" Did you mean {'.'.join([*where.split('.')[:-1], close[0]])!r}?" if close else ""
        return f"unknown key {excerpt(where)}.{hint} Valid keys here: {', '.join(valid)}"
    if error["type"] == "union_tag_invalid":
        context = error.get("ctx", {})
        return (
            f"{where}: {excerpt(context.get('tag'))} is not one of the expected values "
            f"{context.get('expected_tags')}"
        )
    message = clip(str(error["msg"]), limit=200)
    return f"{where or 'config'}: {message} (got {excerpt(error.get('input'))})"


_UNION_TAGS = {"data", "host"}


def _user_path(loc: tuple[Any, ...]) -> list[Any]:
    """Drop the discriminator tag Pydantic inserts after a union field (``data.digits.x``)."""
    path: list[Any] = []
    skip = False
    for i, part in enumerate(loc):
        if skip:
            skip = False
            continue
        path.append(part)
        if i == 0 and part in _UNION_TAGS and len(loc) > 1:
            skip = True
    return path


def _valid_keys(loc: tuple[Any, ...]) -> list[str]:
    """The field names of the section at ``loc`` (as Pydantic reports it)."""
    model: type[BaseModel] = RunConfig
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        annotation = model.model_fields[str(part)].annotation
        members = [m for m in getattr(annotation, "__args__", (annotation,))]
        sections = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        if len(sections) > 1 and parts:  # a tagged union: the next part is the tag
            tag = parts.pop(0)
            sections = [
                m for m in sections if tag in {f.default for f in m.model_fields.values()}
            ] or sections[:1]
        if not sections:
            return []
        model = sections[0]
    return list(model.model_fields)
