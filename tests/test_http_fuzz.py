"""Fuzzing the engine's HTTP API: whatever arrives, the answer is never a 5xx.

Requests go out as raw bytes over a socket (an HTTP client would tidy them up):
random methods, paths with odd ids and queue names, query strings, bodies (deep
nesting, integers beyond 64 bits, invalid UTF-8, not JSON) and headers, to every
route of a real :class:`EngineApi` on an engine on the in-memory bus.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse

from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bus_adapters import open_bus
from hms_mgmt.definitions import WorkflowDefinition
from hms_mgmt.engine.api import EngineApi
from hms_mgmt.engine.engine import Engine
from hms_mgmt.metrics import EngineMetrics
from hms_mgmt.store import open_store

TOKEN = "s3cret"
ROUTES = [
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/api/workflows"),
    ("POST", "/api/workflows"),
    ("GET", "/api/workflows/{id}"),
    ("POST", "/api/workflows/{id}/cancel"),
    ("POST", "/api/workflows/{id}/retry"),
    ("GET", "/api/definitions"),
    ("GET", "/api/dlq"),
    ("GET", "/api/dlq/{queue}"),
    ("POST", "/api/dlq/{queue}/replay"),
    ("POST", "/api/dlq/{queue}/purge"),
]
METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: beyond 64 bits too
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)

segments = st.one_of(
    st.sampled_from(
        ["wf-1", "fuzz.a.dlq", "hms.engine.commands.dlq", "..", "-x", "a" * 101, "%00", "%FF"]
    ).map(lambda s: s if s.startswith("%") else urllib.parse.quote(s, safe="")),
    st.text(max_size=40).map(lambda s: urllib.parse.quote(s, safe="")),
    st.binary(max_size=40).map(lambda b: urllib.parse.quote_from_bytes(b, safe="")),
    st.integers(0, 5000).map(lambda n: "9" * n),
)

query_values = st.one_of(
    st.sampled_from(["running", "failed", "fuzz", "50", "0", "-1", "1e3", "", "%00", "%FF"]),
    st.text(max_size=30).map(lambda s: urllib.parse.quote(s, safe="")),
    st.binary(max_size=30).map(lambda b: urllib.parse.quote_from_bytes(b, safe="")),
    st.integers(0, 5000).map(lambda n: "9" * n),
)


@st.composite
def queries(draw: st.DrawFn) -> str:
    pairs = draw(
        st.lists(
            st.tuples(st.sampled_from(["status", "name", "limit", "x"]), query_values), max_size=4
        )
    )
    return "?" + "&".join(f"{k}={v}" for k, v in pairs) if pairs else ""


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 7))
    if choice == 0:
        return b""
    if choice == 1:
        return draw(st.binary(max_size=200))
    if choice == 2:
        depth = draw(st.integers(60, 20_000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        return opener * depth + b"1" + closer * depth
    if choice == 3:
        digits = draw(st.integers(18, 5000))
        sign = draw(st.sampled_from(["", "-"]))
        return f'{{"workflow": "fuzz", "input": {sign}{"9" * digits}}}'.encode()
    if choice == 4:  # a valid body with invalid UTF-8 in a string
        return b'{"workflow": "fuzz", "reason": "\xff\xfe", "id": "\xc3"}'
    fields = draw(
        st.dictionaries(
            st.sampled_from(["workflow", "input", "idempotency_key", "reason", "id", "all"]),
            st.one_of(st.sampled_from(["fuzz", "nope", True, "a\nb"]), json_values),
            max_size=4,
        )
    )
    return json.dumps(fields).encode()


header_values = st.one_of(
    st.sampled_from([f"Bearer {TOKEN}".encode(), b"Bearer wrong", "Bearer é".encode()]),
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method, template = draw(st.sampled_from(ROUTES))
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(METHODS))
    path = template.replace("{id}", draw(segments)).replace("{queue}", draw(segments))
    body = draw(bodies())
    headers = [b"Host: fuzz", b"Connection: close", f"Content-Length: {len(body)}".encode()]
    if draw(st.booleans()):  # let most changes in, so their handlers run
        headers.append(f"Authorization: Bearer {TOKEN}".encode())
    else:
        headers.append(b"Authorization: " + draw(header_values))
    for name in draw(
        st.lists(st.sampled_from(["Content-Type", "traceparent", "X-Odd"]), max_size=2)
    ):
        headers.append(name.encode() + b": " + draw(header_values))
    line = f"{method} {path}{draw(queries())} HTTP/1.1".encode()
    return b"\r\n".join([line, *headers]) + b"\r\n\r\n" + body


def plain(method: str, path: str, body: bytes = b"", token: str | None = TOKEN) -> bytes:
    """A well-formed request: the examples every run tries, whatever the fuzz draws."""
    headers = [b"Host: fuzz", b"Connection: close", f"Content-Length: {len(body)}".encode()]
    if token is not None:
        headers.append(f"Authorization: Bearer {token}".encode())
    line = f"{method} {path} HTTP/1.1".encode()
    return b"\r\n".join([line, *headers]) + b"\r\n\r\n" + body


async def _send(host: str, port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()
        await writer.wait_closed()


def test_no_request_gets_a_server_error(memory_url: str, store_url: str) -> None:
    loop = asyncio.new_event_loop()
    engine = Engine(open_bus(memory_url), open_store(store_url))
    api = EngineApi(engine, EngineMetrics(), token=TOKEN)
    server = TestServer(api.app())

    async def setup() -> asyncio.Future[None]:
        running = asyncio.ensure_future(engine.run())
        await asyncio.wait_for(engine.ready.wait(), 10)
        await api.client.define(WorkflowDefinition.build("fuzz", ["a"]), timeout=10)
        await server.start_server()
        return running

    running = loop.run_until_complete(setup())
    seen: dict[int, int] = {}
    try:

        @settings(
            max_examples=300,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(request=requests())
        @example(request=plain("POST", "/api/workflows", b'{"workflow": "fuzz"}'))  # 201
        @example(request=plain("GET", "/api/workflows"))  # 200
        @example(request=plain("POST", "/api/workflows", b"{nope"))  # 400
        @example(request=plain("POST", "/api/workflows", b"{}", token="wrong"))  # 401
        @example(request=plain("GET", "/api/workflows/nope"))  # 404
        def check(request: bytes) -> None:
            answer = loop.run_until_complete(_send(server.host, server.port, request))
            assert answer.startswith(b"HTTP/1."), (request[:300], answer[:300])
            status = int(answer.split(b" ", 2)[1])
            seen[status] = seen.get(status, 0) + 1
            assert status < 500, (request[:300], answer[:600])

        check()
    finally:

        async def teardown() -> None:
            await server.close()
            engine.stop()
            await running

        loop.run_until_complete(teardown())
        loop.close()
    # the fuzz reached the handlers, not only the parser and the router (the examples
    # make sure of each status; the drawn requests add the rest)
    assert {200, 201, 400, 401, 404} <= set(seen), seen
