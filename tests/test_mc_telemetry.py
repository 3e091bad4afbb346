"""
mc/ops/telemetry.py and scripts/mc_otel_preflight.py against a real (local) OTLP/HTTP receiver: an
http.server on 127.0.0.1 that decodes POST /v1/traces bodies as ExportTraceServiceRequest protobufs.
"""

import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mc.ops import telemetry as T
from scripts import mc_otel_preflight

pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

ROOT = Path(__file__).resolve().parents[1]


class Receiver:
    """Collects spans POSTed to /v1/traces; answers `status` (200 by default), 404 on other paths."""

    def __init__(self, status=200, tls_dir=None):
        self.spans, self.resources, self.paths, self.status = [], [], [], status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.paths.append(self.path)
                code = receiver.status if self.path == "/v1/traces" else 404
                if code == 200:
                    request = ExportTraceServiceRequest.FromString(body)
                    for rs in request.resource_spans:
                        receiver.resources.append({a.key: a.value.string_value for a in rs.resource.attributes})
                        for ss in rs.scope_spans:
                            receiver.spans.extend(ss.spans)
                payload = ExportTraceServiceResponse().SerializeToString() if code == 200 else b"nope"
                self.send_response(code)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls_dir is not None:  # https with a self-signed certificate (see self_signed_cert)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls_dir / "cert.pem", tls_dir / "key.pem")
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def span_attributes(span) -> dict:
    out = {}
    for kv in span.attributes:
        v = kv.value
        kind = v.WhichOneof("value")
        if kind == "array_value":
            out[kv.key] = [getattr(x, x.WhichOneof("value")) for x in v.array_value.values]
        else:
            out[kv.key] = getattr(v, kind)
    return out


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


TIMINGS = {"build_ms": 1.5, "variant_ms": 0.25, "positional_ms": 0.1, "lens_ms": 2.0, "lens_forward_ms": 1.2,
           "lens_loss_ms": 0.8, "base_forward_ms": 10.0, "controller_ms": 14.0, "optimizer_ms": 3}
COUNTERS = {"variants_total": 12, "variants_per_sample": 3.0, "effective_batch_size": 4, "horizon_tokens": 256,
            "wc_length": 512, "N_recency": 4, "N_allocated": 8, "N_siblings": 0, "N_deduped": 1}


# -----------------------------------------------------------------------------
# the OpenTelemetry provider, end to end

def test_events_arrive_with_attributes():
    with Receiver() as rx:
        provider = T.OpenTelemetryProvider("mc-test", endpoint=rx.url)
        T.emit_timing(provider, 7, TIMINGS)
        T.emit_batch_counters(provider, 7, COUNTERS)
        T.emit_event(provider, "working_context_snapshot",
                     {"session_id": "s1", "wc_length": 40, "lod_histogram": [32, 7, 1]})
        assert provider.flush(timeout_s=10)
        provider.shutdown()
    assert rx.paths and set(rx.paths) == {"/v1/traces"}
    assert rx.resources[0]["service.name"] == "mc-test"
    by_name = {s.name: span_attributes(s) for s in rx.spans}
    assert set(by_name) == {"mc_timing", "mc_batch_counters", "working_context_snapshot"}
    assert by_name["mc_timing"] == {"mc.step": 7, **{f"mc.{k}": v for k, v in TIMINGS.items()}}
    assert by_name["mc_batch_counters"] == {"mc.step": 7, **{f"mc.{k}": v for k, v in COUNTERS.items()}}
    assert by_name["working_context_snapshot"]["mc.lod_histogram"] == [32, 7, 1]
    assert provider.stats["emitted"] == 3 and provider.stats["exported"] == 3 and provider.stats["failed"] == 0
    assert provider.stats["last_status"] == 200
    with pytest.raises(RuntimeError, match="after provider.shutdown"):
        provider.emit(T.TelemetryEvent("mc_timing", {"step": 8}))


