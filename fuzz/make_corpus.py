"""Write the seed corpora fuzz/corpus/messages/ and fuzz/corpus/uapi/ (deterministic).

    python fuzz/make_corpus.py

Message seeds are a control byte (see fuzz_messages.py) plus a datagram captured from the
scenario's real handshakes: every type, aimed at each target, with and without the mac
fix-ups. The held-back initiation is never a seed: delivered to B it would be a genuine,
authenticated new handshake. UAPI seeds are valid set and get requests. Files are named
by content hash; crashing inputs found later are added here under a descriptive name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import scenario
import uapi_target

HERE = Path(__file__).resolve().parent


def _write(directory: Path, data: bytes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)


def message_seeds() -> list[bytes]:
    sc = scenario.build()
    held = {d for _, _, d in sc.held}
    datagrams = list(dict.fromkeys(d for _, _, d in sc.captured if d not in held))
    seeds = [b"", b"\x00", b"\x00\x01\x00\x00\x00"]
    for d in datagrams:
        handshake = d[0] in (1, 2)
        for target in range(4):
            ctl = target | (4 if handshake else 0)
            seeds.append(bytes([ctl]) + d)
            if handshake and target >= 2:
                seeds.append(bytes([ctl | 8 | 0x20]) + d)  # mac2 fixed, stranger source
        seeds.append(bytes([0x41]) + d)  # target B, late clock
        if d[0] != 1:  # aimed at live indices of A and B: reaches the per-session code
            seeds += [bytes([0x80 | t | (4 if handshake else 0)]) + d for t in range(4)]
    return seeds


def uapi_seeds() -> list[bytes]:
    p1, p2 = uapi_target.PEER1.hex(), uapi_target.PEER2.hex()
    _, p3 = scenario.static_key(904)
    reqs = [
        "get=1\n\n",
        "get=wgx\n\n",
        uapi_target.BASELINE + "\n\n",
        f"set=1\nprivate_key={bytes(32).hex()}\nfwmark=\nlisten_port=0\n\n",
        f"set=1\nreplace_peers=true\npublic_key={p3.hex()}\nprotocol_version=1\n"
        "endpoint=[fe80::1%eth0]:51820\npersistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\nallowed_ip=0.0.0.0/0\nallowed_ip=::/0\n\n",
        f"set=1\npublic_key={p1}\nupdate_only=true\nallowed_ip=-10.0.0.2/32\n"
        f"public_key={p2}\nremove=true\n\n",
        f"set=1\nlisten_port={uapi_target.BUSY_PORT}\n\n",
        f"set=1\npublic_key={p1}\npreshared_key={'00' * 32}\nendpoint=192.0.2.1:1\n\n"
        "get=1\n\n",
        "set=1\npublic_key=" + "00" * 32 + "\n\n",
    ]
    return [r.encode() for r in reqs]


def main() -> None:
    for name, seeds in (("messages", message_seeds()), ("uapi", uapi_seeds())):
        for data in seeds:
            _write(HERE / "corpus" / name, data)
        print(f"{name}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
