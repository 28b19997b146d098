"""The SSRF address validator, as pure functions: no packet leaves this machine."""

from __future__ import annotations

from typing import Any

import pytest

from segsvc.webhooks.ssrf import (
    MAX_URL_LENGTH,
    UnresolvableHostError,
    UnsafeTargetError,
    check_url,
    parse_networks,
    refusal_reason,
)

LOOPBACK = parse_networks("127.0.0.0/8,::1/128")


def fake_dns(*addresses: str):  # type: ignore[no-untyped-def]
    return lambda _host, _port: list(addresses)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.0.0.1", "private"),
        ("192.168.1.1", "private"),
        ("172.16.5.4", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("192.0.0.192", "cloud metadata"),  # Oracle Cloud's legacy endpoint
        ("100.100.100.200", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fd00::1", "private"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("100.64.0.1", "non-public"),
        ("240.0.0.1", "private"),
        ("::ffff:10.0.0.1", "embedding 10.0.0.1"),
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("64:ff9b::a00:1", "embedding 10.0.0.1"),
        ("2002:c0a8:101::", "embedding 192.168.1.1"),
        ("fec0::1", "site-local"),
        ("feff:ffff::1", "site-local"),
    ],
)
def test_refusal_reason_refuses_non_public(address: str, reason: str) -> None:
    why = refusal_reason(address)
    assert why is not None
    assert reason in why


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700::1111", "::ffff:1.1.1.1"])
def test_refusal_reason_allows_public(address: str) -> None:
    assert refusal_reason(address) is None


def test_refusal_reason_allowlist_opens_only_its_networks() -> None:
    assert refusal_reason("127.0.0.2", LOOPBACK) is None
    assert refusal_reason("::ffff:127.0.0.3", LOOPBACK) is None
    assert refusal_reason("::1", LOOPBACK) is None
    assert refusal_reason("10.0.0.1", LOOPBACK) is not None
    assert refusal_reason("169.254.169.254", parse_networks("10.0.0.0/8")) is not None


def test_check_url_refuses_when_any_address_is_private() -> None:
    with pytest.raises(UnsafeTargetError, match="does not resolve to a public address") as refused:
        check_url("https://hooks.example/x", resolver=fake_dns("93.184.215.14", "10.0.0.1"))
    # Which internal address a name has is not told: clients could map the internal DNS.
    assert "10.0.0.1" not in str(refused.value)


@pytest.mark.parametrize("mapped", ["::ffff:10.0.0.1", "64:ff9b::a00:1", "2002:a00:1::1"])
def test_check_url_does_not_tell_the_private_address_an_ipv6_answer_embeds(mapped: str) -> None:
    with pytest.raises(UnsafeTargetError, match="does not resolve to a public address") as e:
        check_url("https://hooks.example/x", resolver=fake_dns(mapped))
    assert "10.0.0.1" not in str(e.value)


def test_check_url_names_an_address_the_url_gave() -> None:
    with pytest.raises(UnsafeTargetError, match=r"'10\.0\.0\.1' is a private address"):
        check_url("https://10.0.0.1/x")


def test_check_url_returns_every_checked_address() -> None:
    target = check_url(
        "https://hooks.example:8443/p?q=1",
        resolver=fake_dns("93.184.215.14", "2606:2800:21f:cb07::1"),
    )
    assert target.host == "hooks.example"
    assert target.port == 8443
    assert target.addresses == ("93.184.215.14", "2606:2800:21f:cb07::1")
    assert not target.allowlisted


def test_check_url_marks_a_target_only_the_allowlist_lets_through() -> None:
    """Validator only: nothing is sent to these addresses."""
    allow = parse_networks("10.20.0.0/16, 93.184.215.0/24")
    inside = check_url("https://hooks.example/x", allow=allow, resolver=fake_dns("10.20.0.5"))
    public = check_url("https://hooks.example/x", allow=allow, resolver=fake_dns("93.184.215.14"))
    assert inside.allowlisted
    assert not public.allowlisted  # a public address needs no exception


@pytest.mark.parametrize(
    "url",
    [
        "ftp://hooks.example/",
        "hooks.example/x",
        "http:///x",
        "javascript:alert(1)",
        "http://hooks.example:70000/",
        "https://" + "a" * 2100 + ".example/",
    ],
)
def test_check_url_refuses_malformed(url: str) -> None:
    with pytest.raises(UnsafeTargetError):
        check_url(url, resolver=fake_dns("93.184.215.14"))


