"""Health collection: per-layer smoothed health, anomaly flags and alerts from Oona telemetry.

A :class:`HealthCollector` consumes the :class:`~esper.contracts.HealthSignalBatch` messages a
training run publishes on ``telemetry.health`` (any bus backend, as a member of a consumer group;
each message is acknowledged once processed) and keeps, per layer:

- an exponential moving average of output mean, output std, dead fraction and log gradient norm
  (``ema = (1 - smoothing) * ema + smoothing * value``; the first value initialises it);
- a bounded window of the raw log gradient norms and log output stds;
- the z-score of the newest value against the window *before* it (``(x - mean) / max(std,
  min_std)``, 0 until the window holds ``min_window`` values). A layer is **anomalous** when either
  z-score exceeds ``zscore_threshold`` in magnitude, a seed's kernel produced non-finite output, or
  the layer itself reported a non-finite statistic.

A non-finite statistic (a diverged layer's NaN output mean, an infinite gradient norm; the
contract lets these measurements through) or an impossible one (a negative gradient norm) never
enters an average or a window: it is skipped, counted (``nonfinite_values``) and logged when the
layer starts reporting such values, and the layer is flagged anomalous instead. Averages, windows
and z-scores therefore stay finite whatever arrives, and so does every summary a policy sees.

It produces one :class:`~esper.tamiyo.graph.LayerHealthSummary` per layer, anomalous layers first
(most severe first). Anomalies also raise **alerts** (:meth:`HealthCollector.take_alerts`) that let
a controller decide ahead of its schedule; each layer raises at most one alert per
``alert_cooldown_steps`` steps, so one noisy layer cannot flood decisions.

It runs on a background thread polling every 50 ms (:meth:`start`), or synchronously through
:meth:`poll_once` / :meth:`ingest` for deterministic use. Its state is plain JSON
(:meth:`state_dict`).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from esper.contracts import HealthSignal, HealthSignalBatch, SeedState, Topic
from esper.errors import ConfigurationError
from esper.oona import BusUnavailableError, Delivery, GroupStart, MessageBus, Subscription
from esper.oona.consuming import Acknowledger, handle_each
from esper.tamiyo.graph import LayerHealthSummary

logger = logging.getLogger(__name__)

_EPS = 1e-12


@dataclass
class _LayerHealth:
    """Everything the collector remembers about one layer."""

    ema: dict[str, float] = field(default_factory=dict)
    grad_window: deque[float] = field(default_factory=deque)
    std_window: deque[float] = field(default_factory=deque)
    grad_zscore: float = 0.0
    std_zscore: float = 0.0
    nonfinite: bool = False
    anomalous: bool = False
    severity: float = 0.0
    last_step: int = -1
    last_alert_step: int | None = None
    seed_states: tuple[SeedState, ...] = ()
    skipped: tuple[str, ...] = ()
    """Statistics of the newest signal that were not finite (or impossible) and were skipped."""


class HealthCollector:
    """Smoothed per-layer health of one training run, fed from the bus or directly.

    Args:
        bus: where ``telemetry.health`` is consumed from; ``None`` for :meth:`ingest` only.
        run_id: only batches of this run are used (``None``: every run's).
        group: consumer group on ``telemetry.health``.
        consumer: this consumer's name in the group (default ``"<group>-0"``).
        start: where a new consumer group starts reading.
        smoothing: EMA weight of the newest value, in (0, 1].
        window: raw values kept per layer for z-scores.
        min_window: values needed in the window before z-scores are computed.
        zscore_threshold: ``|z|`` above this flags the layer anomalous.
        min_std: floor of the window's standard deviation in z-scores (log units).
        alert_cooldown_steps: a layer raises at most one alert per this many steps.
        interval_s: polling period of the background thread.
        max_batches: batches handled per poll at most.
        claim_idle_ms: on its first poll the collector takes over the group's messages left
            unacknowledged this long (by a crashed consumer, e.g. its own previous process).

    Example::

        collector = HealthCollector(bus, run_id="run-1").start()  # polls every 50 ms
        ...
        health = collector.summaries()  # {layer: LayerHealthSummary}, anomalous first
        collector.stop()
    """

    def __init__(
        self,
        bus: MessageBus | None = None,
        *,
        run_id: str | None = None,
        group: str = "tamiyo-health",
        consumer: str | None = None,
        start: GroupStart = "earliest",
        smoothing: float = 0.3,
        window: int = 32,
        min_window: int = 5,
        zscore_threshold: float = 3.0,
        min_std: float = 0.05,
        alert_cooldown_steps: int = 50,
        interval_s: float = 0.05,
        max_batches: int = 64,
        claim_idle_ms: int = 10_000,
    ) -> None:
        if not 0.0 < smoothing <= 1.0 or window < 2 or not 2 <= min_window <= window:
            raise ConfigurationError(
                f"invalid health collector settings: smoothing={smoothing} (expected in (0, 1]), "
                f"window={window} (>= 2), min_window={min_window} (in 2..window)"
            )
        if zscore_threshold <= 0 or min_std <= 0 or alert_cooldown_steps < 0 or interval_s <= 0:
            raise ConfigurationError(
                f"invalid health collector settings: zscore_threshold={zscore_threshold}, "
                f"min_std={min_std}, interval_s={interval_s} (all > 0), "
                f"alert_cooldown_steps={alert_cooldown_steps} (>= 0)"
            )
        self.run_id = run_id
        self.smoothing = smoothing
        self.window = window
        self.min_window = min_window
        self.zscore_threshold = zscore_threshold
        self.min_std = min_std
        self.alert_cooldown_steps = alert_cooldown_steps
        self.interval_s = interval_s
        self.max_batches = max_batches
        self.claim_idle_ms = claim_idle_ms
        self.counters: Counter[str] = Counter()
        """``batches``, ``signals``, ``other_run``, ``stale`` (older than what a layer has seen),
        ``undecodable``, ``rejected`` (decoded, but ingesting raised), ``nonfinite_values``
        (statistics skipped), ``bus_errors``, ``alerts``."""
        self.latest_step: int | None = None
        """Step of the newest batch ingested (``None`` before the first)."""
        self._layers: dict[str, _LayerHealth] = {}
        self._alerts: dict[str, float] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._subscription: Subscription | None = None
        self._acks: Acknowledger | None = None
        if bus is not None:
            self._subscription = bus.subscribe(
                Topic.TELEMETRY_HEALTH, group, consumer or f"{group}-0", start=start
            )
            self._acks = Acknowledger(self._subscription)
        self._claimed = False

    # -- consuming -----------------------------------------------------------------------------

    def poll_once(self, block_ms: int = 0) -> int:
        """Receive, ingest and acknowledge waiting batches; return how many were handled.

        The first call also takes over this group's messages left unacknowledged for
        ``claim_idle_ms`` (a crashed consumer's). Each message is handled on its own: one that is
        not a valid :class:`HealthSignalBatch` (``undecodable``) or that cannot be ingested
        (``rejected``) is logged and acknowledged with the others, so it neither blocks the group
        nor costs the valid messages of its batch.

        Raises:
            BusUnavailableError: the bus cannot be reached (the background thread retries;
                acknowledgements not sent are kept and sent by the next call).
        """
        if self._subscription is None or self._acks is None:
            return 0
        deliveries: list[Delivery] = []
        if not self._claimed:
            deliveries += self._subscription.claim_stale(
                self.claim_idle_ms, max_messages=self.max_batches
            )
            self._claimed = True
        deliveries += self._subscription.poll(self.max_batches, block_ms=block_ms)
        handle_each(
            deliveries,
            lambda delivery: self.ingest(delivery.decode(HealthSignalBatch)),
            consumer=f"health collector {self._subscription.group}",
            counters=self.counters,
        )
        self._acks.ack(deliveries)
        return len(deliveries)

    def ingest(self, batch: HealthSignalBatch | Sequence[HealthSignal]) -> None:
        """Update the layers' health with one telemetry flush (a batch, or a list of signals).

        Signals of a step a layer has already seen (redeliveries, reordering) are ignored.
        """
        if isinstance(batch, HealthSignalBatch):
            if self.run_id is not None and batch.run_id != self.run_id:
                self.counters["other_run"] += 1
                return
            signals: Sequence[HealthSignal] = batch.signals
            step = batch.step
        else:
            signals = batch
            step = max((signal.step for signal in signals), default=0)
        with self._lock:
            self.counters["batches"] += 1
            for signal in signals:
                self._update(signal)
            self.latest_step = step if self.latest_step is None else max(self.latest_step, step)

    def _update(self, signal: HealthSignal) -> None:
        layer = self._layers.setdefault(signal.layer_name, _LayerHealth())
        if signal.step <= layer.last_step:
            self.counters["stale"] += 1
            return
        self.counters["signals"] += 1
        layer.last_step = signal.step
        layer.seed_states = tuple(seed.state for seed in signal.seeds)
        layer.nonfinite = any(seed.nonfinite_output for seed in signal.seeds)
        layer.grad_zscore = layer.std_zscore = 0.0
        skipped = [  # a seed's alpha or contribution is not averaged, but flags the layer
            (f"seeds[{seed.seed_idx}].{name}", getattr(seed, name))
            for seed in signal.seeds
            for name in ("alpha", "contribution_rms")
            if not math.isfinite(getattr(seed, name))
        ]
        if signal.samples > 0:
            for name in ("output_mean", "output_std", "dead_fraction"):
                value = getattr(signal, name)
                if math.isfinite(value):
                    self._smooth(layer, name, value)
                else:
                    skipped.append((name, value))
            if math.isfinite(signal.output_std):
                log_std = math.log(signal.output_std + _EPS)
                layer.std_zscore = self._zscore(layer.std_window, log_std)
                _push(layer.std_window, log_std, self.window)
        grad = signal.grad_norm
        if grad is not None and math.isfinite(grad) and grad >= 0:
            log_grad = math.log(grad + _EPS)
            self._smooth(layer, "log_grad_norm", log_grad)
            layer.grad_zscore = self._zscore(layer.grad_window, log_grad)
            _push(layer.grad_window, log_grad, self.window)
        elif grad is not None:
            skipped.append(("grad_norm", grad))
        self._note_skipped(layer, signal, skipped)
        z = max(abs(layer.grad_zscore), abs(layer.std_zscore))
        layer.severity = math.inf if layer.nonfinite else z
        layer.anomalous = layer.nonfinite or z > self.zscore_threshold
        if layer.anomalous and self._may_alert(layer, signal.step):
            layer.last_alert_step = signal.step
            self._alerts[signal.layer_name] = layer.severity
            self.counters["alerts"] += 1
            logger.info(
                "layer %r anomalous at step %d (grad z %.2f, std z %.2f, non-finite %s)",
                signal.layer_name,
                signal.step,
                layer.grad_zscore,
                layer.std_zscore,
                layer.nonfinite,
            )

    def _note_skipped(
        self, layer: _LayerHealth, signal: HealthSignal, skipped: list[tuple[str, float]]
    ) -> None:
        """Flag a layer whose signal carried unusable statistics; log when that starts."""
        if skipped:
            layer.nonfinite = True
            self.counters["nonfinite_values"] += len(skipped)
            if not layer.skipped:
                logger.warning(
                    "layer %r reported unusable statistics at step %d (%s); they are skipped and "
                    "the layer is flagged anomalous",
                    signal.layer_name,
                    signal.step,
                    ", ".join(f"{name}={value}" for name, value in skipped),
                )
        elif layer.skipped:
            logger.info(
                "layer %r reports usable statistics again at step %d",
                signal.layer_name,
                signal.step,
            )
        layer.skipped = tuple(name for name, _ in skipped)

    def _smooth(self, layer: _LayerHealth, name: str, value: float) -> None:
        previous = layer.ema.get(name)
        layer.ema[name] = (
            value
            if previous is None
            else (1.0 - self.smoothing) * previous + self.smoothing * value
        )

    def _zscore(self, window: deque[float], value: float) -> float:
        if len(window) < self.min_window:
            return 0.0
        mean = sum(window) / len(window)
        std = math.sqrt(sum((v - mean) ** 2 for v in window) / len(window))
        return (value - mean) / max(std, self.min_std)

    def _may_alert(self, layer: _LayerHealth, step: int) -> bool:
        last = layer.last_alert_step
        return last is None or step - last >= self.alert_cooldown_steps

    # -- what the controller reads -------------------------------------------------------------

    def summaries(self) -> dict[str, LayerHealthSummary]:
        """Smoothed health per layer: anomalous layers first (most severe first), then the rest
        in the order they were first seen."""
        with self._lock:
            items = list(self._layers.items())
            order = sorted(
                range(len(items)),
                key=lambda i: (not items[i][1].anomalous, -items[i][1].severity, i),
            )
            return {items[i][0]: self._summary(items[i][1]) for i in order}

    @staticmethod
    def _summary(layer: _LayerHealth) -> LayerHealthSummary:
        return LayerHealthSummary(
            output_mean=layer.ema.get("output_mean", 0.0),
            output_std=layer.ema.get("output_std", 0.0),
            dead_fraction=layer.ema.get("dead_fraction", 0.0),
            log_grad_norm=layer.ema.get("log_grad_norm", 0.0),
            grad_norm_zscore=layer.grad_zscore,
            anomaly=1.0 if layer.anomalous else 0.0,
        )

    def seed_states(self) -> dict[str, tuple[SeedState, ...]]:
        """Every seed's state per layer, as of the newest signal of that layer."""
        with self._lock:
            return {name: layer.seed_states for name, layer in self._layers.items()}

    def layer_steps(self) -> dict[str, int]:
        """The step of each layer's newest signal."""
        with self._lock:
            return {name: layer.last_step for name, layer in self._layers.items()}

    def take_alerts(self) -> list[str]:
        """Layers that turned anomalous since the last call (throttled), most severe first."""
        with self._lock:
            alerts = sorted(self._alerts, key=lambda name: -self._alerts[name])
            self._alerts.clear()
            return alerts

    def anomalous_layers(self) -> list[str]:
        """Layers whose newest signal was anomalous, most severe first."""
        with self._lock:
            flagged = [(name, h.severity) for name, h in self._layers.items() if h.anomalous]
        return [name for name, _ in sorted(flagged, key=lambda item: -item[1])]

    # -- background thread ---------------------------------------------------------------------

    def start(self) -> HealthCollector:
        """Poll the bus on a daemon thread every ``interval_s`` until :meth:`stop`."""
        if self._subscription is None:
            raise ConfigurationError(
                "this HealthCollector has no bus to poll; pass bus= or feed it with ingest()"
            )
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="tamiyo-health", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                while self.poll_once() >= self.max_batches and not self._stop.is_set():
                    pass  # a backlog: keep draining before sleeping
            except BusUnavailableError as exc:
                self.counters["bus_errors"] += 1
                logger.warning("health collector: bus unavailable (%s); retrying", exc)
                self._stop.wait(max(self.interval_s, 0.5))
            except Exception:  # never let the collector thread die silently
                self.counters["bus_errors"] += 1
                logger.exception("health collector: unexpected error; retrying")
                self._stop.wait(max(self.interval_s, 0.5))
            self._stop.wait(self.interval_s)

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the background thread (the bus is not closed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything the collector remembers, as plain JSON-able data."""
        with self._lock:
            return {
                "latest_step": self.latest_step,
                "counters": dict(self.counters),
                "alerts": dict(self._alerts),
                "layers": {
                    name: {
                        "ema": dict(h.ema),
                        "grad_window": list(h.grad_window),
                        "std_window": list(h.std_window),
                        "grad_zscore": h.grad_zscore,
                        "std_zscore": h.std_zscore,
                        "nonfinite": h.nonfinite,
                        "anomalous": h.anomalous,
                        "severity": _json_float(h.severity),
                        "last_step": h.last_step,
                        "last_alert_step": h.last_alert_step,
                        "seed_states": [int(s) for s in h.seed_states],
                    }
                    for name, h in self._layers.items()
                },
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        with self._lock:
            self.latest_step = state["latest_step"]
            self.counters = Counter(state["counters"])
            self._alerts = {str(k): _from_json_float(v) for k, v in state["alerts"].items()}
            self._layers = {
                name: _LayerHealth(
                    ema=_finite_values(h["ema"]),  # a checkpoint written before values were
                    grad_window=deque(_finite(h["grad_window"])),  # checked may hold NaN
                    std_window=deque(_finite(h["std_window"])),
                    grad_zscore=_finite_or_zero(h["grad_zscore"]),
                    std_zscore=_finite_or_zero(h["std_zscore"]),
                    nonfinite=bool(h["nonfinite"]),
                    anomalous=bool(h["anomalous"]),
                    severity=_from_json_float(h["severity"]),
                    last_step=int(h["last_step"]),
                    last_alert_step=h["last_alert_step"],
                    seed_states=tuple(SeedState(s) for s in h["seed_states"]),
                )
                for name, h in state["layers"].items()
            }

    @property
    def layer_names(self) -> list[str]:
        """Layers seen so far, in the order they were first seen."""
        with self._lock:
            return list(self._layers)


def _push(window: deque[float], value: float, size: int) -> None:
    window.append(value)
    while len(window) > size:
        window.popleft()


def _finite(values: list[float]) -> list[float]:
    return [float(v) for v in values if math.isfinite(float(v))]


def _finite_values(values: dict[str, float]) -> dict[str, float]:
    return {str(k): float(v) for k, v in values.items() if math.isfinite(float(v))}


def _finite_or_zero(value: float) -> float:
    return float(value) if math.isfinite(float(value)) else 0.0


def _json_float(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


def _from_json_float(value: float | str) -> float:
    return math.inf if value == "inf" else float(value)
