"""Which addresses a webhook may reach: public ones only, unless an allowlist says otherwise."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

MAX_URL_LENGTH = 2048
METADATA = frozenset(
    ipaddress.ip_address(a)
    # AWS (v4, v6), ECS task metadata, Alibaba, Oracle Cloud's legacy endpoint
    for a in (
        "169.254.169.254",
        "fd00:ec2::254",
        "169.254.170.2",
        "100.100.100.200",
        "192.0.0.192",
    )
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class UnsafeTargetError(ValueError):
    """A webhook URL that is malformed, unresolvable or points at a non-public address."""


class UnresolvableHostError(UnsafeTargetError):
    """The host has no addresses right now (refused at submit, retried at delivery)."""


@dataclass(frozen=True)
class Target:
    """A checked webhook URL and the addresses it may be connected to."""

    url: str
    host: str
    port: int
    addresses: tuple[str, ...]
    # Reached only because SEG_WEBHOOK_ALLOW_NETWORKS lists one of its addresses: an internal
    # service, whose answers the client who named it must not read (`delivery.deliver`).
    allowlisted: bool = False


def parse_networks(raw: str) -> tuple[IPNetwork, ...]:
    """The allowlist setting: comma-separated CIDRs (bad entries are a configuration error)."""
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in raw.split(",") if p.strip())


def refusal_reason(
    address: str | IPAddress, allow: Sequence[IPNetwork] = (), *, name_it: bool = True
) -> str | None:
    """Why `address` may not be a webhook target, or None when it may. `name_it=False` leaves
    out the IPv4 address an IPv6 one embeds (for a host name's addresses, which the client
    is not told)."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    plain = _unwrap(ip)
    # Never a cloud metadata address, whatever the allowlist says: allowing fd00::/8 (a VPC's
    # ULA range) would otherwise open fd00:ec2::254, and the instance's credentials with it.
    metadata = ip in METADATA or plain in METADATA
    if not metadata and any(ip in net or plain in net for net in allow):
        return None
    if plain is not ip and plain.version == 4 and ip.version == 6:
        inner = refusal_reason(plain)
        if not inner:
            return None
        return (
            f"an IPv6 address embedding {plain} ({inner})"
            if name_it
            else f"an IPv6 address embedding {inner}"
        )
    return _category(ip)


def _unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (mapped, NAT64, 6to4, Teredo), else itself."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return ip


def _category(ip: IPAddress) -> str | None:
    checks = (
        (ip in METADATA, "a cloud metadata address"),
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_private, "a private address"),
        # Deprecated IPv6 site-local space (fec0::/10): neither private nor reserved to Python
        # 3.11, yet routed inside some networks still.
        (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local, "a site-local address"),
        (ip.is_reserved, "a reserved address"),
        (not ip.is_global, "a non-public address"),
    )
    return next((why for hit, why in checks if hit), None)


# A lookup of a client-chosen host name waits at most this long: a domain whose name servers
# never answer would otherwise hold an API request (and its pooled database connection) or a
# delivery thread for as long as the system resolver keeps retrying.
RESOLVE_TIMEOUT_S = 5.0
# A host whose lookup timed out, and still hangs, is answered at once for this long: a client
# pointing its webhooks at a domain whose name servers drop queries held a request thread 5 s
# per submit (ten a second at its rate: two API pods' threads) and left a lookup thread behind
# each. A lookup that answers late (a dropped packet retried) is forgotten as it answers.
# Names of their own under that domain (a1., a2.) are not covered: each is looked up once.
TIMED_OUT_MEMORY_S = 60.0
_timed_out: dict[str, float] = {}  # host -> when its lookup last timed out (monotonic)
_timed_out_lock = threading.Lock()


