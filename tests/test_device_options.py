"""`DeviceOptions.from_env`: the WGX_* environment of wgx-userspace."""

from __future__ import annotations

import pytest

from wgx.control.device import DeviceOptions
from wgx.protocol.timers import REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME, Limits


def test_defaults() -> None:
    o = DeviceOptions.from_env({})
    assert (o.dataplane, o.workers, o.xdp_mode, o.tun_offload, o.limits) == (
        "auto", None, "auto", True, None)


def test_all_set() -> None:
    o = DeviceOptions.from_env({"WGX_DATAPLANE": "xdp", "WGX_XDP_IFACE": "ul0",
                                "WGX_WORKERS": "2", "WGX_XDP_MODE": "generic",
                                "WGX_TUN_OFFLOAD": "0"})
    assert (o.dataplane, o.xdp_iface, o.workers, o.xdp_mode, o.tun_offload) == (
        "xdp", "ul0", 2, "generic", False)


def test_soak_limits_shrink_only_the_rekey_limits() -> None:
    o = DeviceOptions.from_env({"WGX_TEST_REKEY_AFTER_TIME": "15",
                                "WGX_TEST_REKEY_AFTER_MESSAGES": "20000"})
    assert o.limits is not None
    assert (o.limits.rekey_after_time, o.limits.rekey_after_messages) == (15.0, 20000)
    default = Limits()
    assert o.limits.reject_after_time == default.reject_after_time
    assert o.limits.reject_after_messages == default.reject_after_messages
    only_time = DeviceOptions.from_env({"WGX_TEST_REKEY_AFTER_TIME": "30.5"}).limits
    assert only_time is not None and only_time.rekey_after_messages == REKEY_AFTER_MESSAGES


@pytest.mark.parametrize(("name", "value"), [
    ("WGX_WORKERS", "0"), ("WGX_WORKERS", "two"),
    ("WGX_TEST_REKEY_AFTER_TIME", "0.5"), ("WGX_TEST_REKEY_AFTER_TIME", "soon"),
    ("WGX_TEST_REKEY_AFTER_TIME", str(REKEY_AFTER_TIME + 1)),
    ("WGX_TEST_REKEY_AFTER_MESSAGES", "999"), ("WGX_TEST_REKEY_AFTER_MESSAGES", "-5"),
    ("WGX_TEST_REKEY_AFTER_MESSAGES", "1e6"),
])
def test_malformed_values_are_named(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        DeviceOptions.from_env({name: value})