def test_nested_attributes_are_flattened_and_timestamp_kept():
    with Receiver() as rx:
        provider = T.OpenTelemetryProvider("mc-test", endpoint=rx.url + "/")
        event = T.TelemetryEvent("custom", {"lod": {"0": 3, "1": 2}, "name": "x", "ok": True}, timestamp=1.7e9)
        provider.emit(event)
        provider.shutdown()  # shutdown flushes too
    (span,) = rx.spans
    assert span_attributes(span) == {"mc.lod.0": 3, "mc.lod.1": 2, "mc.name": "x", "mc.ok": True}
    assert span.start_time_unix_nano == span.end_time_unix_nano == int(1.7e9 * 1e9)


def test_failed_exports_are_counted():
    with Receiver(status=400) as rx:
        provider = T.OpenTelemetryProvider("mc-test", endpoint=rx.url, timeout=2)
        T.emit_timing(provider, 1, {"build_ms": 1.0})
        provider.flush(timeout_s=5)
        provider.shutdown()
    assert provider.stats["failed"] == 1 and provider.stats["exported"] == 0
    assert provider.stats["last_status"] == 400


# -----------------------------------------------------------------------------
# no-op provider and environment selection

def test_noop_provider():
    p = T.NoOpTelemetryProvider()
    assert isinstance(p, T.TelemetryProvider)
    T.emit_timing(p, 0, TIMINGS)
    assert p.flush() is True
    p.shutdown()
    p.shutdown()


def test_provider_from_env_chooses(monkeypatch):
    assert isinstance(T.provider_from_env("svc", env={}), T.NoOpTelemetryProvider)
    assert isinstance(T.provider_from_env("svc", env={"MC_OTEL_ENDPOINT": "  "}), T.NoOpTelemetryProvider)
    p = T.provider_from_env("svc", env={"MC_OTEL_ENDPOINT": "http://127.0.0.1:9", "MC_OTEL_INSECURE": "1"})
    try:
        assert isinstance(p, T.OpenTelemetryProvider) and p.endpoint == "http://127.0.0.1:9/v1/traces"
    finally:
        p.shutdown()
    with pytest.raises(ValueError, match="MC_OTEL_INSECURE"):
        T.provider_from_env("svc", env={"MC_OTEL_ENDPOINT": "http://h:4318", "MC_OTEL_INSECURE": "maybe"})
    with pytest.raises(ValueError, match="http:// or https://"):
        T.provider_from_env("svc", env={"MC_OTEL_ENDPOINT": "tempo:4318"})


def test_missing_packages_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    assert isinstance(T.provider_from_env("svc", env={}), T.NoOpTelemetryProvider)  # unset: still fine
    with pytest.raises(T.OTelUnavailableError, match=r"\./mc_setup --otel"):
        T.provider_from_env("svc", env={"MC_OTEL_ENDPOINT": "http://tempo:4318"})
    with pytest.raises(T.OTelUnavailableError, match=r"\./mc_setup --otel"):
        T.OpenTelemetryProvider("svc", endpoint="http://tempo:4318")


@pytest.mark.parametrize("given, expected", [
    ("http://tempo:4318", "http://tempo:4318/v1/traces"),
    ("http://tempo:4318/", "http://tempo:4318/v1/traces"),
    ("https://otel.example.com", "https://otel.example.com/v1/traces"),
    ("http://gw:8080/otlp/v1/traces", "http://gw:8080/otlp/v1/traces"),
])
def test_normalize_endpoint(given, expected):
    assert T.normalize_endpoint(given) == expected


# -----------------------------------------------------------------------------
# schemas: validation, and the docs list exactly the same fields

