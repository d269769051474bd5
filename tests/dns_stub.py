"""A local DNS server for tests: answers A, AAAA and TXT from a table the test fills in.

The stack's `dns_servers` points here, so domain verification (TXT) and the egress policy's
name checks (A/AAAA) see exactly the records a test sets, with no network. Unknown names get
NXDOMAIN; `localhost` answers 127.0.0.1 and ::1 as a real resolver's hosts file would.
"""

from __future__ import annotations

import socket
import threading
from collections import defaultdict

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class DnsStub:
    def __init__(self) -> None:
        self._records: dict[tuple[str, str], list[str]] = defaultdict(list)
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)  # so that the thread sees a stop request
        self.port: int = self._sock.getsockname()[1]
        self.queries: list[tuple[str, str]] = []  # (name, type) asked, in order
        self._thread = threading.Thread(target=self._serve, name="dns-stub", daemon=True)
        self._stopped = False
        self.add("localhost", "A", "127.0.0.1")
        self.add("localhost", "AAAA", "::1")

    @property
    def server(self) -> str:
        """The value for `dns_servers`."""
        return f"127.0.0.1:{self.port}"

    @staticmethod
    def _key(name: str, rdtype: str) -> tuple[str, str]:
        return name.lower().rstrip("."), rdtype.upper()

    def add(self, name: str, rdtype: str, value: str) -> None:
        """One more record: add("evil.test", "A", "127.0.0.1"), add("_mailqueue.x.org", "TXT", "token")."""
        with self._lock:
            self._records[self._key(name, rdtype)].append(value)

    def set(self, name: str, rdtype: str, *values: str) -> None:
        """Replace a name's records of one type (none: remove them)."""
        with self._lock:
            self._records[self._key(name, rdtype)] = list(values)

    def _answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - garbage on the port: ignore it as a server would
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append(self._key(name, rdtype))
        with self._lock:
            values = list(self._records.get(self._key(name, rdtype), []))
            known = any(key[0] == self._key(name, rdtype)[0] and vals for key, vals in self._records.items())
        if values:
            if rdtype == "TXT":  # one string holds at most 255 bytes: a longer value (a DKIM key) is split, as DNS consoles do
                values = [" ".join(_quoted(v[i:i + 255]) for i in range(0, max(len(v), 1), 255)) for v in values]
            response.answer.append(dns.rrset.from_text_list(question.name, 60, dns.rdataclass.IN, question.rdtype, values))
        elif not known:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    def _serve(self) -> None:
        while not self._stopped:
            try:
                wire, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            answer = self._answer(wire)
            if answer is not None:
                try:
                    self._sock.sendto(answer, peer)
                except OSError:
                    pass

    def __enter__(self) -> DnsStub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped = True
        self._thread.join(timeout=5)
        self._sock.close()
