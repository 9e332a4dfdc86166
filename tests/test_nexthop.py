"""NextHops: an endpoint's first lookup is synchronous, later ones happen in `refresh`,
off the packet path (the cached template stays in use until then)."""

from __future__ import annotations

from typing import Any

from wgx.dataplane.nexthop import CACHE_SECONDS, NextHops, Template


def _hops(monkeypatch: Any) -> tuple[NextHops, list[tuple[str, int]]]:
    hops = NextHops("lo", 51820)  # reads lo's MAC through netlink (no privileges needed)
    calls: list[tuple[str, int]] = []

    def resolve(endpoint: tuple[str, int]) -> Template:
        calls.append(endpoint)
        return Template(b"\x02" * 6, bytes([2, 0, 0, 0, 0, len(calls)]), b"\x0a\0\0\x01",
                        b"\x0a\0\0\x02", 51820, endpoint[1])

    monkeypatch.setattr(hops, "_resolve", resolve)
    return hops, calls


def test_first_lookup_now_later_ones_in_refresh(monkeypatch: Any) -> None:
    hops, calls = _hops(monkeypatch)
    ep = ("10.0.0.2", 51820)
    first = hops.header(ep, now=100.0)
    assert calls == [ep] and first is not None and not hops.stale
    assert hops.header(ep, now=100.0 + CACHE_SECONDS / 2) is first and calls == [ep]
    # Stale: still answered from the cache, without a lookup, and noted.
    assert hops.header(ep, now=100.0 + CACHE_SECONDS) is first and calls == [ep]
    assert hops.stale == {ep: 100.0 + CACHE_SECONDS}
    assert not hops.overdue(100.0 + CACHE_SECONDS * 1.5)
    assert hops.header(ep, now=100.0 + CACHE_SECONDS * 1.5) is first  # first note kept
    assert hops.overdue(100.0 + CACHE_SECONDS * 2)
    hops.refresh(now=101.5)
    assert calls == [ep, ep] and not hops.stale
    second = hops.header(ep, now=101.6)
    assert second is not first and second.bytes[5] == 2  # the refreshed template
    assert calls == [ep, ep]


def test_invalidate_forgets_templates_and_stale_marks(monkeypatch: Any) -> None:
    hops, calls = _hops(monkeypatch)
    ep = ("10.0.0.2", 51820)
    hops.header(ep, now=0.0)
    hops.header(ep, now=5.0)
    assert hops.stale == {ep: 5.0}
    hops.invalidate()
    assert not hops.stale
    hops.refresh(now=5.0)
    assert calls == [ep]  # nothing left to refresh
    hops.header(ep, now=5.0)  # after invalidate: looked up on the spot
    assert calls == [ep, ep]


def test_refresh_without_stale_entries_does_nothing(monkeypatch: Any) -> None:
    hops, calls = _hops(monkeypatch)
    hops.refresh()
    assert calls == [] and not hops.stale