def test_schema_validation():
    p = T.NoOpTelemetryProvider()
    with pytest.raises(ValueError, match="bogus_ms"):
        T.emit_timing(p, 1, {"bogus_ms": 1.0})
    with pytest.raises(ValueError, match="N_bogus"):
        T.emit_batch_counters(p, 1, {"N_bogus": 1})
    with pytest.raises(TypeError, match="mc_timing.build_ms must be float"):
        T.emit_timing(p, 1, {"build_ms": "fast"})
    with pytest.raises(TypeError, match="mc_batch_counters.variants_total must be int"):
        T.emit_batch_counters(p, 1, {"variants_total": 2.5})
    with pytest.raises(ValueError, match="required field 'session_id'"):
        T.emit_event(p, "inference_update", {"tokens_ingested": 5})
    with pytest.raises(ValueError, match="unknown telemetry event type"):
        T.emit_event(p, "nope", {})
    with pytest.raises(TypeError, match="lod_histogram must be list"):
        T.emit_event(p, "working_context_snapshot", {"session_id": "a", "lod_histogram": [1.5]})
    T.emit_event(p, "inference_update", {"session_id": "a", "swap_rate": 0, "residency": 0.95})


def test_controller_metric_names_are_accepted():
    p = T.NoOpTelemetryProvider()
    ev = T.emit_timing(p, 2, {"mc/time_tree_ms": 1.0, "mc/time_controller_ms": 3.0, "optimizer_ms": 0.5})
    assert ev.attributes == {"step": 2, "tree_ms": 1.0, "controller_ms": 3.0, "optimizer_ms": 0.5}
    metrics = {"mc/variants_total": 6, "mc/horizon_tokens": 96, "mc/lod_loss/1": 2.3, "train/loss_lod0": 2.0}
    counters = {k: v for k, v in metrics.items() if k.removeprefix("mc/") in T.SCHEMAS["mc_batch_counters"]}
    ev = T.emit_batch_counters(p, 2, counters)
    assert ev.attributes == {"step": 2, "variants_total": 6, "horizon_tokens": 96}


def test_event_attribute_checks():
    torch = pytest.importorskip("torch")
    event = T.TelemetryEvent("x", {"a": torch.tensor(2.5), "h": torch.tensor([1, 2])})
    assert T.flatten_attributes(event.attributes, "mc.") == {"mc.a": 2.5, "mc.h": (1, 2)}
    T.emit_timing(T.NoOpTelemetryProvider(), torch.tensor(3), {"build_ms": torch.tensor(1.0)})
    with pytest.raises(TypeError, match="'obj' has unsupported type"):
        T.TelemetryEvent("x", {"obj": object()})
    with pytest.raises(TypeError, match="one scalar type"):
        T.TelemetryEvent("x", {"mixed": [1, "a"]})
    with pytest.raises(ValueError, match="summary"):
        T.TelemetryEvent("x", {"long": list(range(T.MAX_LIST_LEN + 1))})
    with pytest.raises(ValueError, match="event_type"):
        T.TelemetryEvent("", {})


def documented_schemas() -> dict:
    """{event_type: {field: type}} from the '### `event`' sections' tables in Telemetry.md."""
    text = (ROOT / "obsidian" / "architecture" / "Telemetry.md").read_text()
    docs, current = {}, None
    for line in text.splitlines():
        if m := re.match(r"^###\s+`(\w+)`", line):
            current = docs.setdefault(m.group(1), {})
        elif line.startswith("#"):
            current = None
        elif current is not None and (m := re.match(r"^\|\s*`(\w+)`\s*\|\s*`?([\w\[\]]+)`?\s*\|", line)):
            current[m.group(1)] = m.group(2)
    return docs


def test_docs_match_schemas():
    assert documented_schemas() == T.SCHEMAS


# -----------------------------------------------------------------------------
# preflight

def test_preflight_ok_against_local_receiver():
    lines = []
    with Receiver() as rx:
        assert mc_otel_preflight.preflight(rx.url, timeout=3, log=lines.append)
    assert any("accepted a test span (HTTP 200" in line for line in lines), lines
    assert [s.name for s in rx.spans] == ["mc_preflight"]


