"""Which callback URLs the service will POST to (server-side request forgery).

A callback URL is chosen by the client, and the service POSTs from inside the deployment's
network: without limits, a client could make it reach the cloud's metadata endpoint, an admin
port on loopback or a service on the private network. So a URL must be `https` (`http` only with
`[callbacks].allow_http`), carry no credentials, and every address its host resolves to must be
public: loopback, link-local (which holds the metadata endpoints 169.254.169.254 and
fd00:ec2::254's neighbours), private, shared (100.64/10), unspecified, multicast and reserved
addresses are refused unless `[callbacks].allow_private`. The check runs when the request is
accepted (a 400 naming the rule) and again before every try: a name that resolved to a public
address then may resolve to a private one later (DNS rebinding). The HTTP client resolves the
name once more itself to connect; that last window is not closed here (doing so means
connecting to the checked address, which this client does not offer).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

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


async def check_callback_url(url: str, *, allow_http: bool, allow_private: bool) -> None:
    """Raise `RefusedUrl` (a 400) unless the service may POST to `url` (see the module)."""
    host, port = check_form(url, allow_http=allow_http)
    if allow_private:
        return
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise RefusedUrl(f"callbackUrl: the host {shown(host)} does not resolve ({exc.strerror or exc})") from None
    for info in infos:
        address = str(info[4][0])
        why = refused_address(address)
        if why is not None:
            raise RefusedUrl(
                f"callbackUrl: {shown(host)} resolves to a {why} address ({address}); such addresses are "
                "refused unless [callbacks].allow_private = true"
            )


__all__ = ["RefusedUrl", "check_callback_url", "check_form", "refused_address"]
