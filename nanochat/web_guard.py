"""
Front-door checks of the chat server (scripts/chat_web.py), as plain functions that raise Refusal
(an HTTP status, a message that says what to fix, optional headers). They run before a request may
cost memory or a worker:

    check_host(host, allowed)                   DNS rebinding: an attacker's name that resolves to us
    check_origin(origin, host, allowed)         a page on another site posting to a local server
    check_api_key(authorization, key)           Authorization: Bearer <key>, compared in constant time
    check_content_length(value, limit)          413 before a byte of a too-large declared body is read
    check_content_type(value)                   JSON only: text/plain and forms are what a foreign page
                                                can send without a CORS preflight
    read_body(chunks, limit)                    413 as soon as the body passes the limit, never buffering more
    parse_json(raw, max_depth)                  strict JSON (no NaN/Infinity), nesting bounded
    until_disconnected(receive, coro)           run coro, cancel it when the client hangs up
"""

import asyncio
import hashlib
import hmac
import json
import re
from urllib.parse import urlsplit

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::", "*"})
ANY_HOST = "*"
NAME_RE = re.compile(r"[a-z0-9_.-]+")   # a DNS name or IPv4 address, lowercased
IPV6_RE = re.compile(r"[0-9a-f:.]+")    # inside [...]


class Refusal(Exception):
    """A request the server refuses: HTTP status, a message that says what to fix, the offending field,
    an error code, the OpenAI error type, extra response headers."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}


class ClientGone(Exception):
    """The client disconnected before its reply was ready."""


# ----------------------------------------------------------------------------- Host / Origin
def host_name(value):
    """The name in a Host header, lowercased, port and trailing dot dropped, IPv6 brackets removed:
    'LocalHost.:8000' -> 'localhost', '[::1]:80' -> '::1'. None when it is not a host[:port]."""
    v = (value or "").strip().lower()
    if v.startswith("["):
        end = v.find("]")
        name, rest = (v[1:end], v[end + 1:]) if end > 0 else ("", "")
        pattern = IPV6_RE
    else:
        name, sep, port = v.partition(":")
        rest, pattern = sep + port, NAME_RE
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return None
    name = name.rstrip(".")
    return name if name and pattern.fullmatch(name) else None


def _entry_name(item):
    if item.count(":") > 1 and not item.startswith("["):  # a bare IPv6 address such as ::1
        item = f"[{item}]"
    return host_name(item)


def allowed_hosts(bind_host="127.0.0.1", extra=()):
    """The Host names a server bound to bind_host answers: the loopback names, the bind address when it
    names one interface (not 0.0.0.0 / ::), and `extra` (--allowed_hosts). None = any ('*' in extra)."""
    extra = [e.strip() for e in extra if e.strip()]
    if ANY_HOST in extra:
        return None
    names = set(LOCAL_HOSTS)
    for item in [(bind_host or "").strip(), *extra]:
        if item in WILDCARD_BINDS:
            continue
        name = _entry_name(item)
        if name is None:
            raise ValueError(f"not a host name or address: {item!r}")
        names.add(name)
    return frozenset(names)


def check_host(host, allowed):
    if allowed is None:
        return
    name = host_name(host)
    if name not in allowed:
        shown = name or host or "(none)"
        raise Refusal(400, f"Host {shown!r} is not served here; this server answers for {', '.join(sorted(allowed))}"
                           f" (start it with --allowed_hosts {shown} to add the name)", code="host_not_allowed")


def check_origin(origin, host, allowed):
    """A request made by a web page carries its page's Origin. Same-origin pages (the chat UI) and pages
    on an allowed host pass; 'null' (sandboxed frames, file://) and every other site are refused."""
    if origin is None or allowed is None:
        return
    try:
        parts = urlsplit(origin.strip())
        name = parts.hostname
        same = bool(parts.netloc) and parts.netloc.lower() == (host or "").strip().lower()
    except ValueError:
        name, same = None, False
    if same or (name is not None and name.rstrip(".") in allowed):
        return
    raise Refusal(403, f"requests from the web page at Origin {origin!r} are refused (cross-site); "
                       f"start the server with --allowed_hosts <that host> to allow it", code="origin_not_allowed")


# ----------------------------------------------------------------------------- API key
def check_api_key(authorization, key):
    """No key configured: everything passes. Otherwise 'Bearer <key>' (the OpenAI client's header).
    Both sides are hashed first so the comparison time says nothing about the key, not even its length."""
    if not key:
        return
    scheme, _, token = (authorization or "").strip().partition(" ")
    # Starlette decodes header bytes as latin-1: encoding back gives the bytes the client sent
    given = hashlib.sha256(token.strip().encode("latin-1", errors="replace")).digest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, hashlib.sha256(key.encode("utf-8")).digest()):
        raise Refusal(401, "this server needs an API key: send the header 'Authorization: Bearer <key>' "
                           "(the chat page: enter it in the API key box)", code="invalid_api_key",
                      headers={"WWW-Authenticate": "Bearer"})


# ----------------------------------------------------------------------------- body
def check_content_type(value):
    mime = (value or "").split(";")[0].strip().lower()
    if mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json")):
        return
    raise Refusal(415, f"the request body must be JSON sent with 'Content-Type: application/json' "
                       f"(got {value or 'no Content-Type'!r})", code="unsupported_media_type")


def _too_large(limit):
    # Connection: close, so the server does not keep reading (and discarding) the rest of a huge upload
    return Refusal(413, f"the request body is over the limit of {limit} bytes", code="body_too_large",
                   headers={"Connection": "close"})


def check_content_length(value, limit):
    if value is None:
        return
    if not value.strip().isdigit():
        raise Refusal(400, f"bad Content-Length header {value!r}")
    if int(value) > limit:
        raise _too_large(limit)


async def read_body(chunks, limit) -> bytes:
    """Collect an async iterator of body chunks, refusing (413) the moment the total passes `limit`:
    at most limit + one chunk is ever held."""
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


def _no_constants(name):
    raise ValueError(f"{name} is not valid JSON")


def nesting_exceeds(obj, limit) -> bool:
    """Whether lists/objects nest deeper than `limit` levels (the top level is 1). Iterative, so any
    depth json.loads accepted is safe to check."""
    if not isinstance(obj, (dict, list)):
        return False
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse_json(raw, max_depth):
    """Strict JSON -> Python, or Refusal(400). NaN/Infinity are refused (not JSON, and they slip past
    range checks); numbers too large for a float become inf and fail the range checks later."""
    too_deep = Refusal(400, f"the request JSON is nested more than {max_depth} levels deep", code="too_deep")
    try:
        obj = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise too_deep from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, too many integer digits
        raise Refusal(400, f"the request body is not valid JSON ({e})") from None
    if nesting_exceeds(obj, max_depth):
        raise too_deep
    return obj


# ----------------------------------------------------------------------------- disconnects
async def _disconnected(receive):
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(receive, coro):
    """Await `coro`, but cancel it (its cleanup runs) and raise ClientGone if the client disconnects
    first. Call after the body is read: then the only message `receive` can bring is the disconnect.
    Starlette notices a disconnect only while it streams a response; a request still waiting for a
    worker, for prefill or for a whole non-streamed reply would otherwise keep its worker busy."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_disconnected(receive))
    outer_cancel = False
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        outer_cancel = True
    watch.cancel()
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
    if outer_cancel:
        raise asyncio.CancelledError
    if work.cancelled():
        raise ClientGone()
    return work.result()