def test_preflight_fails_clearly_on_closed_port(capsys):
    url = closed_port_url()
    assert mc_otel_preflight.main(["--endpoint", url, "--timeout", "0.5"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "could not connect" in out and url in out


def test_preflight_fails_clearly_on_non_2xx():
    lines = []
    with Receiver() as rx:
        assert not mc_otel_preflight.preflight(rx.url + "/wrong/path", timeout=2, log=lines.append)
    assert "HTTP 404" in lines[-1] and "/v1/traces" in lines[-1], lines


def test_preflight_fails_clearly_when_receiver_never_answers():
    """A port that accepts the connection (listen backlog) but never answers: a timeout, said as such."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        lines = []
        assert not mc_otel_preflight.preflight(url, timeout=0.5, log=lines.append)
    assert "timed out after 0.5 s" in lines[-1] and "--timeout" in lines[-1], lines


def self_signed_cert(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True, timeout=30)
    return tmp_path


def test_preflight_https_self_signed_needs_insecure(tmp_path):
    tls_dir = self_signed_cert(tmp_path)
    lines = []
    with Receiver(tls_dir=tls_dir) as rx:
        assert not mc_otel_preflight.preflight(rx.url, timeout=0.5, log=lines.append)
        assert "TLS error" in lines[-1] and "--insecure" in lines[-1], lines
        assert mc_otel_preflight.preflight(rx.url, insecure=True, timeout=2, log=lines.append)
        p = T.provider_from_env("svc", env={"MC_OTEL_ENDPOINT": rx.url, "MC_OTEL_INSECURE": "1"})
        T.emit_timing(p, 3, {"build_ms": 2.0})
        p.shutdown()
    assert [s.name for s in rx.spans] == ["mc_preflight", "mc_timing"]


def test_preflight_cli(monkeypatch):
    with Receiver() as rx:
        run = subprocess.run([sys.executable, "-m", "scripts.mc_otel_preflight", "--endpoint", rx.url],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok" in run.stdout and len(rx.spans) == 1
    monkeypatch.delenv("MC_OTEL_ENDPOINT", raising=False)
    assert mc_otel_preflight.main([]) == 1


def test_trainer_log_metrics_become_timing_and_counter_events():
    """What MCTrainStep.log hands to telemetry: the averaged W&B dict, with non-schema keys mixed in."""
    class Recorder:
        def __init__(self):
            self.events = []

        def emit(self, event):
            self.events.append(event)

    rec = Recorder()
    logged = {"mc/time_tree_ms": 4.0, "mc/time_variant_ms": 9.5, "mc/time_step_ms": 120.0,
              "mc/variants_total": 7.999, "mc/variants_per_sample": 3.0, "mc/wc_length": 191.6,
              "mc/lod_loss/1": 2.4, "train/loss_lod0": 2.1, "mc/controller_share": 0.3}
    T.emit_training_metrics(rec, 12, logged)
    timing, counters = rec.events
    assert timing.event_type == "mc_timing" and timing.attributes == {"step": 12, "tree_ms": 4.0, "variant_ms": 9.5}
    assert counters.event_type == "mc_batch_counters"
    assert counters.attributes == {"step": 12, "variants_total": 8, "variants_per_sample": 3.0, "wc_length": 192}


def test_training_provider_is_noop_off_rank0_and_without_endpoint(monkeypatch):
    monkeypatch.delenv("MC_OTEL_ENDPOINT", raising=False)
    assert isinstance(T.training_provider(True), T.NoOpTelemetryProvider)
    monkeypatch.setenv("MC_OTEL_ENDPOINT", "http://127.0.0.1:4318")
    assert isinstance(T.training_provider(False), T.NoOpTelemetryProvider)
    provider = T.training_provider(True)
    assert isinstance(provider, T.OpenTelemetryProvider)
    provider.shutdown()
