"""DNS lookups for the sender-identity and egress rules, through `dnspython`.

`MAILQUEUE_DNS_SERVERS` ("host" or "host:port", comma-separated as JSON) names the servers to
ask; empty means the system's resolver configuration (/etc/resolv.conf). Tests point it at a
local stub (tests/dns_stub.py), so every name they use resolves to what the test says.
"""

from __future__ import annotations

import dns.asyncresolver
import dns.exception
import dns.resolver

from mailqueue.config import Settings

LOOKUP_TIMEOUT_SECONDS = 5.0


class LookupFailed(Exception):
    """The name has no such records, or no server answered (the message says which, never more)."""


def _server(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if sep and port.isdigit() and host and not host.endswith(":"):  # "1.2.3.4:53"; a bare IPv6 has many colons
        return host.strip("[]"), int(port)
    return value.strip("[]"), 53


def resolver(settings: Settings) -> dns.asyncresolver.Resolver:
    if not settings.dns_servers:
        r = dns.asyncresolver.Resolver()
    else:
        r = dns.asyncresolver.Resolver(configure=False)
        servers = [_server(s) for s in settings.dns_servers]
        r.nameservers = [host for host, _ in servers]
        r.port = servers[0][1]  # dnspython takes one port for the plain nameserver list
    r.lifetime = LOOKUP_TIMEOUT_SECONDS
    return r


async def lookup(settings: Settings, name: str, rdtype: str) -> list[str]:
    """The records of one type for a name, as text (TXT strings joined and unquoted)."""
    try:
        answer = await resolver(settings).resolve(name, rdtype, search=False)
    except dns.resolver.NXDOMAIN:
        raise LookupFailed(f"{name} does not exist in DNS") from None
    except (dns.resolver.NoAnswer, dns.resolver.NoNameservers):
        raise LookupFailed(f"{name} has no {rdtype} record") from None
    except dns.exception.Timeout:
        raise LookupFailed(f"no DNS server answered for {name}") from None
    except dns.exception.DNSException as exc:
        raise LookupFailed(f"{name} could not be looked up ({type(exc).__name__})") from None
    if rdtype.upper() == "TXT":
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
    return [r.to_text() for r in answer]
