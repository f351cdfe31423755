"""Who an HTTP caller is, and what [access] lets it do: the DIMSE rules applied to HTTP.

An HTTP caller is named by `[web] users` (HTTP Basic user and password, or a Bearer token
whose SHA-256 is listed); [access] lists those names beside AE titles, with the same
roles: query (QIDO-RS, the status page), retrieve (WADO-RS), store (STOW-RS). A caller
without credentials is nameless: like an unlisted AE title it may store, and use the rest
only from the node's own host while `local_callers` holds. Wrong credentials are refused
outright (401), never taken as nameless.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from dataclasses import dataclass

from compacs.service.config import Access

_LOOPBACK = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
CHALLENGE = 'Basic realm="compacs", charset="UTF-8", Bearer realm="compacs"'


@dataclass(frozen=True)
class Refusal(Exception):
    status: int  # 401: who are you; 403: known, not allowed
    message: str


def caller_name(authorization: str | None, users: dict[str, str]) -> str:
    """The [web] users name the Authorization header proves, "" without one; raises
    Refusal(401) for credentials that prove nothing."""
    if not authorization:
        return ""
    scheme, _, value = authorization.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        try:
            user, sep, password = base64.b64decode(value.strip()).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise Refusal(
                401, "Authorization: Basic value is not base64 of user:password"
            ) from None
        expected = users.get(user)
        if sep and expected is not None and _matches(password, expected):
            return user
        raise Refusal(401, f"wrong user name or password for {user!r} ([web] users)")
    if scheme == "bearer":
        for name, expected in users.items():
            if _matches(value.strip(), expected):
                return name
        raise Refusal(401, "unknown bearer token ([web] users)")
    raise Refusal(401, f"Authorization scheme {scheme!r}: use Basic or Bearer")


def _matches(secret: str, expected: str) -> bool:
    digest = "sha256:" + hashlib.sha256(secret.encode("utf-8")).hexdigest()
    return hmac.compare_digest(digest, expected)


def is_local(client: str | None, server: str | None) -> bool:
    """As dimse/scp.is_local: from 127.0.0.1 or ::1, or from the very address the caller
    connected to (a process here reaching the node by the host's own address)."""
    try:
        peer = _plain(ipaddress.ip_address(client or ""))
    except ValueError:
        return False
    if peer in _LOOPBACK:
        return True
    try:
        own = _plain(ipaddress.ip_address(server or ""))
    except ValueError:
        return False
    return own == peer and not own.is_unspecified


def _plain(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> object:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def check(access: Access, service: str, name: str, host: str, local: bool) -> None:
    """Raise Refusal unless `name` (from `host`) may use `service`."""
    if access.allows(service, name, host, local):
        return
    if not name:
        raise Refusal(
            401,
            f"{service} needs credentials: a [web] users name listed in [access] {service}",
        )
    raise Refusal(403, f"{name!r} is not listed in the node's [access] {service}")
