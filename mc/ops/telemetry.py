"""
MegaContext telemetry: structured events from training and inference, exported as OpenTelemetry spans.

- TelemetryEvent: event_type + flat-ish attributes (scalars, short homogeneous lists, nested dicts that
  are flattened with dots) + timestamp (seconds since the epoch).
- TelemetryProvider: the protocol every backend implements: emit(event), flush(), shutdown().
- NoOpTelemetryProvider: the default when no endpoint is configured; keeps nothing.
- OpenTelemetryProvider: every event becomes one zero-length span named after the event type, its
  attributes prefixed "mc." (mc.step, mc.build_ms, ...), batched by a BatchSpanProcessor and sent over
  OTLP/HTTP (protobuf) to a collector / Tempo. It has its own TracerProvider (no global state).
- provider_from_env(service_name): MC_OTEL_ENDPOINT unset -> NoOp; set -> OpenTelemetryProvider, or a
  clear error telling you to run `./mc_setup --otel` when the OpenTelemetry packages are missing.
- SCHEMAS: event types -> fields (name -> type; the first field is required). emit_event / emit_timing /
  emit_batch_counters check every key against them, whatever the provider, so a new key cannot reach a
  dashboard without being added here and to obsidian/architecture/Telemetry.md (a test compares both).

Export failures are never silent: the exporter logs each failed batch, and provider.stats counts
exported and failed spans and keeps the last HTTP status / error (the preflight script reports them).
"""

import os
import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

MAX_LIST_LEN = 1024  # "short" lists: summarise anything longer (histograms, not per-token dumps)
MAX_ATTRIBUTES = 128  # the OpenTelemetry SDK's default per-span attribute limit; beyond it spans get cut
ATTRIBUTE_PREFIX = "mc."
OTEL_HINT = ("run `./mc_setup --otel` (installs opentelemetry-sdk and opentelemetry-exporter-otlp), "
             "or unset MC_OTEL_ENDPOINT to run without telemetry")

_ms = "float"
SCHEMAS = {
    "mc_timing": {"step": "int", "build_ms": _ms, "tree_ms": _ms, "sample_ms": _ms, "variant_ms": _ms,
                  "positional_ms": _ms, "lens_ms": _ms, "lens_forward_ms": _ms, "lens_loss_ms": _ms,
                  "base_forward_ms": _ms, "metrics_ms": _ms, "controller_ms": _ms, "backward_ms": _ms,
                  "optimizer_ms": _ms},
    "mc_batch_counters": {"step": "int", "variants_total": "int", "variants_per_sample": "float",
                          "effective_batch_size": "int", "horizon_tokens": "int", "wc_length": "int",
                          "N_recency": "int", "N_allocated": "int", "N_siblings": "int", "N_deduped": "int"},
    "inference_update": {"session_id": "str", "tokens_ingested": "int", "wc_length": "int",
                         "swap_rate": "float", "residency": "float", "reprefill_tokens": "int",
                         "generated_tokens": "int", "decode_ms_per_token": "float",
                         "reprefill_per_token": "float"},
    "focus_allocator": {"session_id": "str", "expands": "int", "collapses": "int", "iterations": "int",
                        "budget_used": "float", "forced": "int"},
    "mc_tree_snapshot": {"session_id": "str", "step": "int", "lod0_entries": "int", "lod1_entries": "int",
                         "lod2_entries": "int", "memory_bytes": "int"},
    "working_context_snapshot": {"session_id": "str", "step": "int", "wc_length": "int", "max_length": "int",
                                 "lod_histogram": "list[int]", "covered_tokens": "int",
                                 "recent_raw_tokens": "int"},
    "mc_preflight": {"service": "str", "pid": "int"},
    "mc_alert": {"metric": "str", "step": "int", "value": "float", "band": "str", "severity": "str",
                 "message": "str"},
}


class OTelUnavailableError(RuntimeError):
    """MC_OTEL_ENDPOINT (or an OpenTelemetryProvider) was requested but the packages are not installed."""


