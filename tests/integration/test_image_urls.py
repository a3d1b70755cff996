"""ImageFetcher against a real HTTP server on 127.0.0.1: allowlist, address rules, redirects,
time and size limits."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from foveal.config import ImageUrlSettings, LimitsSettings
from foveal.errors import InvalidRequest
from foveal.router import image_urls
from foveal.router.image_urls import ImageFetcher, _HostAllowlist, _is_public_address
from foveal.router.images import load_image
from foveal.router.requests import RawImage

PARAM = "messages[0].content[0].image_url"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


@dataclass
class Server:
    port: int
    hits: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def _routes(server: Server) -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.get("/img.png")
    async def img(request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    @routes.get("/text")
    async def text(request: web.Request) -> web.Response:
        return web.Response(text="not an image")

    @routes.get("/redirect")
    async def redirect(request: web.Request) -> web.Response:
        status = int(request.query.get("status", "302"))
        return web.Response(status=status, headers={"Location": request.query["to"]})

    @routes.get("/loop/{n}")
    async def loop(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        return web.Response(status=307, headers={"Location": f"/loop/{n + 1}"})

    @routes.get("/slow")
    async def slow(request: web.Request) -> web.Response:
        await asyncio.wait_for(server.release.wait(), 10)
        return web.Response(body=PNG)

    @routes.get("/slow-body")
    async def slow_body(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(PNG)
        await resp.prepare(request)
        await resp.write(PNG[:10])
        await asyncio.wait_for(server.release.wait(), 10)
        return resp

    @routes.get("/bytes/{n}")
    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * int(request.match_info["n"]))

    @routes.get("/chunked/{n}")
    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        remaining = int(request.match_info["n"])
        while remaining > 0:
            await resp.write(b"x" * min(remaining, 4096))
            remaining -= 4096
        await resp.write_eof()
        return resp

    @routes.get("/missing")
    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404, text="no such image")

    return routes


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server(port=0)

    @web.middleware
    async def record(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        srv.hits.append(request.path)
        response: web.StreamResponse = await handler(request)
        return response

    app = web.Application(middlewares=[record])
    app.add_routes(_routes(srv))
    runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    srv.port = runner.addresses[0][1]
    try:
        yield srv
    finally:
        srv.release.set()
        await runner.cleanup()


@pytest.fixture
async def make_fetcher() -> AsyncIterator[Callable[..., ImageFetcher]]:
    fetchers: list[ImageFetcher] = []

    def make(**overrides: Any) -> ImageFetcher:
        values: dict[str, Any] = {
            "enabled": True,
            "allowed_hosts": ["127.0.0.1"],
            "allow_private_addresses": True,
            "timeout_s": 5.0,
        }
        values.update(overrides)
        fetcher = ImageFetcher(ImageUrlSettings(**values))
        fetchers.append(fetcher)
        return fetcher

    yield make
    for fetcher in fetchers:
        await fetcher.close()


@pytest.fixture
def loopback_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let redirect targets on 127.0.0.1 pass the address rule, to exercise the rest."""
    real = image_urls._is_public_address
    monkeypatch.setattr(image_urls, "_is_public_address", lambda ip: ip.is_loopback or real(ip))


async def refused(fetcher: ImageFetcher, url: str, code: str) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        await fetcher.fetch(url, param=PARAM)
    assert info.value.code == code, info.value.message
    assert info.value.param == PARAM
    return info.value


# --- fetching ----------------------------------------------------------------------------


async def test_fetches_from_an_allowlisted_loopback_host(server: Server, make_fetcher) -> None:
    fetcher = make_fetcher()
    assert await fetcher.fetch(server.url("/img.png"), param=PARAM) == PNG
    assert server.hits == ["/img.png"]


