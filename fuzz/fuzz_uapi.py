"""atheris target: the UAPI request stream (framing, parse, validate, apply, get).

Input: the bytes a client writes to the UAPI socket. Every complete request (ended by a
blank line) is answered; a crash is any exception out of the request path, an answer
that is not `key=value` lines plus `errno=N`, or a refused request (errno != 0) or a get
that changed the device (see uapi_target.py). Run it through fuzz/run.py.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["wgx.control.uapi"]):
    import uapi_target

_TARGET: list[uapi_target.UapiTarget] = []


def one_input(data: bytes) -> None:
    _TARGET[0].feed(data)


def main() -> None:
    uapi_target.memoize_curve_ops()
    _TARGET.append(uapi_target.UapiTarget())
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
