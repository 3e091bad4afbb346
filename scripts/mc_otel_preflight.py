"""
Check an OTLP/HTTP telemetry endpoint end to end before a long run relies on it.

    python -m scripts.mc_otel_preflight                       # endpoint from MC_OTEL_ENDPOINT
    python -m scripts.mc_otel_preflight --endpoint http://tempo:4318 [--insecure] [--timeout 5]

1. the OpenTelemetry packages import (else: run ./mc_setup --otel);
2. one `mc_preflight` span goes through the same path training uses (mc.ops.telemetry.OpenTelemetryProvider:
   BatchSpanProcessor -> OTLP/HTTP protobuf exporter), flushed at once;
3. the receiver must answer HTTP 2xx. Connection refused, TLS errors, timeouts and non-2xx answers are
   reported with the URL and the likely fix; exit code 0 = OK, 1 = failed.
"""

import argparse
import logging
import os
import sys
import time

from mc.ops.telemetry import (
    OpenTelemetryProvider,
    OTelUnavailableError,
    emit_event,
    env_flag,
    normalize_endpoint,
    require_otel,
)


def check_imports() -> str:
    """Version string of the installed OpenTelemetry packages; OTelUnavailableError when missing."""
    require_otel()
    # the packages this command checks may be missing: nothing optional is imported before the check
    from importlib.metadata import PackageNotFoundError, version
    found = []
    for pkg in ("opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http"):
        try:
            found.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            found.append(f"{pkg} (version unknown)")
    return ", ".join(found)


def explain_failure(stats: dict, url: str, timeout: float, flushed: bool) -> str:
    """One sentence naming what went wrong and what to try (+ the proxy in use, if any)."""
    # an optional extra's dependency: imported only once the check says it is installed
    import requests
    proxy = requests.utils.get_environ_proxies(url).get(url.split(":", 1)[0])
    note = (f" [note: requests sent this through the proxy {proxy} from the *_PROXY environment; "
            "add the collector's host to NO_PROXY if it is reachable directly]") if proxy else ""
    return _diagnosis(stats, url, timeout, flushed) + note


def _diagnosis(stats: dict, url: str, timeout: float, flushed: bool) -> str:
    # an optional extra's dependency: imported only once the check says it is installed
    import requests
    err, status = stats["last_error"], stats["last_status"]
    if isinstance(err, requests.exceptions.SSLError):
        return (f"TLS error talking to {url}: {err}. Use --insecure (MC_OTEL_INSECURE=1) to skip certificate "
                "checks, or an http:// URL if the collector does not speak TLS")
    if isinstance(err, requests.exceptions.Timeout) or (not flushed and status is None and err is None):
        return (f"timed out after {timeout:g} s waiting for {url}: is the collector overloaded, or a firewall "
                "dropping packets? Try a larger --timeout")
    if isinstance(err, requests.exceptions.ConnectionError):
        return (f"could not connect to {url} (connection refused or host unreachable): is the OTLP collector "
                f"running and listening for OTLP/HTTP on that port (usually 4318)? [{err}]")
    if err is not None:
        return f"request to {url} failed: {type(err).__name__}: {err}"
    if status is not None and not 200 <= status < 300:
        body = stats.get("last_body", "").strip().replace("\n", " ")[:200]
        hint = " (wrong path? OTLP/HTTP traces live at /v1/traces)" if status in (404, 405) else ""
        return f"{url} answered HTTP {status}{hint}" + (f": {body}" if body else "")
    return f"export to {url} failed ({stats['failed']} span(s) failed, last HTTP status {status})"


def preflight(endpoint: str, insecure: bool = False, timeout: float = 5.0, log=print) -> bool:
    """Send one test span to endpoint; True on HTTP 2xx. Prints what it checked via `log`."""
    try:
        log(f"ok    OpenTelemetry packages: {check_imports()}")
    except OTelUnavailableError as e:
        log(f"FAIL  {e}")
        return False
    try:
        url = normalize_endpoint(endpoint)
    except ValueError as e:
        log(f"FAIL  {e}")
        return False
    logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)  # we print our own diagnosis below
    provider = OpenTelemetryProvider("megacontext-preflight", endpoint=url, insecure=insecure, timeout=timeout)
    t0 = time.perf_counter()
    try:
        emit_event(provider, "mc_preflight", {"service": "megacontext-preflight", "pid": os.getpid()})
        flushed = provider.flush(timeout_s=timeout + 5.0)
    finally:
        provider.shutdown()
    ms = (time.perf_counter() - t0) * 1000
    stats = provider.stats
    status = stats["last_status"]
    if flushed and stats["exported"] == 1 and status is not None and 200 <= status < 300:
        log(f"ok    {url} accepted a test span (HTTP {status}, {ms:.0f} ms)")
        return True
    log(f"FAIL  {explain_failure(stats, url, timeout, flushed)}")
    return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    parser.add_argument("--endpoint", default=None, help="OTLP/HTTP URL (default: $MC_OTEL_ENDPOINT)")
    parser.add_argument("--insecure", action="store_true", help="skip TLS verification (default: $MC_OTEL_INSECURE)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the endpoint (default 5)")
    args = parser.parse_args(argv)
    endpoint = args.endpoint or os.environ.get("MC_OTEL_ENDPOINT", "").strip()
    if not endpoint:
        print("FAIL  no endpoint: pass --endpoint http://HOST:4318 or set MC_OTEL_ENDPOINT "
              "(./mc_setup --otel_endpoint URL writes it to .mc_env)")
        return 1
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0, got {args.timeout}")
    try:
        insecure = args.insecure or env_flag("MC_OTEL_INSECURE", os.environ)
    except ValueError as e:
        print(f"FAIL  {e}")
        return 1
    return 0 if preflight(endpoint, insecure=insecure, timeout=args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