async def test_load_image_fetches_and_validates(server: Server, make_fetcher) -> None:
    fetcher = make_fetcher()
    limits = LimitsSettings()
    part = await load_image(RawImage(url=server.url("/img.png")), limits, fetcher, param=PARAM)
    assert (part.mime, part.width, part.height, part.nbytes) == ("image/png", 24, 16, len(PNG))
    assert part.data_uri.startswith("data:image/png;base64,")
    with pytest.raises(InvalidRequest) as info:
        await load_image(RawImage(url=server.url("/text")), limits, fetcher, param=PARAM)
    assert info.value.code == "invalid_image"


async def test_one_session_is_reused_and_recreated_after_close(
    server: Server, make_fetcher
) -> None:
    fetcher = make_fetcher()
    await fetcher.fetch(server.url("/img.png"), param=PARAM)
    session = fetcher._session
    await fetcher.fetch(server.url("/img.png"), param=PARAM)
    assert fetcher._session is session
    await fetcher.close()
    assert session is not None and session.closed
    assert await fetcher.fetch(server.url("/img.png"), param=PARAM) == PNG


# --- host and address rules --------------------------------------------------------------


async def test_host_not_allowlisted_is_refused_without_connecting(
    server: Server, make_fetcher
) -> None:
    fetcher = make_fetcher(allowed_hosts=["images.example.com", "*.example.org"])
    err = await refused(fetcher, server.url("/img.png"), "image_url_not_allowed")
    assert "127.0.0.1" in err.message
    await refused(fetcher, server.url("/img.png", host="localhost"), "image_url_not_allowed")
    assert server.hits == []


async def test_private_address_is_refused_unless_allowed(server: Server, make_fetcher) -> None:
    fetcher = make_fetcher(allow_private_addresses=False, allowed_hosts=["127.0.0.1", "localhost"])
    await refused(fetcher, server.url("/img.png"), "image_url_not_allowed")
    await refused(fetcher, server.url("/img.png", host="localhost"), "image_url_not_allowed")
    assert server.hits == []


async def test_redirect_to_loopback_is_refused_even_when_private_addresses_are_allowed(
    server: Server, make_fetcher
) -> None:
    fetcher = make_fetcher(allowed_hosts=["127.0.0.1", "localhost"])
    # the target itself is fine as the client's own URL ...
    assert await fetcher.fetch(server.url("/img.png", host="localhost"), param=PARAM) == PNG
    server.hits.clear()
    # ... but never as a redirect target, named or relative
    target = server.url("/img.png", host="localhost")
    err = await refused(fetcher, server.url(f"/redirect?to={target}"), "image_url_not_allowed")
    assert "localhost" in err.message
    await refused(fetcher, server.url("/redirect?to=/img.png"), "image_url_not_allowed")
    assert server.hits == ["/redirect", "/redirect"]


async def test_redirects_are_followed_and_each_hop_is_rechecked(
    server: Server, make_fetcher, loopback_is_public: None
) -> None:
    fetcher = make_fetcher(allow_private_addresses=False)
    absolute = server.url("/img.png")
    url = server.url(f"/redirect?status=301&to=/redirect%3Fto%3D{absolute}")
    assert await fetcher.fetch(url, param=PARAM) == PNG
    assert server.hits == ["/redirect", "/redirect", "/img.png"]


async def test_redirect_to_a_host_not_allowlisted_is_refused(
    server: Server, make_fetcher, loopback_is_public: None
) -> None:
    fetcher = make_fetcher()
    for target in (server.url("/img.png", host="localhost"), "http://elsewhere.example/a.png"):
        server.hits.clear()
        await refused(fetcher, server.url(f"/redirect?to={target}"), "image_url_not_allowed")
        assert server.hits == ["/redirect"]


async def test_redirect_to_another_scheme_is_refused(server: Server, make_fetcher) -> None:
    fetcher = make_fetcher()
    await refused(fetcher, server.url("/redirect?to=file:///etc/passwd"), "image_url_not_allowed")


