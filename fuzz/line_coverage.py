"""Which lines of the code under test a corpus reaches (stdlib only: sys.settrace).

    python fuzz/line_coverage.py messages|uapi CORPUS_DIR [CORPUS_DIR ...]

Replays every file through the harness's input function (no libFuzzer) and prints, per
function of interest, executed/executable lines and the line numbers never reached.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from pathlib import Path

FUNCS = {
    "messages": {
        "wgx.protocol.messages": None,
        "wgx.protocol.engine": ["receive_datagram", "_receive_transport", "_receive_initiation",
                                "_receive_response", "_receive_cookie_reply", "_handshake_gate",
                                "_note_handshake", "_deliver"],
        "wgx.protocol.noise": ["consume_initiation", "consume_response"],
        "wgx.protocol.cookie": None,
        "wgx.protocol.replay": ["would_accept"],
        "wgx.protocol.ratelimiter": None,
    },
    "uapi": {"wgx.control.uapi": ["_key", "_bool_true", "_int", "parse_endpoint", "parse_set",
                                  "apply_set", "format_get", "format_stats", "handle_request",
                                  "take_requests"]},
}


def _code_objects(mod: types.ModuleType, names: list[str] | None) -> list[types.CodeType]:
    out = []
    for name, obj in vars(mod).items():
        if isinstance(obj, type) and obj.__module__ == mod.__name__:
            out += [f.__code__ for n, f in vars(obj).items()
                    if isinstance(f, types.FunctionType) and (names is None or n in names)]
        elif isinstance(obj, types.FunctionType) and obj.__module__ == mod.__name__ and (
                names is None or name in names):
            out.append(obj.__code__)
    return out


def _lines(code: types.CodeType) -> set[int]:
    lines = {ln for _, _, ln in code.co_lines() if ln is not None and ln != code.co_firstlineno}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            lines |= _lines(const)
    return lines


def main() -> None:
    target, dirs = sys.argv[1], [Path(p) for p in sys.argv[2:]]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import atheris

    # Plain bytecode: atheris' instrumentation rewrites code objects and their line tables.
    atheris.instrument_imports = lambda *a, **k: contextlib.nullcontext()
    harness = importlib.import_module(f"fuzz_{target}")
    if target == "messages":
        harness.targets()
        feed = harness.one_input
    else:
        harness._TARGET.append(harness.uapi_target.UapiTarget())
        feed = harness.one_input
    wanted: dict[str, set[int]] = {}
    for modname, names in FUNCS[target].items():
        mod = importlib.import_module(modname)
        for code in _code_objects(mod, names):
            wanted.setdefault(code.co_filename, set()).update(_lines(code))
            wanted[f"{code.co_filename}:{code.co_name}"] = _lines(code)
    hit: set[tuple[str, int]] = set()

    def tracer(frame, event, arg):
        if frame.f_code.co_filename not in wanted:
            return None

        def local(frame, event, arg):
            if event == "line":
                hit.add((frame.f_code.co_filename, frame.f_lineno))
            return local
        return local

    files = sorted(p for d in dirs for p in d.iterdir() if p.is_file())
    sys.settrace(tracer)
    for p in files:
        feed(p.read_bytes())
    sys.settrace(None)
    print(f"{len(files)} inputs")
    for key, lines in sorted(wanted.items()):
        if ":" not in key:
            continue
        path, func = key.rsplit(":", 1)
        got = {ln for f, ln in hit if f == path} & lines
        missed = sorted(lines - got)
        print(f"{Path(path).name}:{func}: {len(got)}/{len(lines)}"
              + (f"  missed {missed}" if missed else ""))


if __name__ == "__main__":
    main()
