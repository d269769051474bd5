"""The egress policy: where a user can make mailqueue connect, checked at the door and again at connect time.

A destination a user can name or influence (their SMTP server; provider base URLs; later webhook
URLs) must resolve to public addresses only, and an SMTP server must listen on a mail port.
`check_destination` answers with the addresses that passed, and callers connect to exactly those
(never to the name again): a name that resolves to a public address at the check and to a
private one a moment later (DNS rebinding) cannot redirect the connection.

Host literals are read the way the operating system reads them, so that no spelling of a
forbidden address slips through: dotted quads, IPv6 (with or without brackets), and the legacy
IPv4 forms `inet_aton` accepts (`2130706433`, `0177.0.0.1`, `0x7f.1`, `127.1`, `0`). IPv6 that
embeds an IPv4 address (mapped, compatible, 6to4, NAT64) is judged by the address it embeds.

`MAILQUEUE_EGRESS_ALLOW` lifts both the address and the port rule, for development and tests:
a CIDR entry for the addresses in it, a name entry for exactly that name as the user wrote it
(case aside). So `localhost` allowed keeps `127.0.0.1`, `2130706433`, `localhost.` and any
other name that resolves to 127.0.0.1 refused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from enum import StrEnum
from typing import Protocol

from mailqueue.config import Settings
from mailqueue.models import SenderSettings
from mailqueue.resolver import LookupFailed, lookup

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

HTTP_PORTS = (80, 443)


class Kind(StrEnum):
    """What will be spoken to the destination: it decides the ports allowed."""

    SMTP = "smtp"
    HTTP = "http"


class DestinationRefused(Exception):
    """The policy forbids this destination. `reason` says which rule, never more (not the
    addresses a name resolved to); `part` is what it concerns: "host" or "port"."""

    def __init__(self, reason: str, *, part: str = "host") -> None:
        super().__init__(reason)
        self.reason = reason
        self.part = part


class NotResolved(DestinationRefused):
    """The name has no address (or no DNS server answered): refused at the door; at send time
    an unreachable server, since DNS may answer again later."""


class Destination(Protocol):
    """`check_destination` with the settings and the kind bound: what drivers are given."""

    async def __call__(self, host: str, port: int) -> list[IPAddress]: ...


# Addresses never connected to, most specific first: the first match names the reason.
_RULES: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = [
    (ipaddress.ip_network(net), reason)
    for net, reason in [
        ("169.254.169.254/32", "a cloud metadata address"),  # AWS, GCP, Azure, OpenStack...
        ("100.100.100.200/32", "a cloud metadata address"),  # Alibaba Cloud
        ("fd00:ec2::254/128", "a cloud metadata address"),  # AWS over IPv6
        ("0.0.0.0/8", "an unspecified address"),  # "this network": connecting to it reaches this host
        ("::/128", "an unspecified address"),
        ("127.0.0.0/8", "a loopback address"),
        ("::1/128", "a loopback address"),
        ("10.0.0.0/8", "a private address"),
        ("172.16.0.0/12", "a private address"),
        ("192.168.0.0/16", "a private address"),
        ("fc00::/7", "a private address"),
        ("fec0::/10", "a private address"),  # the deprecated site-local range
        ("100.64.0.0/10", "a shared (CGNAT) address"),
        ("169.254.0.0/16", "a link-local address"),
        ("fe80::/10", "a link-local address"),
        ("224.0.0.0/4", "a multicast address"),
        ("ff00::/8", "a multicast address"),
        ("192.0.2.0/24", "a documentation address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("2001:db8::/32", "a documentation address"),
        ("3fff::/20", "a documentation address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("2001:2::/48", "a benchmarking address"),
        ("255.255.255.255/32", "a broadcast address"),
        ("240.0.0.0/4", "a reserved address"),
        ("192.0.0.0/24", "a reserved address"),  # IETF protocol assignments
        ("192.88.99.0/24", "a reserved address"),  # the retired 6to4 relay anycast
        ("100::/64", "a reserved address"),  # discard-only
        ("2001::/23", "a reserved address"),  # IETF protocol assignments (Teredo among them)
        ("64:ff9b:1::/48", "a reserved address"),  # local-use NAT64: where it embeds IPv4 is the network's choice
    ]
]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible IPv6
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT IPv4-translated

# Names that are local by definition (RFC 6761, 6762, 8375; ICANN's .internal) or that cloud
# platforms answer with their metadata service.
_LOCAL_SUFFIXES = ("localhost", "local", "localdomain", "internal", "home.arpa", "lan", "intranet")
_METADATA_NAMES = {"metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal"}
# The legacy IPv4 spellings inet_aton reads: digits, dots and hex.
_LEGACY_V4 = re.compile(r"^[0-9a-fA-FxX.]+$")
_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def parse_literal(host: str) -> IPAddress | None:
    """The address a host string means when it is an address literal (in any notation the
    system's resolver would accept), else None."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text.endswith("."):
        text = text[:-1]  # a trailing dot (a fully qualified spelling) means the same address
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    # `inet_aton` reads 2130706433, 0177.0.0.1, 0x7f.1, 127.1 and 0 as IPv4, as getaddrinfo does.
    # Only on strings of its own alphabet: glibc's inet_aton ignores anything after a space.
    if _LEGACY_V4.match(text) and any(c.isdigit() for c in text):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def forbidden(ip: IPAddress) -> str | None:
    """Why an address may not be connected to ("a loopback address"), or None when it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(ip.packed)
        embedded = _embedded_v4(ip)
        if embedded is not None:
            return forbidden(embedded) or (None if ip.ipv4_mapped or ip in _NAT64 or ip.sixtofour else "a reserved address")
    for net, reason in _RULES:
        if ip in net:
            return reason
    if not ip.is_global:
        return "not a public address"
    return None


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv6 one that carries it (mapped, translated, compatible, 6to4, NAT64)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or ip in _TRANSLATED or (ip in _COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(ip.packed[-4:])
    return None


def _allow_list(settings: Settings) -> tuple[set[str], list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    """MAILQUEUE_EGRESS_ALLOW read as (exact names, lowercased; networks)."""
    names, nets = set(), []
    for entry in (e.strip() for e in settings.egress_allow):
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            names.add(entry.lower())
    return names, nets


def _name_problem(name: str) -> str | None:
    """Why a host name is refused before any lookup, or None."""
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        return "is not a valid host name or IP address"
    if name in _METADATA_NAMES:
        return "is a cloud metadata name"
    if any(name == s or name.endswith("." + s) for s in _LOCAL_SUFFIXES):
        return "is a local name"
    if "." not in name:
        return "is not a fully qualified domain name"  # a search-domain name: a neighbour such as `postgresql`
    if name.rsplit(".", 1)[1].isdigit():
        return "is not a valid host name or IP address"  # an all-numeric top-level label: a mangled address
    return None


async def _resolve(settings: Settings, name: str, *, allowed: bool) -> list[IPAddress]:
    """A and AAAA records (IPv4 first: the order connections are tried in)."""
    answers = await asyncio.gather(lookup(settings, name, "A"), lookup(settings, name, "AAAA"), return_exceptions=True)
    for answer in answers:
        if isinstance(answer, BaseException) and not isinstance(answer, LookupFailed):
            raise answer
    failures = [a for a in answers if isinstance(a, LookupFailed)]
    addresses: list[IPAddress] = [ipaddress.ip_address(v) for a in answers if isinstance(a, list) for v in a]
    if not addresses and allowed:
        # A name the operator allowed may live only in the hosts file (localhost in `make dev`).
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except OSError:
            infos = []
        seen = [ipaddress.ip_address(info[4][0]) for info in infos]
        addresses = sorted(dict.fromkeys(seen), key=lambda ip: ip.version)
    if not addresses:
        timed_out = any("no DNS server answered" in str(f) for f in failures)
        raise NotResolved("could not be looked up (no DNS server answered)" if timed_out else "does not resolve to any address")
    return addresses


def _check_port(settings: Settings, port: int, kind: Kind) -> None:
    ports = settings.egress_smtp_ports if kind is Kind.SMTP else HTTP_PORTS
    if port not in ports:
        listed = ", ".join(str(p) for p in sorted(ports))
        what = "an SMTP port" if kind is Kind.SMTP else "an HTTP port"
        raise DestinationRefused(f"port {port} is not {what} (allowed: {listed})", part="port")


async def check_destination(settings: Settings, host: str, port: int, *, kind: Kind) -> list[IPAddress]:
    """The addresses to connect to for host:port, all of them allowed; else DestinationRefused
    (NotResolved when the name has no address). Callers connect to these, in order, and to
    nothing else."""
    host = host.strip()
    if not host:
        raise DestinationRefused("is empty")
    allowed_names, allowed_nets = _allow_list(settings)
    if host.lower() in allowed_names:
        literal = parse_literal(host)
        return [literal] if literal is not None else await _resolve(settings, host.rstrip("."), allowed=True)
    literal = parse_literal(host)
    if literal is not None:
        addresses, resolved = [literal], False
    else:
        name = host.lower().removesuffix(".")
        if problem := _name_problem(name):
            raise DestinationRefused(problem)
        addresses, resolved = await _resolve(settings, name, allowed=False), True
    lifted = True
    for ip in addresses:
        if any(ip.version == net.version and ip in net for net in allowed_nets):
            continue
        lifted = False
        if reason := forbidden(ip):
            # A name's addresses stay unsaid: the class of the first forbidden one is enough.
            raise DestinationRefused(f"resolves to {reason}" if resolved else f"is {reason}")
    if not lifted:
        _check_port(settings, port, kind)
    return addresses


def plaintext_auth_allowed(settings: Settings, host: str) -> bool:
    """Whether the operator lets AUTH go to this SMTP host without TLS (MAILQUEUE_SMTP_PLAINTEXT_AUTH_HOSTS, exact names)."""
    return host.strip().lower() in {h.strip().lower() for h in settings.smtp_plaintext_auth_hosts}


# What each stored secret was given for: the server (and login) it may be sent to. A change to
# any of these clears it unless the same change supplies it again.
SECRET_DESTINATIONS: dict[str, tuple[str, ...]] = {
    "smtp_password_enc": ("smtp_host", "smtp_port", "smtp_username", "smtp_security"),
    "api_key_enc": ("driver",),
    "api_secret_enc": ("driver",),
    # Never sent anywhere: it checks what the user's Mailgun sends us, whichever driver sends their mail.
    "mailgun_webhook_signing_key_enc": (),
}


def secret_binding(row: SenderSettings, column: str) -> tuple[object, ...]:
    """Where a sender's stored secret may go, as its settings row says now (defaults applied,
    host names compared as DNS does: case and a trailing dot aside)."""
    values: list[object] = []
    for name in SECRET_DESTINATIONS[column]:
        value = getattr(row, name)
        if name == "smtp_host" and value:
            value = value.strip().lower().removesuffix(".")
        elif name == "smtp_port":
            value = value or 587
        elif name == "smtp_security":
            value = value or "starttls"
        values.append(value)
    return tuple(values)


def destination(settings: Settings, kind: Kind) -> Destination:
    """check_destination bound to the settings and a kind, for a driver to call at connect time."""

    async def check(host: str, port: int) -> list[IPAddress]:
        return await check_destination(settings, host, port, kind=kind)

    return check
