"""atheris target: WireGuard datagrams through the struct parsers and the Engine's receive path.

Input: one control byte, then the datagram.

    bit 0-1  target engine: A, B, A under load, B under load (see scenario.py)
    bit 2    recompute mac1 for the target's public key (anyone can: it is public)
    bit 3    recompute mac2 with the target's current cookie for the source
    bit 4-5  source endpoint: A, B, an IPv4 stranger, an IPv6 stranger
    bit 6    clock: T_FUZZ (sessions alive) or T_LATE (all keypairs expired)
    bit 7    aim the receiver index at one of the target's live indices (scenario.aim)

A crash is any exception out of a parser other than MessageError, any exception out of
`Engine.receive_datagram`, a struct round trip that does not give the input back, or any
state change of the target (Target.feed) other than counters and load accounting.
Run it through fuzz/run.py (see fuzz/README.md).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["wgx"]):
    import scenario

_TARGETS: list[scenario.Target] = []


def targets() -> list[scenario.Target]:
    """A, B, A under load, B under load: each from its own run of the scenario."""
    if not _TARGETS:
        _TARGETS.extend(scenario.Target(scenario.build(), name, under_load=load)
                        for load in (False, True) for name in ("A", "B"))
    return _TARGETS


def one_input(raw: bytes) -> None:
    if not raw:
        return
    ctl, data = raw[0], raw[1:]
    scenario.check_struct_parsers(data)
    target = targets()[ctl & 3]
    eng = target.engine
    src = scenario.SOURCES[(ctl >> 4) & 3]
    now = scenario.T_LATE if ctl & 0x40 else scenario.T_FUZZ
    if ctl & 0x80:
        data = scenario.aim(data, eng)
    if ctl & 4:
        assert eng.public_key is not None
        data = scenario.fix_mac1(data, eng.public_key)
    if ctl & 8:
        data = scenario.fix_mac2(eng, data, src)
    target.feed(data, src, now)


def main() -> None:
    targets()  # build before fuzzing so setup does not count as an input
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
