"""Fetch ``http(s)://`` image URLs without turning the router into an open proxy.

Only used when ``image_urls.enabled``. Each URL, and every redirect target, must:

- use http or https and carry no credentials;
- name a host on ``allowed_hosts`` (exact, or ``*.example.com`` for any subdomain;
  case-insensitive; an IP literal only when that IP itself is listed);
- resolve only to public addresses. ``allow_private_addresses`` lifts this for the URL the
  client sent, never for a redirect target.

The connection goes to the very addresses that were checked (the URL is rewritten to the IP,
with the ``Host`` header and TLS server name kept), so a second DNS answer cannot swap in
another address. Redirects are followed by hand up to ``max_redirects``; the whole fetch has
``timeout_s``; the body is streamed and abandoned past ``max_bytes``. Failures are
``InvalidRequest`` with code ``image_url_not_allowed`` (refused by policy),
``invalid_image_url`` (malformed), ``image_too_large`` or ``image_fetch_failed``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import TypeAlias

import aiohttp
from yarl import URL

from foveal.config import ImageUrlSettings
from foveal.errors import InvalidRequest

__all__ = ["ImageFetcher"]

logger = logging.getLogger(__name__)

_IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 * 1024
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_HEADERS = {
    "User-Agent": "foveal-image-fetcher",
    "Accept": "image/png, image/jpeg, image/webp, image/gif, image/*;q=0.8",
    "Accept-Encoding": "identity",
}


class ImageFetcher:
    """Fetches image bytes from allowlisted hosts. One HTTP session, created on first use."""

    def __init__(self, settings: ImageUrlSettings) -> None:
        self._settings = settings
        self._allowlist = _HostAllowlist(settings.allowed_hosts)
        self._session: aiohttp.ClientSession | None = None

    async def fetch(self, url: str, *, param: str) -> bytes:
        """The body of ``url`` after redirects, or ``InvalidRequest``."""
        timeout = self._settings.timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await self._fetch(url, param)
        except TimeoutError:
            raise InvalidRequest(
                f"fetching the image URL timed out after {timeout:g}s",
                param=param,
                code="image_fetch_failed",
            ) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64),
                timeout=aiohttp.ClientTimeout(total=self._settings.timeout_s),
                cookie_jar=aiohttp.DummyCookieJar(),
                headers=_HEADERS,
                trust_env=False,  # a proxy would connect on our behalf, past the address checks
            )
        return self._session

    async def _fetch(self, url: str, param: str) -> bytes:
        current = _parse_url(url, param=param, redirect=False)
        for hop in range(self._settings.max_redirects + 1):
            # the client's own URL may reach private addresses if configured; redirects never
            allow_private = hop == 0 and self._settings.allow_private_addresses
            addresses = await self._checked_addresses(current, allow_private, param)
            resp = await self._connect(current, addresses, param)
            async with resp:
                if resp.status in _REDIRECT_STATUSES:
                    location = resp.headers.get("Location")
                    if not location:
                        raise _failed(f"redirect (HTTP {resp.status}) without a Location", param)
                    try:
                        target = current.join(URL(location))
                    except ValueError:
                        raise _failed("redirect to a malformed URL", param) from None
                    current = _parse_url(str(target), param=param, redirect=True)
                    continue
                if resp.status != 200:
                    raise _failed(f"image URL answered HTTP {resp.status}", param)
                return await self._read_body(resp, param)
        raise _failed(f"image URL redirected more than {self._settings.max_redirects} times", param)

    async def _checked_addresses(
        self, url: URL, allow_private: bool, param: str
    ) -> list[_IPAddress]:
        host = _normalize_host(url.raw_host or "")
        if not self._allowlist.allows(host):
            logger.info("image URL host %r is not allowlisted", host)
            raise InvalidRequest(
                f"image URL host {host!r} is not allowed on this server",
                param=param,
                code="image_url_not_allowed",
            )
        literal = _parse_ip(host)
        if literal is not None:
            addresses = [literal]
        else:
            addresses = await _resolve(host, url.port, param)
        if not allow_private:
            blocked = [a for a in addresses if not _is_public_address(a)]
            if blocked:
                logger.info("image URL host %r resolves to non-public %s", host, blocked)
                raise InvalidRequest(
                    f"image URL host {host!r} resolves to a private or reserved address",
                    param=param,
                    code="image_url_not_allowed",
                )
        return addresses

    async def _connect(
        self, url: URL, addresses: list[_IPAddress], param: str
    ) -> aiohttp.ClientResponse:
        """Send the GET to each checked address in turn until one connects."""
        session = self._get_session()
        headers = {"Host": url.host_port_subcomponent or ""}
        server_hostname = url.raw_host if url.scheme == "https" else None
        for address in addresses:
            try:
                target = url.with_host(str(address))
            except ValueError:  # e.g. a link-local address with a zone
                continue
            try:
                return await session.get(
                    target,
                    headers=headers,
                    allow_redirects=False,
                    server_hostname=server_hostname,
                )
            except aiohttp.ClientConnectorError as exc:
                logger.debug("image URL: connecting to %s failed: %r", address, exc)
            except aiohttp.ClientError as exc:
                logger.debug("image URL: request to %s failed: %r", address, exc)
                raise _failed(f"fetching from {url.host} failed", param) from None
        raise _failed(f"could not connect to {url.host}", param)

    async def _read_body(self, resp: aiohttp.ClientResponse, param: str) -> bytes:
        limit = self._settings.max_bytes
        if resp.content_length is not None and resp.content_length > limit:
            resp.close()
            raise _too_large(limit, param)
        body = bytearray()
        try:
            async for chunk in resp.content.iter_chunked(_CHUNK_BYTES):
                body += chunk
                if len(body) > limit:
                    resp.close()  # drop the connection rather than drain the rest
                    raise _too_large(limit, param)
        except aiohttp.ClientError as exc:
            logger.debug("image URL: reading the body failed: %r", exc)
            raise _failed("the image URL's response broke off", param) from None
        return bytes(body)


class _HostAllowlist:
    """``allowed_hosts``: exact names, ``*.suffix`` patterns and IP literals."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self._names: set[str] = set()
        self._suffixes: list[str] = []
        self._ips: set[_IPAddress] = set()
        for raw in patterns:
            pattern = raw.strip()
            if pattern.startswith("[") and pattern.endswith("]"):
                pattern = pattern[1:-1]
            ip = _parse_ip(pattern)
            if ip is not None:
                self._ips.add(ip)
            elif pattern.startswith("*."):
                self._suffixes.append("." + _normalize_host(pattern[2:]))
            elif pattern:
                self._names.add(_normalize_host(pattern))

    def allows(self, host: str) -> bool:
        """``host`` as :func:`_normalize_host` returns it."""
        if not host:
            return False
        ip = _parse_ip(host)
        if ip is not None:
            return ip in self._ips
        return host in self._names or any(host.endswith(s) for s in self._suffixes)