def _scalar(value):
    """Python scalar for bool/int/float/str and 0-d numpy/torch values; None for anything else."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and not isinstance(value, (str, bytes)):
        value = value.item()
    return value if isinstance(value, (bool, int, float, str)) else None


def flatten_attributes(attributes: dict, prefix: str = "") -> dict:
    """{"a": 1, "h": {"0": 5}} -> {prefix+"a": 1, prefix+"h.0": 5}; lists become homogeneous tuples.
    Raises TypeError/ValueError naming the key for values OpenTelemetry cannot carry."""
    flat = {}
    for key, value in attributes.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"telemetry attribute keys must be non-empty strings, got {key!r}")
        name = prefix + key
        if isinstance(value, dict):
            flat.update(flatten_attributes(value, name + "."))
        elif isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and getattr(value, "ndim", 0) == 1):
            items = [_scalar(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
            if len(items) > MAX_LIST_LEN:
                raise ValueError(f"telemetry attribute {name!r} has {len(items)} items (max {MAX_LIST_LEN}): "
                                 "send a summary (histogram, counts) instead of a per-entry dump")
            kinds = {type(v) for v in items}
            if type(None) in kinds or len(kinds) > 1:
                raise TypeError(f"telemetry attribute {name!r} must be a list of one scalar type "
                                f"(bool, int, float or str), got types {sorted(k.__name__ for k in kinds)}")
            flat[name] = tuple(items)
        else:
            scalar = _scalar(value)
            if scalar is None:
                raise TypeError(f"telemetry attribute {name!r} has unsupported type {type(value).__name__}: "
                                "use bool, int, float, str, a short list of one of them, or a dict of those")
            flat[name] = scalar
    return flat


@dataclass(frozen=True)
class TelemetryEvent:
    event_type: str
    attributes: dict = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)  # seconds since the epoch

    def __post_init__(self):
        if not isinstance(self.event_type, str) or not self.event_type:
            raise ValueError(f"TelemetryEvent.event_type must be a non-empty string, got {self.event_type!r}")
        flat = flatten_attributes(self.attributes)  # validates now, at the call site, not in the export thread
        if len(flat) > MAX_ATTRIBUTES:
            raise ValueError(f"telemetry event {self.event_type!r} has {len(flat)} attributes "
                             f"(max {MAX_ATTRIBUTES}, the OpenTelemetry per-span limit)")


@runtime_checkable
class TelemetryProvider(Protocol):
    def emit(self, event: TelemetryEvent) -> None: ...
    def flush(self) -> bool: ...
    def shutdown(self) -> None: ...


class NoOpTelemetryProvider:
    """Accepts every event and does nothing with it (telemetry off)."""

    def emit(self, event: TelemetryEvent) -> None:
        pass

    def flush(self) -> bool:
        return True

    def shutdown(self) -> None:
        pass


def normalize_endpoint(endpoint: str) -> str:
    """An OTLP/HTTP traces URL: http(s)://host:port -> http(s)://host:port/v1/traces (a given path is kept)."""
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"OTLP endpoint must be an http:// or https:// URL such as http://tempo:4318 "
                         f"(OTLP/HTTP, usually port 4318), got {endpoint!r}")
    path = parts.path if parts.path not in ("", "/") else "/v1/traces"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def require_otel():
    try:
        # the OpenTelemetry SDK is an optional extra (./mc_setup --otel): imported only when an endpoint is set
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
    except ImportError as e:
        raise OTelUnavailableError(f"OpenTelemetry export needs packages that are not installed ({e}): "
                                   f"{OTEL_HINT}") from e
    return OTLPSpanExporter, Resource, TracerProvider, BatchSpanProcessor, SpanExportResult


