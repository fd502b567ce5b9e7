"""Which image URLs the server accepts: base64 `data:` URLs always; http(s) only when the operator allows it.

For http(s) the host must be on the allow-list, every address it resolves to must be public (no private, loopback,
link-local, multicast, reserved or unspecified address), and the connection goes to the checked address (pinned,
with the original Host header and TLS server name) so a second DNS answer cannot redirect it. Redirects are
followed by hand, each hop checked again; the body is capped at `max_bytes`.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

from smolvlm.errors import ImageError

MAX_REDIRECTS = 3


@dataclass
class ImagePolicy:
    """The operator's image-URL policy."""

    allow_http: bool = False
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)  # "example.com", "*.example.com" or "*"
    max_bytes: int = 10 * 2**20
    timeout: float = 10.0


def check_data_url(url: str, max_bytes: int) -> bytes:
    """Decode a `data:image/...;base64,` URL, refusing other media types and payloads above `max_bytes`."""
    header, comma, payload = url.partition(",")
    media = header[len("data:") :].split(";")[0].strip().lower()
    if not comma or ";base64" not in header.lower():
        raise ImageError("image data: URLs must be base64 encoded: data:image/png;base64,...")
    if media and not media.startswith("image/"):
        raise ImageError(f"data: URL has media type {media!r}, not an image; send data:image/png;base64,...")
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageError(f"image data: URL is larger than the limit of {max_bytes} bytes; send a smaller image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"invalid base64 in image data: URL ({e})") from e


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Exact names, `*.domain` suffixes, or `*` for any host."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry == "*" or entry == host or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True only for globally routable unicast addresses (IPv4-mapped IPv6 is judged as IPv4)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not (
        address.is_private or address.is_loopback or address.is_link_local or address.is_multicast
        or address.is_reserved or address.is_unspecified
    )  # fmt: skip


def public_addresses(host: str, port: int) -> list[str]:
    """Resolve `host`; every address must be public, else ImageError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ImageError(f"image URL host {host!r} does not resolve ({e})") from e
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise ImageError(f"image URL host {host!r} has no address")
    for address in addresses:
        if not is_public(ipaddress.ip_address(address.split("%")[0])):
            raise ImageError(
                f"image URL host {host!r} resolves to {address}, a private, loopback or link-local address; "
                "only public hosts may be fetched"
            )
    return addresses


def fetch_image(url: str, policy: ImagePolicy) -> bytes:
    """Download an http(s) image under `policy` (see the module docstring)."""
    import httpx

    for _ in range(MAX_REDIRECTS + 1):
        parts = _checked_parts(url, policy)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        address = public_addresses(host, port)[0]
        pinned = f"[{address}]" if ":" in address else address
        target = parts._replace(netloc=f"{pinned}:{port}").geturl()
        headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*"}
        extensions: dict[str, Any] = {"sni_hostname": host} if parts.scheme == "https" else {}
        try:
            with httpx.Client(timeout=policy.timeout, follow_redirects=False, trust_env=False) as client:
                with client.stream("GET", target, headers=headers, extensions=extensions) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise ImageError(f"image URL {url[:200]} answered HTTP {response.status_code}")
                    return _read_capped(response, policy.max_bytes, url)
        except httpx.HTTPError as e:
            raise ImageError(f"cannot fetch image URL {url[:200]} ({type(e).__name__}: {e})") from e
    raise ImageError(f"image URL {url[:200]} redirects more than {MAX_REDIRECTS} times")


def _checked_parts(url: str, policy: ImagePolicy) -> Any:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImageError(f"image URL {url[:200]!r} is not an http(s) URL")
    if not host_allowed(parts.hostname, policy.allowed_hosts):
        raise ImageError(f"image host {parts.hostname!r} is not on this server's allow-list")
    return parts


def _read_capped(response: Any, max_bytes: int, url: str) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ImageError(f"image at {url[:200]} is {declared} bytes, above the limit of {max_bytes}")
    data = bytearray()
    for piece in response.iter_bytes():
        data += piece
        if len(data) > max_bytes:
            raise ImageError(f"image at {url[:200]} is larger than the limit of {max_bytes} bytes")
    return bytes(data)


def resolve_image_urls(messages: list[dict[str, Any]], policy: ImagePolicy) -> list[dict[str, Any]]:
    """Replace every `image_url` part by an image part holding bytes, applying the policy (raises ImageError)."""
    resolved = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            message = {**message, "content": [_resolve_part(part, policy) for part in content]}
        resolved.append(message)
    return resolved


def _resolve_part(part: dict[str, Any], policy: ImagePolicy) -> dict[str, Any]:
    if part.get("type") != "image_url":
        return part
    url = str(part.get("image_url", {}).get("url", "")).strip()
    if url.startswith("data:"):
        return {"type": "image", "image": check_data_url(url, policy.max_bytes)}
    if url.lower().startswith(("http://", "https://")):
        if not policy.allow_http:
            raise ImageError(
                "http(s) image URLs are turned off on this server; send the image as a data: URL "
                "(data:image/png;base64,...) or ask the operator to allow image hosts"
            )
        return {"type": "image", "image": fetch_image(url, policy)}
    raise ImageError(f"unsupported image URL {url[:40]!r}: use a data:image/...;base64 URL or an http(s) URL")