async def test_too_many_redirects(server: Server, make_fetcher, loopback_is_public: None) -> None:
    fetcher = make_fetcher(max_redirects=2)
    err = await refused(fetcher, server.url("/loop/0"), "image_fetch_failed")
    assert "redirect" in err.message
    assert server.hits == ["/loop/0", "/loop/1", "/loop/2"]
    server.hits.clear()
    no_redirects = make_fetcher(max_redirects=0)
    await refused(no_redirects, server.url("/loop/0"), "image_fetch_failed")
    assert server.hits == ["/loop/0"]


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("ftp://127.0.0.1/img.png", "image_url_not_allowed"),
        ("http://user:secret@127.0.0.1/img.png", "image_url_not_allowed"),
        ("http:///img.png", "invalid_image_url"),
        ("http://127.0.0.1:99999/img.png", "invalid_image_url"),
    ],
)
async def test_malformed_or_unsafe_urls_are_refused(make_fetcher, url: str, code: str) -> None:
    await refused(make_fetcher(), url, code)


async def test_unresolvable_host_fails_cleanly(make_fetcher) -> None:
    fetcher = make_fetcher(allowed_hosts=["nothing-here.invalid"], timeout_s=2.0)
    await refused(fetcher, "http://nothing-here.invalid/a.png", "image_fetch_failed")


async def test_nothing_listening_fails_cleanly(make_fetcher) -> None:
    server = web.AppRunner(web.Application())  # find a free port, then leave it closed
    await server.setup()
    site = web.TCPSite(server, "127.0.0.1", 0)
    await site.start()
    port = server.addresses[0][1]
    await server.cleanup()
    await refused(make_fetcher(), f"http://127.0.0.1:{port}/a.png", "image_fetch_failed")


# --- time, size and status ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/slow", "/slow-body"])
async def test_slow_server_times_out(server: Server, make_fetcher, path: str) -> None:
    fetcher = make_fetcher(timeout_s=0.3)
    started = time.monotonic()
    err = await refused(fetcher, server.url(path), "image_fetch_failed")
    assert "timed out" in err.message
    assert time.monotonic() - started < 3  # nowhere near the server's 10 s


@pytest.mark.parametrize("path", ["/bytes", "/chunked"])
async def test_body_larger_than_max_bytes_is_refused(
    server: Server, make_fetcher, path: str
) -> None:
    fetcher = make_fetcher(max_bytes=100_000)
    assert len(await fetcher.fetch(server.url(f"{path}/100000"), param=PARAM)) == 100_000
    await refused(fetcher, server.url(f"{path}/100001"), "image_too_large")
    await refused(fetcher, server.url(f"{path}/5000000"), "image_too_large")


async def test_error_status_is_refused(server: Server, make_fetcher) -> None:
    err = await refused(make_fetcher(), server.url("/missing"), "image_fetch_failed")
    assert "404" in err.message


async def test_redirect_without_location_is_refused(server: Server, make_fetcher) -> None:
    await refused(make_fetcher(), server.url("/redirect?to="), "image_fetch_failed")


# --- the rules as pure functions ---------------------------------------------------------


def test_allowlist_matching() -> None:
    allow = _HostAllowlist(["Images.Example.com", "*.cdn.example.net", "10.1.2.3", "[::1]", " "])
    assert allow.allows("images.example.com")
    assert not allow.allows("example.com")
    assert not allow.allows("evilimages.example.com")
    assert allow.allows("a.cdn.example.net")
    assert allow.allows("a.b.cdn.example.net")
    assert not allow.allows("cdn.example.net")  # the wildcard needs a subdomain
    assert not allow.allows("xcdn.example.net")
    assert allow.allows("10.1.2.3")
    assert not allow.allows("10.1.2.4")
    assert allow.allows("::1")
    assert not allow.allows("")
    assert not _HostAllowlist(["*.0.0.1"]).allows("127.0.0.1")  # wildcards never match IPs
    assert not _HostAllowlist([]).allows("images.example.com")


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::",
        "64:ff9b::a9fe:a9fe",
    ],
)
def test_non_public_addresses(address: str) -> None:
    assert not _is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses(address: str) -> None:
    assert _is_public_address(ipaddress.ip_address(address))
