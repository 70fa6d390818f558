"""Which callback URLs the service will POST to (server-side request forgery).

A callback URL is chosen by the client, and the service POSTs from inside the deployment's
network: without limits, a client could make it reach the cloud's metadata endpoint, an admin
port on loopback or a service on the private network. So a URL must be `https` (`http` only with
`[callbacks].allow_http`), carry no credentials, and every address its host resolves to must be
public: loopback, link-local (which holds the metadata endpoints 169.254.169.254 and
fd00:ec2::254's neighbours), private, shared (100.64/10), unspecified, multicast and reserved
addresses are refused unless `[callbacks].allow_private`. The check runs when the request is
accepted (a 400 naming the rule) and again for every connection a try opens (`CheckedBackend`):
a name that resolved to a public address then may resolve to a private one later (DNS
rebinding), so the name is resolved once per connection, every address it gives is checked, and
the connection is made to a checked address itself — there is no second resolution, by the HTTP
client, for a rebinding to slip into. TLS still names the host (SNI and the certificate check
use the URL's host, not the address), and kept-alive connections are pooled by host name, so
one name's checked connection never carries another name's request.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

import httpcore
import httpx
import trio

from .errors import RequestError
from .models import shown

# Addresses that are not "private" to the ipaddress module but must not be reached either.
_METADATA = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd00:ec2::/32"))


class RefusedUrl(RequestError):
    """A callback URL breaks a rule; the message names it."""


def check_form(url: str, *, allow_http: bool) -> tuple[str, int]:
    """The URL's host and port, or `RefusedUrl` for a scheme, credentials or host we refuse."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise RefusedUrl(f"callbackUrl: {shown(url)} is not a URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise RefusedUrl(f"callbackUrl: must be an https URL, not {shown(url)}")
    if scheme == "http" and not allow_http:
        raise RefusedUrl("callbackUrl: must use https (http is refused unless [callbacks].allow_http = true)")
    if parts.username is not None or parts.password is not None:
        raise RefusedUrl("callbackUrl: must not carry credentials (user:password@)")
    if not parts.hostname:
        raise RefusedUrl(f"callbackUrl: {shown(url)} names no host")
    return parts.hostname, port or (443 if scheme == "https" else 80)


def refused_address(address: str) -> str | None:
    """Why `address` may not be reached (a few words), or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for label, test in (
        ("loopback", ip.is_loopback),
        ("link-local (cloud metadata)", ip.is_link_local),
        ("unspecified", ip.is_unspecified),
        ("multicast", ip.is_multicast),
        ("metadata or shared", any(ip in net for net in _METADATA if net.version == ip.version)),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    ):
        if test:
            return label
    return None


async def checked_addresses(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, every one allowed, or `RefusedUrl` naming the rule."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise RefusedUrl(f"callbackUrl: the host {shown(host)} does not resolve ({exc.strerror or exc})") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        why = refused_address(address)
        if why is not None:
            raise RefusedUrl(
                f"callbackUrl: {shown(host)} resolves to a {why} address ({address}); such addresses are "
                "refused unless [callbacks].allow_private = true"
            )
    return addresses


async def check_callback_url(url: str, *, allow_http: bool, allow_private: bool) -> None:
    """Raise `RefusedUrl` (a 400) unless the service may POST to `url` (see the module)."""
    host, port = check_form(url, allow_http=allow_http)
    if not allow_private:
        await checked_addresses(host, port)


class CheckedBackend(httpcore.AsyncNetworkBackend):
    """The HTTP client's connections: to an address `checked_addresses` allowed, the one it
    checked (the URL's host goes on to TLS as the server name)."""

    def __init__(self, *, allow_private: bool, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._allow_private = allow_private
        self._inner = inner or httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if self._allow_private:
            return await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        last: Exception | None = None
        for address in await checked_addresses(host, port):
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None  # getaddrinfo answers at least one address or raises
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise RefusedUrl("callbackUrl: unix sockets are not callback destinations")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class CheckedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport whose connections go through `CheckedBackend`. httpx (0.28) takes no
    network backend, so its connection pool is replaced by one built the same way with it."""

    def __init__(self, *, limits: httpx.Limits, allow_private: bool) -> None:
        super().__init__(limits=limits)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=CheckedBackend(allow_private=allow_private),
        )


__all__ = [
    "CheckedBackend",
    "CheckedTransport",
    "RefusedUrl",
    "check_callback_url",
    "check_form",
    "checked_addresses",
    "refused_address",
]