def cjk_url(size: int) -> str:
    """A URL of exactly `size` bytes in UTF-8, most of them 3-byte CJK characters."""
    base = "https://hooks.example/"
    chars, pad = divmod(size - len(base), 3)
    url = base + "\u4e2d" * chars + "a" * pad
    assert len(url.encode()) == size
    return url


def test_check_url_limits_the_url_in_utf8_bytes_not_characters() -> None:
    # Regression: 2000 CJK characters (6000 bytes) passed a character count, and the
    # endpoint row's URL index then refused the insert for ever.
    url = "https://hooks.example/" + "\u4e2d" * 2000
    assert len(url) < MAX_URL_LENGTH
    with pytest.raises(UnsafeTargetError, match="6022 bytes long in UTF-8; the limit is 2048"):
        check_url(url, resolver=fake_dns("93.184.215.14"))


def test_check_url_accepts_a_url_of_exactly_the_limit_in_bytes() -> None:
    url = cjk_url(MAX_URL_LENGTH)
    assert check_url(url, resolver=fake_dns("93.184.215.14")).url == url
    with pytest.raises(UnsafeTargetError, match="2049 bytes"):
        check_url(url + "a", resolver=fake_dns("93.184.215.14"))


def test_check_url_refuses_a_lone_surrogate_as_malformed() -> None:
    with pytest.raises(UnsafeTargetError, match="malformed"):
        check_url("https://hooks.example/\ud800", resolver=fake_dns("93.184.215.14"))


def test_check_url_unresolvable_is_its_own_error() -> None:
    def no_dns(_host: str, _port: int) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(UnresolvableHostError, match="does not resolve to a public address"):
        check_url("https://nowhere.invalid/", resolver=no_dns)


def _refusal(url: str, resolver: Any) -> str:
    with pytest.raises(UnsafeTargetError) as refused:
        check_url(url, resolver=resolver)
    return str(refused.value).replace("nowhere.invalid", "hooks.example")


def test_check_url_gives_a_host_name_one_message_for_every_refusal() -> None:
    """A missing name and one resolving to a private, loopback or metadata address were told
    apart (422 "could not be resolved" vs "resolves to a private address"): any key could map
    the service's internal DNS names. Validator only: no lookup, nothing sent."""

    def no_dns(_host: str, _port: int) -> list[str]:
        raise OSError("Name or service not known")

    url = "https://hooks.example/x"
    messages = {
        _refusal("https://nowhere.invalid/x", no_dns),
        _refusal(url, fake_dns()),
        _refusal(url, fake_dns("10.0.0.1")),
        _refusal(url, fake_dns("127.0.0.1")),
        _refusal(url, fake_dns("169.254.169.254")),
        _refusal(url, fake_dns("::ffff:10.0.0.1")),
    }
    assert messages == {
        "The webhook host 'hooks.example' does not resolve to a public address; webhooks may "
        "only target public addresses."
    }


@pytest.mark.parametrize(
    ("address", "allow"),
    [
        ("fd00:ec2::254", "fd00::/8"),
        ("169.254.169.254", "169.254.0.0/16"),
        ("::ffff:169.254.169.254", "::ffff:0:0/96"),
        ("100.100.100.200", "100.64.0.0/10"),
    ],
)
def test_refusal_reason_allowlist_never_opens_a_metadata_address(address: str, allow: str) -> None:
    """Allowlisting a VPC's ULA range (fd00::/8) opened AWS's IPv6 metadata endpoint. Validator
    only: nothing is sent to these addresses."""
    assert refusal_reason(address, parse_networks(allow)) is not None
    assert "cloud metadata" in (refusal_reason(address, parse_networks(allow)) or "")
    with pytest.raises(UnsafeTargetError):
        check_url("https://hooks.example/", allow=parse_networks(allow), resolver=fake_dns(address))
    assert refusal_reason("fd00::1", parse_networks("fd00::/8")) is None  # the rest stays open


def test_check_url_refuses_metadata_literal_without_resolving() -> None:
    with pytest.raises(UnsafeTargetError, match="cloud metadata"):
        check_url("http://169.254.169.254/latest/meta-data/")


@pytest.mark.parametrize(
    "url", ["http://hooks.example:0/", "https://hooks.example:0/x", "http://hooks.example:00/"]
)
def test_check_url_refuses_port_zero(url: str) -> None:
    # Regression: `parts.port or 80` turned an explicit port 0 into the scheme's default.
    with pytest.raises(UnsafeTargetError, match="port 0 is out of range"):
        check_url(url, resolver=fake_dns("93.184.215.14"))


@pytest.mark.parametrize(
    ("url", "port"), [("http://hooks.example/", 80), ("https://hooks.example/", 443)]
)
def test_check_url_default_ports(url: str, port: int) -> None:
    assert check_url(url, resolver=fake_dns("93.184.215.14")).port == port