def _recording_session(insecure: bool, stats: dict):
    """A requests.Session that records the last HTTP status / error in `stats` and, when insecure,
    skips TLS certificate verification (https endpoints only; http is plaintext anyway)."""
    # an optional extra's dependency, needed only by the OTLP exporter
    import requests

    class _Session(requests.Session):
        def request(self, method, url, **kwargs):
            if insecure:
                kwargs["verify"] = False
            try:
                response = super().request(method, url, **kwargs)
            except Exception as e:
                stats["last_status"], stats["last_error"] = None, e
                raise
            stats["last_status"], stats["last_error"] = response.status_code, None
            stats["last_body"] = "" if 200 <= response.status_code < 300 else response.text[:300]
            return response

    if insecure:
        # an optional extra's dependency, needed only by the OTLP exporter
        import urllib3
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    return _Session()


class _CountingExporter:
    """Wraps the OTLP exporter to count exported / failed spans (the batch processor ignores results)."""

    def __init__(self, inner, success, stats):
        self.inner, self.success, self.stats = inner, success, stats

    def export(self, spans):
        result = self.inner.export(spans)
        self.stats["exported" if result == self.success else "failed"] += len(spans)
        return result

    def __getattr__(self, name):  # shutdown, force_flush, ...: the wrapped exporter's
        return getattr(self.inner, name)


class OpenTelemetryProvider:
    """Events -> spans -> BatchSpanProcessor -> OTLP/HTTP. endpoint=None uses the OpenTelemetry defaults
    (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4318)."""

    def __init__(self, service_name: str, endpoint: str | None = None, insecure: bool = False,
                 timeout: float = 10.0, schedule_delay_millis: float = 5000.0):
        OTLPSpanExporter, Resource, TracerProvider, BatchSpanProcessor, SpanExportResult = require_otel()
        self.endpoint = normalize_endpoint(endpoint) if endpoint else None
        self.stats = {"emitted": 0, "exported": 0, "failed": 0, "last_status": None, "last_error": None}
        session = _recording_session(insecure, self.stats)
        exporter = OTLPSpanExporter(endpoint=self.endpoint, timeout=timeout, session=session)
        self.endpoint = self.endpoint or getattr(exporter, "_endpoint", None)  # resolved default, for messages
        self._tracer_provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self._tracer_provider.add_span_processor(BatchSpanProcessor(
            _CountingExporter(exporter, SpanExportResult.SUCCESS, self.stats),
            schedule_delay_millis=schedule_delay_millis))
        self._tracer = self._tracer_provider.get_tracer("mc.ops.telemetry")
        self._closed = False

    def emit(self, event: TelemetryEvent) -> None:
        if self._closed:
            raise RuntimeError(f"telemetry event {event.event_type!r} emitted after provider.shutdown()")
        t_ns = int(event.timestamp * 1e9)
        span = self._tracer.start_span(event.event_type, start_time=t_ns,
                                       attributes=flatten_attributes(event.attributes, ATTRIBUTE_PREFIX))
        span.end(end_time=t_ns)
        self.stats["emitted"] += 1

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Export everything emitted so far; False if that did not finish within timeout_s."""
        return self._closed or self._tracer_provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._tracer_provider.shutdown()  # flushes the batch processor first


def env_flag(name: str, env) -> bool:
    """1/true/yes/on -> True; unset/empty/0/false/no/off -> False; anything else is an error."""
    value = env.get(name, "").strip().lower()
    if value not in ("", "0", "false", "no", "off", "1", "true", "yes", "on"):
        raise ValueError(f"{name}={env[name]!r} is not a boolean: use 1 or 0")
    return value in ("1", "true", "yes", "on")


def provider_from_env(service_name: str, env=None) -> TelemetryProvider:
    """MC_OTEL_ENDPOINT unset/empty -> NoOpTelemetryProvider; set -> OpenTelemetryProvider(service_name,
    endpoint, insecure=MC_OTEL_INSECURE). Missing packages with the endpoint set -> OTelUnavailableError."""
    env = os.environ if env is None else env
    endpoint = env.get("MC_OTEL_ENDPOINT", "").strip()
    if not endpoint:
        return NoOpTelemetryProvider()
    insecure = env_flag("MC_OTEL_INSECURE", env)
    try:
        normalize_endpoint(endpoint)
        require_otel()
    except (ValueError, OTelUnavailableError) as e:
        raise type(e)(f"MC_OTEL_ENDPOINT={endpoint!r} is set but telemetry cannot start: {e}") from e
    return OpenTelemetryProvider(service_name, endpoint=endpoint, insecure=insecure)


_is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731


def validate_attributes(event_type: str, attributes: dict) -> None:
    """Every key known for event_type, of its declared type; the required key present."""
    if event_type not in SCHEMAS:
        raise ValueError(f"unknown telemetry event type {event_type!r}; known: {sorted(SCHEMAS)}")
    schema = SCHEMAS[event_type]
    unknown = sorted(set(attributes) - set(schema))
    if unknown:
        raise ValueError(f"{event_type} has no field(s) {unknown} (known: {list(schema)}); add new fields to "
                         "SCHEMAS in mc/ops/telemetry.py and to obsidian/architecture/Telemetry.md")
    required = next(iter(schema))
    if required not in attributes:
        raise ValueError(f"{event_type} event is missing its required field {required!r}")
    for key, value in attributes.items():
        kind = schema[key]
        if kind == "list[int]":
            items = value.tolist() if hasattr(value, "tolist") else value
            ok = isinstance(items, (list, tuple)) and all(_is_int(_scalar(i)) for i in items)
        else:
            v = _scalar(value)
            ok = {"int": _is_int(v), "float": _is_int(v) or isinstance(v, float), "str": isinstance(v, str)}[kind]
        if not ok:
            raise TypeError(f"{event_type}.{key} must be {kind}, got {value!r} ({type(value).__name__})")


def emit_event(provider: TelemetryProvider, event_type: str, attributes: dict) -> TelemetryEvent:
    """Validate against SCHEMAS (always, even for NoOp, so tests catch drift) and emit."""
    validate_attributes(event_type, attributes)
    event = TelemetryEvent(event_type, dict(attributes))
    provider.emit(event)
    return event


def emit_timing(provider: TelemetryProvider, step: int, timings: dict) -> TelemetryEvent:
    """One mc_timing event from phase durations in ms: keys `<phase>_ms`, or the controller's W&B names
    `mc/time_<phase>_ms` (MCResult.timings as they are), plus the trainer's phases."""
    return emit_event(provider, "mc_timing", {"step": step, **{k.removeprefix("mc/time_"): v
                                                               for k, v in timings.items()}})


