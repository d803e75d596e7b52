"""Which address a request really comes from, and whether that address may use a key.

Behind a load balancer the TCP peer is the proxy, and the client is somewhere in
`X-Forwarded-For` — a header any client can also write. So the header is believed only when
the peer is a proxy we trust, and then only up to the first hop we do not trust: everything
left of that hop was written by someone we cannot vouch for. IPv4-mapped IPv6 addresses
(`::ffff:1.2.3.4`, what dual-stack sockets report) are folded to IPv4 everywhere, so one
allowlist entry covers both spellings.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(text: str | None) -> IPAddress | None:
    """An address from a peer or header entry (`1.2.3.4`, `::1`, `1.2.3.4:80`, `[::1]:80`)."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        text = host
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            return None
        text = host
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    return _fold(addr)


def _fold(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _fold_network(net: IPNetwork) -> IPNetwork:
    mapped = getattr(net.network_address, "ipv4_mapped", None)
    if mapped is not None and net.prefixlen >= 96:
        return ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
    return net


def parse_cidrs(cidrs: Iterable[str]) -> list[IPNetwork]:
    """Networks from CIDR strings (host bits allowed); ValueError names the first bad one."""
    networks: list[IPNetwork] = []
    for cidr in cidrs:
        try:
            net = ipaddress.ip_network(str(cidr).strip(), strict=False)
        except ValueError:
            raise ValueError(f"invalid CIDR {cidr!r}") from None
        networks.append(_fold_network(net))
    return networks


def _in_any(addr: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    return any(addr in net for net in networks)


def client_ip(
    peer: str | None, forwarded_for: str | None, trusted_proxies: Sequence[IPNetwork]
) -> str | None:
    """The client address: the peer, or the first untrusted hop of XFF counted from the right.

    A malformed XFF entry means the chain cannot be followed, so the answer is the peer.
    """
    peer_addr = parse_ip(peer)
    if peer_addr is None:
        return peer
    if not forwarded_for or not _in_any(peer_addr, trusted_proxies):
        return str(peer_addr)
    hops: list[IPAddress] = []
    for entry in forwarded_for.split(","):
        addr = parse_ip(entry)
        if addr is None:
            return str(peer_addr)
        hops.append(addr)
    for addr in reversed(hops):
        if not _in_any(addr, trusted_proxies):
            return str(addr)
    return str(hops[0])


class Allowlist:
    """CIDRs a key may be used from; an empty list allows every address."""

    def __init__(self, cidrs: Iterable[str | IPNetwork] = ()) -> None:
        self.networks: list[IPNetwork] = [
            _fold_network(c) if isinstance(c, IPNetwork) else parse_cidrs([c])[0] for c in cidrs
        ]

    def __bool__(self) -> bool:
        return bool(self.networks)

    def allows(self, ip: str | None) -> bool:
        """Whether `ip` is inside one of the networks; an unknown address is refused."""
        if not self.networks:
            return True
        addr = parse_ip(ip)
        return addr is not None and _in_any(addr, self.networks)