def test_a_host_whose_lookup_hangs_is_unresolvable_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A domain whose name servers never answer held the API request (and its database
    connection) or the delivery thread for as long as the system resolver retried."""
    import socket
    import threading
    import time

    from segsvc.webhooks import ssrf

    release = threading.Event()

    def hanging(*args: object, **kwargs: object) -> list[object]:
        release.wait(10)  # no network: this stands in for the system resolver
        return []

    real = socket.getaddrinfo

    def some_hang(host: str, *args: Any, **kwargs: Any) -> Any:
        if host.endswith(".slow.invalid"):
            return hanging()
        return real("127.0.0.1", *args, **kwargs)  # loopback only: no network

    monkeypatch.setattr(socket, "getaddrinfo", some_hang)
    started = time.monotonic()
    try:
        with pytest.raises(ssrf.UnresolvableHostError):
            check_url(
                "https://hooks.slow.invalid/x",
                resolver=lambda host, port: ssrf.resolve(host, port, timeout=0.3),
            )
        assert time.monotonic() - started < 2
        # Many hanging lookups hold only their own threads: another host still resolves.
        for i in range(20):
            with pytest.raises(TimeoutError):
                ssrf.resolve(f"h{i}.slow.invalid", 443, timeout=0.01)
        assert ssrf.resolve("fast.example", 443, timeout=2) == ["127.0.0.1"]
    finally:
        release.set()


def test_a_host_whose_lookup_timed_out_is_answered_at_once_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each submit naming a host whose name servers drop queries held its request thread for
    the whole timeout (5 s; ten submits a second at a key's rate: two API pods' threads), and
    left one more lookup thread hanging."""
    import socket
    import threading
    import time

    from segsvc.webhooks import ssrf

    release, lookups = threading.Event(), []
    real = socket.getaddrinfo

    def hanging(host: str, *args: Any, **kwargs: Any) -> Any:
        if host != "drop.slow.invalid":  # another test's thread (Redis at 127.0.0.1, say)
            return real(host, *args, **kwargs)
        lookups.append(host)
        release.wait(10)  # no network: this stands in for the system resolver
        return []

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    monkeypatch.setattr(ssrf, "_timed_out", {})
    try:
        with pytest.raises(TimeoutError):
            ssrf.resolve("drop.slow.invalid", 443, timeout=0.2)
        started = time.monotonic()
        for _ in range(5):
            with pytest.raises(TimeoutError, match="less than 60 s ago"):
                ssrf.resolve("drop.slow.invalid", 443, timeout=0.2)
        assert time.monotonic() - started < 0.1  # no wait, and no new lookup
        assert lookups == ["drop.slow.invalid"]
        ssrf._timed_out["drop.slow.invalid"] -= ssrf.TIMED_OUT_MEMORY_S  # a minute later
        with pytest.raises(TimeoutError):
            ssrf.resolve("drop.slow.invalid", 443, timeout=0.05)
        assert lookups == ["drop.slow.invalid"] * 2  # asked again
    finally:
        release.set()


def test_a_host_that_answered_late_is_not_remembered_as_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One lookup over the timeout that then answered (a dropped packet, retried after 5 s)
    made a working host unresolvable for a minute, for every client of the process."""
    import socket
    import time

    from segsvc.webhooks import ssrf

    calls: list[str] = []
    real = socket.getaddrinfo

    def once_slow(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        if host.rstrip(".").lower() != "hooks.example":  # another test's thread's lookup
            return real(host, port, *args, **kwargs)
        calls.append(host)
        if len(calls) == 1:
            time.sleep(0.3)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]  # no network

    monkeypatch.setattr(socket, "getaddrinfo", once_slow)
    monkeypatch.setattr(ssrf, "_timed_out", {})
    with pytest.raises(TimeoutError):
        ssrf.resolve("Hooks.Example.", 443, timeout=0.1)
    assert "hooks.example" in ssrf._timed_out  # one memory whatever the case or final dot
    time.sleep(0.4)  # it answered meanwhile
    assert ssrf._timed_out == {}
    assert ssrf.resolve("hooks.example", 443, timeout=0.1) == ["127.0.0.1"]


def test_loggable_url_drops_credentials_and_query() -> None:
    from segsvc.webhooks.ssrf import loggable_url

    url = "https://user:s3cret@hooks.example:8443/in/hook?token=abc#frag"
    assert loggable_url(url) == "https://hooks.example:8443/in/hook"
    assert loggable_url("http://hooks.example/x") == "http://hooks.example/x"