def emit_batch_counters(provider: TelemetryProvider, step: int, counters: dict) -> TelemetryEvent:
    """One mc_batch_counters event; keys `<field>` or `mc/<field>` (the controller's metric names)."""
    return emit_event(provider, "mc_batch_counters", {"step": step, **{k.removeprefix("mc/"): v
                                                                       for k, v in counters.items()}})


def emit_training_metrics(provider: TelemetryProvider, step: int, metrics: dict):
    """mc_timing + mc_batch_counters from the trainer's log-time MC metrics (W&B names: "mc/time_<phase>_ms",
    "mc/<counter>"); keys outside the schemas are left to W&B. Counters averaged over a log interval are
    rounded back to the schema's int type."""
    timing, counters = {}, {}
    for key, value in metrics.items():
        phase = key.removeprefix("mc/time_")
        if key.startswith("mc/time_") and phase in SCHEMAS["mc_timing"]:
            timing[phase] = float(value)
        name = key.removeprefix("mc/")
        kind = SCHEMAS["mc_batch_counters"].get(name)
        if key.startswith("mc/") and kind and name != "step":
            counters[name] = int(round(value)) if kind == "int" else float(value)
    emit_timing(provider, step, timing)
    emit_batch_counters(provider, step, counters)


def training_provider(master: bool) -> TelemetryProvider:
    """The trainer's provider: from MC_OTEL_* on rank 0 (one copy of every event), NoOp on other ranks."""
    return provider_from_env("megacontext-train") if master else NoOpTelemetryProvider()
