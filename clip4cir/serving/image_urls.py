"""Query images given by URL, fetched only where the operator allows it (``CLIP4CIR_ALLOW_IMAGE_URLS=1``) and only
from the public internet: a server that fetches what a request names could otherwise be made to read its own
network (SSRF). Every address the host name resolves to must be a public one (also the IPv4 address an IPv6 one
carries); the connection goes to the addresses that were checked (a second lookup could answer otherwise), no
redirect is followed, and the body is read up to a size and within a time (10 s for the whole body; each socket
operation within it too; the name lookup is the system resolver's)."""
from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import ssl
import time
import urllib.parse

from clip4cir.core.errors import SearchError

ALLOW_ENV = "CLIP4CIR_ALLOW_IMAGE_URLS"
MAX_BYTES = 20 * 2 ** 20  # as an upload
TIMEOUT = 10.0  # seconds for the connection and each read


def allowed() -> bool:
    """Whether this server fetches query images by URL (off unless the operator turns it on)."""
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")


NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A global unicast address, also for the IPv4 address an IPv6 one carries (mapped, 6to4, NAT64, Teredo)."""
    if not ip.is_global or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in NAT64):
            return is_public(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        carried = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if carried is not None:
            return is_public(carried)
    return True


def public_addresses(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to, in the resolver's order, when every one of them is public; SearchError
    otherwise (a private, loopback, link-local, multicast or reserved address, also one inside an IPv6 address:
    the server's own network)."""
    try:
        found = list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))
    except (socket.gaierror, UnicodeError, ValueError) as e:
        raise SearchError(f"image_url: the host {host!r} cannot be resolved ({e})") from None
    for address in found:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not is_public(ip):
            raise SearchError(f"image_url: {host!r} is not on the public internet ({ip}); this server fetches "
                              f"public images only")
    return found


def _connect(addresses: list[str], port: int, timeout: float) -> socket.socket:
    """A connection to the first of the checked addresses that answers."""
    error: OSError | None = None
    for address in addresses:
        try:
            return socket.create_connection((address, port), timeout)
        except OSError as e:
            error = e
    raise error or OSError("no address")


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an address checked beforehand, the certificate checked against the URL's host name."""

    def __init__(self, host: str, addresses: list[str], port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._addresses = addresses

    def connect(self) -> None:
        self.sock = self._context.wrap_socket(_connect(self._addresses, self.port, self.timeout),
                                              server_hostname=self.host)


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to an address checked beforehand."""

    def __init__(self, host: str, addresses: list[str], port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._addresses = addresses

    def connect(self) -> None:
        self.sock = _connect(self._addresses, self.port, self.timeout)


CONNECTIONS = {"http": (_PinnedHTTP, 80), "https": (_PinnedHTTPS, 443)}


def fetch_image_url(url: str, max_bytes: int = MAX_BYTES, timeout: float = TIMEOUT) -> bytes:
    """The bytes at ``url`` (http or https, a public host, no redirect, at most ``max_bytes``); SearchError naming
    what is wrong, before anything is fetched when the URL itself is."""
    if not allowed():
        raise SearchError(f"image_url is off on this server (its operator turns it on with {ALLOW_ENV}=1); send "
                          f"the image itself (base64)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise SearchError(f"image_url is not a URL ({e})") from None
    if parts.scheme not in CONNECTIONS or not parts.hostname:
        raise SearchError("image_url must be an http or https URL with a host")
    connection_class, default_port = CONNECTIONS[parts.scheme]
    port = port or default_port
    deadline = time.monotonic() + timeout
    connection = connection_class(parts.hostname, public_addresses(parts.hostname, port), port, timeout)
    try:
        connection.request("GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")),
                           headers={"User-Agent": "clip4cir", "Accept": "image/*"})
        response = connection.getresponse()
        if response.status != 200:
            raise SearchError(f"image_url answered {response.status} {response.reason} (redirects are not "
                              f"followed)")
        declared = response.getheader("Content-Length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise SearchError(f"image_url's image has {int(declared):,} bytes; at most {max_bytes:,} are read")
        chunks, size = [], 0
        while size <= max_bytes:
            if time.monotonic() > deadline:
                raise SearchError(f"image_url took longer than {timeout:g} s to send its image")
            chunk = response.read1(64 * 1024)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except (OSError, http.client.HTTPException) as e:
        raise SearchError(f"image_url could not be fetched: {type(e).__name__}: {e}") from None
    finally:
        connection.close()
    if size > max_bytes:
        raise SearchError(f"image_url's image has more than the {max_bytes:,} bytes that are read")
    return b"".join(chunks)
