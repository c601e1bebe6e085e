"""Query images given by URL, fetched only where the operator allows it (``CLIP4CIR_ALLOW_IMAGE_URLS=1``) and only
from the public internet: a server that fetches what a request names could otherwise be made to read its own
network (SSRF). Every address the host name resolves to must be a public one; the connection goes to the address
that was checked (a second lookup could answer otherwise), no redirect is followed, and the body is read up to a
size and within a time."""
from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import ssl
import urllib.parse

from clip4cir.core.errors import SearchError

ALLOW_ENV = "CLIP4CIR_ALLOW_IMAGE_URLS"
MAX_BYTES = 20 * 2 ** 20  # as an upload
TIMEOUT = 10.0  # seconds for the connection and each read


def allowed() -> bool:
    """Whether this server fetches query images by URL (off unless the operator turns it on)."""
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")


def public_address(host: str, port: int) -> str:
    """An address ``host`` resolves to, when every one it resolves to is public; SearchError otherwise (a private,
    loopback, link-local, multicast or reserved address: the server's own network)."""
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError) as e:
        raise SearchError(f"image_url: the host {host!r} cannot be resolved ({e})") from None
    for address in sorted(found):
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise SearchError(f"image_url: {host!r} is not on the public internet ({ip}); this server fetches "
                              f"public images only")
    return sorted(found)[0]


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an address checked beforehand, the certificate checked against the URL's host name."""

    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to an address checked beforehand."""

    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


CONNECTIONS = {"http": (_PinnedHTTP, 80), "https": (_PinnedHTTPS, 443)}


def fetch_image_url(url: str, max_bytes: int = MAX_BYTES, timeout: float = TIMEOUT) -> bytes:
    """The bytes at ``url`` (http or https, a public host, no redirect, at most ``max_bytes``); SearchError naming
    what is wrong, before anything is fetched when the URL itself is."""
    if not allowed():
        raise SearchError(f"image_url is off on this server (its operator turns it on with {ALLOW_ENV}=1); send "
                          f"the image itself (base64)")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in CONNECTIONS or not parts.hostname:
        raise SearchError("image_url must be an http or https URL with a host")
    connection_class, default_port = CONNECTIONS[parts.scheme]
    port = parts.port or default_port
    connection = connection_class(parts.hostname, public_address(parts.hostname, port), port, timeout)
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
        data = response.read(max_bytes + 1)
    except (OSError, http.client.HTTPException) as e:
        raise SearchError(f"image_url could not be fetched: {type(e).__name__}: {e}") from None
    finally:
        connection.close()
    if len(data) > max_bytes:
        raise SearchError(f"image_url's image has more than the {max_bytes:,} bytes that are read")
    return data