def resolve(host: str, port: int, *, timeout: float = RESOLVE_TIMEOUT_S) -> list[str]:
    """Every address `host` resolves to (TCP), in resolver order, without duplicates; an
    OSError (TimeoutError) once the lookup takes over `timeout` seconds.

    getaddrinfo cannot be interrupted, so each lookup runs in a daemon thread of its own and
    the caller stops waiting for it: a lookup left hanging holds only its own thread (until
    the resolver gives up), never a shared pool that every other host's lookup would queue
    behind."""
    name = host.lower().rstrip(".")  # one memory for `Hook.example.` and `hook.example`
    with _timed_out_lock:
        since = _timed_out.get(name)
        if since is not None and time.monotonic() - since < TIMED_OUT_MEMORY_S:
            raise TimeoutError(
                f"resolving {host!r} took over {timeout:g} s less than {TIMED_OUT_MEMORY_S:g} s ago"
            )
    found: list[Any] = []
    failed: list[BaseException] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
            with _timed_out_lock:  # answered after all (a retried packet): forgotten at once
                _timed_out.pop(name, None)
        except BaseException as exc:  # handed to the caller, if it still waits
            failed.append(exc)
        finally:
            done.set()

    threading.Thread(target=lookup, name="seg-dns", daemon=True).start()
    if not done.wait(timeout):
        with _timed_out_lock:
            if not done.is_set():  # still hanging (not answered since the wait ended)
                _timed_out[name] = time.monotonic()
            if len(_timed_out) > 10_000:  # many hosts: the oldest memories go first
                for stale in sorted(_timed_out, key=_timed_out.__getitem__)[:5_000]:
                    del _timed_out[stale]
        raise TimeoutError(f"resolving {host!r} took over {timeout:g} s")
    if failed:
        raise failed[0]
    return list(dict.fromkeys(str(info[4][0]).split("%", 1)[0] for info in found))


def check_url(url: str, *, allow: Sequence[IPNetwork] = (), resolver: Resolver = resolve) -> Target:
    """Parse, resolve once and check every address; connect only to what this returns."""
    # Bytes as stored (UTF-8), not characters: the URL is indexed in webhook_endpoints, and
    # Postgres refuses an index entry over ~2.7 kB (2000 CJK characters are 6000 bytes).
    size = len(url.encode("utf-8", "surrogatepass"))  # a lone surrogate: malformed, below
    if size > MAX_URL_LENGTH:
        raise UnsafeTargetError(
            f"The webhook URL is {size} bytes long in UTF-8; the limit is {MAX_URL_LENGTH}."
        )
    try:  # httpx parses it here exactly as it will when sending (no parser differential)
        parts = httpx.URL(url)
        host = parts.raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise UnsafeTargetError(f"The webhook URL is malformed: {exc}.") from None
    if parts.scheme not in ("http", "https") or not host:
        raise UnsafeTargetError("The webhook must be an absolute http:// or https:// URL.")
    default = 443 if parts.scheme == "https" else 80
    port = default if parts.port is None else parts.port  # an explicit :0 stays 0 (refused)
    if not 0 < port < 65536:
        raise UnsafeTargetError(f"The webhook URL's port {port} is out of range.")
    # A host name is refused with one message whatever the reason (no answer, no addresses,
    # a private, loopback or metadata one): telling them apart, or echoing what a name
    # resolves to, would let any client map the service's internal DNS.
    refused = f"The webhook host {host!r} does not resolve to a public address; webhooks may "
    refused += "only target public addresses."
    try:
        addresses = resolver(host, port)
    except (OSError, UnicodeError):
        raise UnresolvableHostError(refused) from None
    if not addresses:
        raise UnresolvableHostError(refused)
    for address in addresses:
        literal = address == host.strip("[]")  # the URL named the address: it may be told
        why = refusal_reason(address, allow)
        if why and literal:
            raise UnsafeTargetError(
                f"The webhook host {host!r} is {why}; webhooks may only target public addresses."
            )
        if why:
            raise UnsafeTargetError(refused)
    allowlisted = bool(allow) and any(refusal_reason(a) for a in addresses)
    return Target(
        url=url, host=host, port=port, addresses=tuple(addresses), allowlisted=allowlisted
    )


def loggable_url(url: str) -> str:
    """`url` for a log line: without the user:password and the query, where clients put the
    receiver's credentials and tokens."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