def _is_public_address(ip: _IPAddress) -> bool:
    """Whether ``ip`` is a globally routable unicast address (also for IPv4 inside IPv6)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return _is_public_address(ip.ipv4_mapped)
        if ip in _NAT64:  # DNS64 answers on IPv6-only networks: judge the IPv4 inside
            return _is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        embedded: list[ipaddress.IPv4Address] = []
        if ip.sixtofour is not None:
            embedded.append(ip.sixtofour)
        if ip.teredo is not None:
            embedded.extend(ip.teredo)
        if not all(_is_public_address(e) for e in embedded):
            return False
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
    )


def _parse_url(url: str, *, param: str, redirect: bool) -> URL:
    what = "redirect target" if redirect else "image URL"
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        raise InvalidRequest(
            f"{what} is malformed", param=param, code="invalid_image_url"
        ) from None
    if parsed.scheme not in ("http", "https"):
        raise InvalidRequest(
            f"{what} must use http or https", param=param, code="image_url_not_allowed"
        )
    if not parsed.raw_host:
        raise InvalidRequest(f"{what} has no host", param=param, code="invalid_image_url")
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise InvalidRequest(
            f"{what} must not contain credentials", param=param, code="image_url_not_allowed"
        )
    return parsed


async def _resolve(host: str, port: int | None, param: str) -> list[_IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise _failed(f"could not resolve image URL host {host!r}", param) from None
    addresses: list[_IPAddress] = []
    for *_, sockaddr in infos:
        ip = _parse_ip(str(sockaddr[0]))
        if ip is not None and ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise _failed(f"could not resolve image URL host {host!r}", param)
    return addresses


def _normalize_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    try:
        return host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        return host


def _parse_ip(text: str) -> _IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _failed(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="image_fetch_failed")


def _too_large(limit: int, param: str) -> InvalidRequest:
    return InvalidRequest(
        f"image at the URL is larger than {limit} bytes", param=param, code="image_too_large"
    )
