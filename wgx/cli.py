"""Command-line interfaces: `wgx` (provisioning) and `wgx-userspace` (the daemon).

This is the only module that prints for humans.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import sys
import time
from typing import Annotated

import typer
from rich.console import Console

from wgx import __version__
from wgx.control import config, exporter, wgset
from wgx.control.interface import Interface, InterfaceError, with_live_state
from wgx.control.uapi import format_endpoint
from wgx.control.uapi_client import UapiClient, UapiClientError
from wgx.protocol import crypto

app = typer.Typer(
    help="wgx: a WireGuard-compatible VPN dataplane for Linux.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

LOG_LEVELS = {"silent": logging.CRITICAL + 1, "error": logging.ERROR, "info": logging.INFO,
              "verbose": logging.DEBUG, "debug": logging.DEBUG}


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def _read_key(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        typer.echo("error: key is not a valid 32-byte base64 string", err=True)
        raise typer.Exit(1)
    return raw


def _write_secret(text: str, path: str | None) -> None:
    """Write a key to `path` (created 0600) or stdout, warning like wg about readable files."""
    if path is not None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        return
    st = os.fstat(sys.stdout.fileno())
    if (st.st_mode & 0o077) and not os.isatty(sys.stdout.fileno()) and (st.st_mode & 0o170000) \
            == 0o100000:
        typer.echo("Warning: writing to world accessible file.\n"
                   "Consider setting the umask to 077 and trying again.", err=True)
    typer.echo(text)


KeyFileArg = Annotated[str | None, typer.Argument(
    metavar="[FILE]", help="Write the key to FILE (created with mode 0600) instead of stdout.")]


@app.command()
def genkey(out: KeyFileArg = None) -> None:
    """Print a new private key (base64), like `wg genkey`.

    Example: [bold]wgx genkey private.key[/bold]  or  [bold]umask 077; wgx genkey > key[/bold]
    """
    _write_secret(_b64(crypto.generate_private_key()), out)


@app.command()
def pubkey() -> None:
    """Read a private key on stdin and print its public key, like `wg pubkey`.

    Example: [bold]wgx pubkey < private.key > public.key[/bold]
    """
    typer.echo(_b64(crypto.public_key(_read_key(sys.stdin.read()))))


@app.command()
def genpsk(out: KeyFileArg = None) -> None:
    """Print a new preshared key (base64), like `wg genpsk`.

    Example: [bold]wgx genpsk psk.key[/bold]
    """
    _write_secret(_b64(os.urandom(32)), out)


@app.command()
def version() -> None:
    """Print the wgx version."""
    typer.echo(f"wgx {__version__}")



NetnsOpt = Annotated[str | None, typer.Option(
    "--netns", help="Operate inside this existing network namespace (ip netns name). "
    "UAPI sockets are one filesystem path for all namespaces, so interface names "
    "must be unique on the host.")]


_TARGET_HELP = ("A config file (an existing NAME.conf is read as a file, even when NAME.conf "
                "is also a valid interface name), or IFACE for /etc/wireguard/IFACE.conf.")


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _require_root(command: str) -> None:
    """Refuse before touching anything: these commands manage links, routes and the
    root-only UAPI directory, so an unprivileged run could only fail halfway."""
    if os.geteuid() != 0:
        raise _fail(f"`wgx {command}' must be run as root")


def _load_config(target: str) -> config.Config:
    try:
        conf = config.load(config.resolve(target))
    except config.ConfigError as e:
        raise _fail(str(e), 2) from None
    for warning in conf.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if (w := config.permission_warning(conf.path)) is not None:
        typer.echo(f"warning: {w}", err=True)
    return conf


def _interface(target: str, netns: str | None, dataplane: str = "auto") -> Interface:
    try:
        return Interface(_load_config(target), netns=netns, dataplane=dataplane,
                         log=lambda m: typer.echo(f"[#] {m}", err=True))
    except config.ConfigError as e:
        raise _fail(str(e), 2) from None


@app.command()
def up(
    target: Annotated[str, typer.Argument(metavar="CONFIG|IFACE", help=_TARGET_HELP)],
    dataplane: Annotated[str, typer.Option(
        help="auto (XDP where possible, else socket), xdp, or socket.")] = "auto",
    netns: NetnsOpt = None,
) -> None:
    """Bring up a tunnel from a wg-quick config: daemon, keys, peers, addresses, MTU, routes.

    A default route (AllowedIPs 0.0.0.0/0 or ::/0) gets wg-quick's fwmark policy
    routing: table 51820, a `not fwmark` rule and a `suppress_prefixlength 0` rule.
    If any step fails, everything done so far is rolled back.

    CONFIG|IFACE: an existing file whose name ends in .conf is read as that file, also
    when the name looks like an interface name (wg-alpha.conf); any other interface
    name IFACE means /etc/wireguard/IFACE.conf, as in wg-quick.

    Example: [bold]wgx up wg0[/bold]  or  [bold]wgx up wg-alpha.conf --netns alpha[/bold]
    """
    _require_root("up")
    if dataplane not in ("auto", "xdp", "socket"):
        raise _fail(f"--dataplane {dataplane!r}: use auto, xdp or socket", 2)
    iface = _interface(target, netns, dataplane)
    try:
        config.validate_for_up(iface.config)
        iface.up()
    except config.ConfigError as e:
        raise _fail(str(e), 2) from None
    except (InterfaceError, OSError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"[#] {iface.name} is up", err=True)


@app.command()
def down(
    target: Annotated[str, typer.Argument(metavar="CONFIG|IFACE", help=_TARGET_HELP)],
    netns: NetnsOpt = None,
) -> None:
    """Undo exactly what `wgx up` did (with SaveConfig = true, save the live state first).

    Example: [bold]wgx down wg0[/bold]  or  [bold]wgx down wg-alpha.conf --netns alpha[/bold]
    """
    _require_root("down")
    iface = _interface(target, netns)
    try:
        iface.down()
    except (InterfaceError, OSError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"[#] {iface.name} is down", err=True)


def _ago(ts: float) -> str:
    if not ts:
        return "never"
    secs = max(0, int(time.time() - ts))
    parts = [(secs // 3600, "hour"), (secs % 3600 // 60, "minute"), (secs % 60, "second")]
    words = [f"{n} {u}{'s' if n != 1 else ''}" for n, u in parts if n]
    return (", ".join(words) or "0 seconds") + " ago"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _workers(extra: dict[str, str]) -> list[dict[str, int]]:
    """Per-worker counters from `get=wgx` keys like `worker0.rx_packets`."""
    out: dict[int, dict[str, int]] = {}
    for key, value in extra.items():
        head, _, name = key.partition(".")
        if head.startswith("worker") and head[6:].isdigit() and value.isdigit():
            out.setdefault(int(head[6:]), {})[name] = int(value)
    return [out[i] for i in sorted(out)]


def _show_one(name: str, show_keys: bool) -> dict:
    client = UapiClient(name)
    dev = client.get()
    try:
        extra = client.stats()
    except UapiClientError:
        extra = {}
    return {
        "interface": name,
        "public_key": _b64(crypto.public_key(dev.private_key)) if dev.private_key else None,
        "private_key": (_b64(dev.private_key) if show_keys else "(hidden)")
        if dev.private_key else None,
        "listen_port": dev.listen_port,
        "fwmark": dev.fwmark or None,
        "dataplane": extra.get("dataplane", "unknown (not a wgx daemon)"),
        "drops": {k[5:]: int(v) for k, v in extra.items() if k.startswith("drop.")},
        "stats": {k[5:]: int(v) for k, v in extra.items() if k.startswith("stat.")},
        "xdp": {
            "iface": extra.get("xdp_iface"),
            "attach_mode": extra.get("xdp_attach_mode"),
            "verdicts": {k[4:]: int(v) for k, v in extra.items() if k.startswith("xdp.")},
        } if "xdp_iface" in extra else None,
        "fastpath_error": extra.get("fastpath_error"),
        "workers": _workers(extra),
        "peers": [
            {
                "public_key": _b64(p.public_key),
                "preshared_key": (_b64(p.preshared_key) if show_keys else "(hidden)")
                if any(p.preshared_key) else None,
                "endpoint": format_endpoint(p.endpoint) if p.endpoint else None,
                "allowed_ips": p.allowed_ips,
                "latest_handshake": p.last_handshake or None,
                "rx_bytes": p.rx_bytes,
                "tx_bytes": p.tx_bytes,
                "persistent_keepalive": p.persistent_keepalive or None,
            }
            for p in dev.peers
        ],
    }


@app.command()
def show(
    target: Annotated[str, typer.Argument(metavar="[IFACE|all]")] = "all",
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    show_keys: Annotated[bool, typer.Option(
        "--show-keys", help="Print private and preshared keys (hidden by default).")] = False,
    netns: NetnsOpt = None,
) -> None:
    """Show interfaces like `wg show`, plus wgx's dataplane and drop counters.

    Example: [bold]wgx show wg0 --json[/bold]
    """
    _require_root("show")
    names = exporter.interfaces() if target == "all" else [target]
    try:
        infos = [_show_one(n, show_keys) for n in names]
    except UapiClientError as e:
        raise _fail(str(e)) from None
    if json_out:
        typer.echo(json.dumps(infos if target == "all" else infos[0], indent=2))
        return
    console = Console()
    for info in infos:
        console.print(f"[bold green]interface[/]: [green]{info['interface']}[/]")
        for key in ("public_key", "private_key", "listen_port", "fwmark", "dataplane"):
            if info[key] is not None:
                console.print(f"  [bold]{key.replace('_', ' ')}[/]: {info[key]}")
        if info["fastpath_error"]:
            console.print(f"  [bold]fast path[/]: not used: {info['fastpath_error']}")
        if info["xdp"]:
            xdp = info["xdp"]
            console.print(f"  [bold]xdp[/]: {xdp['attach_mode']} on {xdp['iface']}")
            hits = ", ".join(f"{k} {v}" for k, v in xdp["verdicts"].items() if v)
            console.print(f"  [bold]xdp verdicts[/]: {hits or 'none yet'}")
        for i, w in enumerate(info["workers"]):
            busy = ", ".join(f"{k} {v}" for k, v in w.items() if v)
            console.print(f"  [bold]worker {i}[/]: {busy or 'idle'}")
        if info["drops"]:
            drops = ", ".join(f"{k} {v}" for k, v in sorted(info["drops"].items()))
            console.print(f"  [bold]dropped[/]: {drops}")
        for p in info["peers"]:
            console.print(f"\n[bold yellow]peer[/]: [yellow]{p['public_key']}[/]")
            if p["preshared_key"]:
                console.print(f"  [bold]preshared key[/]: {p['preshared_key']}")
            if p["endpoint"]:
                console.print(f"  [bold]endpoint[/]: {p['endpoint']}")
            console.print(f"  [bold]allowed ips[/]: {', '.join(p['allowed_ips']) or '(none)'}")
            if p["latest_handshake"]:
                console.print(f"  [bold]latest handshake[/]: {_ago(p['latest_handshake'])}")
            console.print(f"  [bold]transfer[/]: {_bytes(p['rx_bytes'])} received, "
                          f"{_bytes(p['tx_bytes'])} sent")
            if p["persistent_keepalive"]:
                console.print(f"  [bold]persistent keepalive[/]: every "
                              f"{p['persistent_keepalive']} seconds")
        console.print()


@app.command()
def showconf(
    iface: Annotated[str, typer.Argument(help="Interface name.")],
    netns: NetnsOpt = None,
) -> None:
    """Print the live configuration in a form `wgx up` and `wg setconf` accept.

    Example: [bold]wgx showconf wg0 > wg0.conf[/bold]
    """
    _require_root("showconf")
    try:
        dev = UapiClient(iface).get()
    except UapiClientError as e:
        raise _fail(str(e)) from None
    conf = with_live_state(config.Config(path=f"{iface}.conf"), dev)
    typer.echo(config.wg_setconf_text(conf), nl=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def set(  # noqa: A001 (the command is called set, like `wg set`)
    ctx: typer.Context,
    iface: Annotated[str, typer.Argument(help="Interface name.")],
    netns: NetnsOpt = None,
) -> None:
    """Change a live interface with `wg set`'s grammar.

    [listen-port P] [fwmark M] [private-key FILE] [peer KEY [remove] [preshared-key FILE]
    [endpoint HOST:PORT] [persistent-keepalive N|off] [allowed-ips IP/CIDR,...]]...

    Example: [bold]wgx set wg0 peer KEY= endpoint 198.18.0.2:51820 allowed-ips 10.99.0.2/32[/bold]
    """
    try:
        body = wgset.to_uapi(list(ctx.args))  # pure: arguments are checked for anyone
    except wgset.WgSetError as e:
        raise _fail(str(e), 2) from None
    _require_root("set")
    try:
        UapiClient(iface).set(body)
    except UapiClientError as e:
        raise _fail(str(e)) from None


@app.command("exporter")
def exporter_cmd(
    listen: Annotated[str, typer.Option(help="HOST:PORT to serve /metrics on.")]
    = "127.0.0.1:9586",
) -> None:
    """Serve Prometheus metrics of all WireGuard interfaces on this host.

    Example: [bold]wgx exporter --listen 127.0.0.1:9586[/bold]; then
    curl http://127.0.0.1:9586/metrics
    """
    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise _fail(f"--listen {listen!r}: expected HOST:PORT", 2)
    try:
        server = exporter.serve(host.strip("[]") or "127.0.0.1", int(port))
    except OSError as e:
        raise _fail(f"cannot listen on {listen}: {e.strerror}") from None
    typer.echo(f"serving metrics on http://{listen}/metrics", err=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


# --------------------------------------------------------------------------- wgx-userspace

userspace_app = typer.Typer(add_completion=False, rich_markup_mode="rich")


@userspace_app.command()
def _userspace(
    interface: Annotated[str, typer.Argument(help="Name of the TUN interface to create.")] = "",
    foreground: Annotated[bool, typer.Option(
        "--foreground", "-f", help="Stay in the foreground instead of daemonizing.")] = False,
    show_version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    """Run a wgx interface daemon with wireguard-go's command-line contract.

    Creates INTERFACE as a TUN device and serves the cross-platform UAPI on
    /var/run/wireguard/INTERFACE.sock, so `wg` and `wg-quick` manage it:

      [bold]WG_QUICK_USERSPACE_IMPLEMENTATION=wgx-userspace wg-quick up wg0[/bold]

    Environment: WGX_DATAPLANE=auto|xdp|socket (default auto),
    LOG_LEVEL=silent|error|info|verbose (default error) for wgx's own messages
    (other libraries' debug and info messages are left out),
    WGX_LOG_DEBUG=LOGGER,... (comma-separated logger names that log at DEBUG whatever
    LOG_LEVEL says, e.g. pyroute2),
    WGX_LOG_FILE=PATH (where a daemonized process logs; default nowhere).
    """
    from wgx.control.device import Device, DeviceOptions
    from wgx.control.fastpath import Loader

    if show_version:
        typer.echo(f"wgx-userspace v{__version__}")
        return
    if not interface:
        typer.echo("Usage: wgx-userspace [-f/--foreground] INTERFACE-NAME", err=True)
        raise typer.Exit(2)
    level = os.environ.get("LOG_LEVEL", "error").lower()
    if level not in LOG_LEVELS:
        typer.echo(f"error: LOG_LEVEL={level!r}: use one of {', '.join(LOG_LEVELS)}", err=True)
        raise typer.Exit(2)
    # Before anything can log: the handler writes to fd 2, which daemonizing redirects.
    setup_logging(LOG_LEVELS[level], os.environ.get("WGX_LOG_DEBUG", ""))
    foreground = foreground or os.environ.get("WG_PROCESS_FOREGROUND") == "1"
    try:
        options = DeviceOptions.from_env(dict(os.environ))
        dev = Device.open(interface, options)
    except (OSError, ValueError) as e:
        typer.echo(f"error: cannot create interface {interface}: {e}", err=True)
        raise typer.Exit(1) from None
    if options.xdp_iface and options.dataplane != "socket":
        # Attach before daemonizing, so that `xdp` fails here with the reason.
        loader = Loader(options.xdp_iface, dev.engine.listen_port, options.xdp_mode)
        loader.run()
        if loader.error and options.dataplane == "xdp":
            dev.close()
            typer.echo(f"error: {interface}: XDP dataplane unavailable: {loader.error}", err=True)
            raise typer.Exit(1)
        dev.adopt_loader(loader)
    if not foreground and os.fork() > 0:
        os._exit(0)
    if not foreground:
        os.setsid()
        _detach_stdio(os.environ.get("WGX_LOG_FILE"))
    try:
        reason = dev.run()
    finally:
        dev.close()
    logging.getLogger("wgx").info("exiting: %s", reason)
    if dev.exit_error:
        raise typer.Exit(1)


def setup_logging(level: int, debug_loggers: str = "") -> None:
    """Log to stderr (one root handler): wgx's own loggers ("wgx" and "wgx.*") at `level`,
    every other logger at `level` but never more verbose than WARNING (pyroute2 logs each
    netlink message at DEBUG), except the loggers in `debug_loggers` (WGX_LOG_DEBUG:
    comma-separated logger names, e.g. "pyroute2"), which log at DEBUG."""
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("wgx").setLevel(level)
    for name in debug_loggers.split(","):
        if name.strip():
            logging.getLogger(name.strip()).setLevel(logging.DEBUG)


def _detach_stdio(log_file: str | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log_file else null
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)


def userspace_main() -> None:
    """Entry point of the `wgx-userspace` console script."""
    userspace_app()



# --------------------------------------------------------------------------- lab and bench
# (one block: the netns lab, `wgx bench` and `wgx bench crypto`; the logic lives in wgx.lab)

lab_app = typer.Typer(help="A netns test lab: hosts are namespaces, tunnels come up with "
                      "`wgx up`.", no_args_is_help=True, rich_markup_mode="rich")
LabNameOpt = Annotated[str, typer.Option(
    "--name", help="Lab name: namespaces are NAME-HOST, state in /run/wgx-lab/NAME.")]


def _lab_log(message: str) -> None:
    typer.echo(f"[lab] {message}", err=True)


@lab_app.command("up")
def lab_up(
    hosts: Annotated[int, typer.Option(help="Number of hosts (alpha, beta, gamma, ...).")] = 2,
    queues: Annotated[int, typer.Option(help="RX/TX queues of every underlay veth.")] = 2,
    dataplane: Annotated[str, typer.Option(help="wgx dataplane: auto, xdp or socket.")] = "auto",
    peer_impl: Annotated[str, typer.Option(
        help="wgx, or wireguard-go for the last host (through wg-quick).")] = "wgx",
    topology: Annotated[str, typer.Option(
        help="With more than 2 hosts (on a bridge): mesh, or hub (the first host).")] = "mesh",
    junk: Annotated[bool, typer.Option(
        help="Add a NAME-junk namespace that can reach the last host's underlay.")] = False,
    check: Annotated[bool, typer.Option(help="Ping every host through the tunnel.")] = True,
    impair: Annotated[str | None, typer.Option(
        help="Impair the underlay, e.g. loss=5%,reorder=25%,dup=2%,delay=10ms "
             "(fields below).", metavar="FIELD=VALUE,...")] = None,
    name: LabNameOpt = "wgxlab",
) -> None:
    """Build the lab: namespaces, multi-queue veths (a bridge for N>2), keys, configs, tunnels.

    Underlay 198.18.0.i/24 + fd18::i/64, overlay 10.99.0.i/24 + fd99::i/64 (host i from 1).
    Each host is provisioned by scripts/provision-host.sh, like the Vagrant VMs.

    [bold]--impair[/bold] puts an impairment stage between the hosts (a middle namespace
    NAME-sw; this kernel has no netem). Every packet entering it from a host is, in order:
    [bold]loss[/bold]=P% dropped with probability P;
    [bold]dup[/bold]=P% sent twice with probability P;
    [bold]delay[/bold]=T held T (units s, ms, us; +0..1 ms);
    [bold]jitter[/bold]=T plus a uniform -T..+T (T <= delay; this reorders too);
    [bold]reorder[/bold]=P% with probability P held back [bold]hold[/bold]=T longer
    (default: the delay, at least 1ms), so later packets overtake it;
    [bold]seed[/bold]=N fixes the random decisions (default random, shown by status);
    [bold]limit[/bold]=N packets held at most (default 10000).
    Both directions get the same settings. `wgx lab status` shows them and what the stage
    really did (dropped, duplicated, held, reordered, delayed).

    Example: [bold]wgx lab up --hosts 3 --topology hub[/bold]  or
    [bold]wgx lab up --impair loss=5%,reorder=25%,dup=2%,delay=10ms,seed=1[/bold]
    """
    from wgx.lab import impair as impairmod
    from wgx.lab import lab as labmod

    if impair is not None:
        try:
            impairmod.parse(impair)
        except impairmod.ImpairError as e:
            raise _fail(f"--impair {e}", 2) from None
    spec = labmod.LabSpec(name=name, hosts=hosts, queues=queues, dataplane=dataplane,
                          peer_impl=peer_impl, topology=topology, junk=junk, check=check,
                          impair=impair)
    t0 = time.monotonic()
    try:
        state = labmod.up(spec, log=_lab_log)
    except labmod.LabError as e:
        raise _fail(str(e)) from None
    typer.echo(f"lab {state.name} is up in {time.monotonic() - t0:.1f}s: "
               + ", ".join(f"{h.name} ({h.impl}, {h.overlay4})" for h in state.hosts), err=True)
    typer.echo(f"try: wgx lab exec {state.hosts[0].name}"
               f"{'' if name == 'wgxlab' else ' --name ' + name} -- ping -c 3 "
               f"{state.hosts[1].overlay4}", err=True)


@lab_app.command("down")
def lab_down(
    name: LabNameOpt = "wgxlab",
    all_labs: Annotated[bool, typer.Option("--all", help="Take down every lab.")] = False,
) -> None:
    """Remove the lab: tunnels, processes, namespaces and files (also after a crash).

    Example: [bold]wgx lab down[/bold]
    """
    from wgx.lab import lab as labmod

    names = labmod.list_labs() if all_labs else [name]
    for n in names:
        try:
            labmod.down(n, log=_lab_log)
        except labmod.LabError as e:
            raise _fail(str(e)) from None
        typer.echo(f"lab {n} is down", err=True)


@lab_app.command("status")
def lab_status(
    name: LabNameOpt = "wgxlab",
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the lab's hosts, namespaces, dataplanes, processes and peers.

    Example: [bold]wgx lab status --json[/bold]
    """
    from rich.table import Table

    from wgx.lab import lab as labmod

    try:
        st = labmod.status(name)
    except labmod.LabError as e:
        others = labmod.list_labs()
        raise _fail(f"{e}" + (f" (labs: {', '.join(others)})" if others else "")) from None
    if json_out:
        typer.echo(json.dumps(st, indent=2))
        return
    console = Console()
    spec = st["spec"]
    console.print(f"[bold]lab {st['name']}[/]: {len(st['hosts'])} hosts, {spec['queues']} "
                  f"queues, topology {spec['topology']}, dir {st['dir']}"
                  + ("" if st["complete"] else " [red](incomplete: run wgx lab down)[/]"))
    table = Table("host", "impl", "underlay", "overlay", "processes", "peers")
    for h in st["hosts"]:
        impl = h["impl"] + (f" ({h['dataplane']})" if h["impl"] == "wgx" else "")
        if not h["netns_ok"]:
            impl += "\n[red]netns gone[/]"
        pids = "\n".join(f"{k} {','.join(map(str, v))}" for k, v in h["pids"].items() if v)
        peers = []
        for p in h["peers"]:
            hs = _ago(p["latest_handshake"]).replace(" ago", "") \
                if p["latest_handshake"] else "no handshake"
            addr = (p["endpoint"] or "?").rsplit(":", 1)[0]
            peers.append(f"{addr}: {hs}; {_bytes(p['rx_bytes'])} in, "
                         f"{_bytes(p['tx_bytes'])} out")
        table.add_row(h["host"], impl, h["underlay"][0], (h["overlay"] or ["-"])[0],
                      pids or "-", "\n".join(peers) or "-")
    console.print(table)
    if st.get("impair"):
        _print_impair(console, st["impair"])


def _print_impair(console: Console, imp: dict) -> None:
    from rich.table import Table

    state = "[green]running[/]" if imp["running"] else "[red]not running[/]"
    console.print(f"[bold]impairment[/] {imp['settings']} (stage pid {imp['pid']}, {state}"
                  f", {imp.get('queued') or 0} packets held now)")
    table = Table("from", "packets in", "dropped", "duplicated", "held back", "reordered",
                  "delayed", "packets out")
    for who, c in imp["counters"].items():
        o = imp["observed"][who]
        table.add_row(who, str(c["rx"]), f"{c['dropped']} ({o['loss']:.2%})",
                      f"{c['duplicated']} ({o['dup']:.2%})", f"{c['held']} ({o['held']:.2%})",
                      f"{c['reordered']} ({o['reorder']:.2%})", str(c["delayed"]), str(c["tx"]))
    console.print(table)
    behind = sum(c.get("socket_drops", 0) for c in imp["counters"].values())
    if behind:
        console.print(f"[yellow]the stage fell behind: the kernel dropped {behind} frames it "
                      "did not read in time (lost, but not by the loss setting)[/]")


@lab_app.command("exec", context_settings={"ignore_unknown_options": True})
def lab_exec(
    host: Annotated[str, typer.Argument(help="Host name (alpha, beta, ...).")],
    cmd: Annotated[list[str], typer.Argument(help="The command, after --.")],
    name: LabNameOpt = "wgxlab",
) -> None:
    """Run a command on a lab host (its netns and its private /run/wireguard).

    Example: [bold]wgx lab exec alpha -- wg show[/bold]  or  [bold]wgx lab exec beta -- iperf3 -s
    [/bold]
    """
    from wgx.lab import lab as labmod

    try:
        argv = labmod.exec_argv(labmod.LabState.load(name), host, cmd)
    except labmod.LabError as e:
        raise _fail(str(e)) from None
    os.environ["PATH"] = labmod.environment()["PATH"]
    sys.stdout.flush()
    os.execvp(argv[0], argv)


app.add_typer(lab_app, name="lab")


bench_app = typer.Typer(help="Benchmarks: wgx against wireguard-go and the bare wire.",
                        rich_markup_mode="rich")


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option(
        help="2 s samples, 1 repetition, 3 UDP steps: under 2 minutes.")] = False,
    duration: Annotated[float | None, typer.Option(help="Seconds per sample (default 10).")]
    = None,
    repeat: Annotated[int | None, typer.Option(help="Repetitions; medians (default 3).")]
    = None,
    paths: Annotated[str, typer.Option(
        help="Comma-separated: wgx-xdp, wgx-socket, wireguard-go, underlay.")]
    = "wgx-xdp,wgx-socket,wireguard-go,underlay",
    tests: Annotated[str, typer.Option(
        help="Comma-separated: tcp1, tcp4, udp1372, udp64, ping, tcp1_junk.")]
    = "tcp1,tcp4,udp1372,udp64,ping,tcp1_junk",
    out: Annotated[str | None, typer.Option(
        help="Output directory (default ./bench-results/TIMESTAMP).")] = None,
    junk_pps: Annotated[int, typer.Option(
        help="Junk datagrams per second in tcp1_junk; 0: as fast as the junk namespace can "
             "send (an AF_PACKET TX ring).")] = 0,
    junk_cpu: Annotated[str, typer.Option(
        help="Where tcp1_junk runs the junk sender: auto (the last CPU, the path on the "
             "others, for the clean and the flooded sample alike: the attacker is another "
             "machine), a CPU number, or off (no pinning: the flood competes with the path "
             "for every CPU).")] = "auto",
    udp_buffer: Annotated[str, typer.Option(
        help="Socket buffer (iperf3 -w) of both ends in the UDP tests, every path alike; "
             "0 keeps iperf3's default.")] = "2M",
) -> None:
    """Build a 2-host lab per path and compare them side by side, interleaved.

    iperf3 TCP (1 and 4 streams), UDP 1372 B and 64 B (highest rate with <= 1% loss),
    ping RTT p50/p99, TCP under a junk flood; CPU-s per GB and peak RSS/PSS of the
    dataplane processes of both ends; samples disturbed by other load are repeated
    and flagged. Writes results.json, report.md, throughput.png and latency.png.

    Example: [bold]wgx bench --quick[/bold]  or  [bold]wgx bench crypto[/bold]
    """
    if ctx.invoked_subcommand is not None:
        return
    from pathlib import Path

    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from wgx.lab import bench as benchmod
    from wgx.lab import report
    from wgx.lab.proc import LabError

    kw = dict(duration=duration, repeat=repeat, junk_pps=junk_pps, udp_buffer=udp_buffer,
              junk_cpu=junk_cpu,
              paths=[p.strip() for p in paths.split(",") if p.strip()],
              tests=[t.strip() for t in tests.split(",") if t.strip()])
    if quick:
        cfg = benchmod.BenchConfig.quick_config(**kw)
    else:
        cfg = benchmod.BenchConfig(**{k: v for k, v in kw.items() if v is not None})
    try:
        cfg.validate()
    except LabError as e:
        raise _fail(str(e), 2) from None
    if os.geteuid() != 0:
        raise _fail("wgx bench needs root (it builds network namespaces)")
    out_dir = Path(out) if out else Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    err = Console(stderr=True)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                        console=err, transient=False)
    task = progress.add_task("building labs", total=None)

    def on_event(kind: str, data: dict) -> None:
        if kind == "setup":
            progress.update(task, description=f"building lab: {data['path']}")
        elif kind == "setup_done" and not data["available"]:
            progress.console.print(f"[yellow]{data['path']} unavailable:[/] {data['reason']}")
        elif kind == "start":
            progress.update(task, total=data["total"], completed=0)
        elif kind == "sample":
            progress.update(task, description=f"rep {data['rep']} {data['test']:<9} "
                                              f"{data['path']}")
        elif kind == "sample_done":
            progress.advance(task)
        elif kind == "retry":
            progress.console.print(
                f"[yellow]disturbed[/] {data['path']} {data['test']}: foreign CPU "
                f"{data['foreign']:.2f}s > {data['limit']:.2f}s, repeating")
        elif kind == "disturbed":
            progress.console.print(f"[red]flagged[/] {data['path']} {data['test']}: still "
                                   f"disturbed ({data['foreign']:.2f}s foreign CPU)")
        elif kind == "phase":
            progress.update(task, description=data["text"])

    try:
        runner = benchmod.Bench(cfg, on_event)
        with progress:
            results = runner.run()
    except LabError as e:
        raise _fail(str(e)) from None
    files = benchmod.write_outputs(results, out_dir, report.markdown_table(results))
    Console().print(report.rich_table(results))
    for p, info in results["paths"].items():
        if not info["available"]:
            typer.echo(f"{p}: unavailable: {info['reason']}", err=True)
    typer.echo(f"results in {out_dir}/ ({', '.join(f.name for f in files.values())}); "
               f"{results['elapsed_s']} s", err=True)


@bench_app.command("crypto")
def bench_crypto(
    seconds: Annotated[float, typer.Option(
        help="Seconds per measurement point, split into 5 alternating slices.")] = 1.0,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """In-process crypto microbenchmark: the worker's batch path against the bare AEAD loop.

    Decrypt/encrypt packets per second at 64, 512 and 1420 B through the worker's own
    code (stub rings, no sockets), the `cryptography` ChaCha20-Poly1305 ceiling, their
    ratio, and handshakes per second (initiation + response).

    Example: [bold]wgx bench crypto --json[/bold]
    """
    from rich.table import Table

    from wgx.lab import cryptobench, report

    if not (0.01 <= seconds <= 60):
        raise _fail("--seconds: use 0.01 to 60", 2)
    res = cryptobench.run(seconds)
    if json_out:
        typer.echo(json.dumps(res, indent=2))
        return
    table = Table("size", "worker decrypt kpps", "ceiling kpps", "ratio",
                  "worker encrypt kpps", "ceiling kpps", "ratio",
                  title=f"wgx bench crypto (mode: {res['mode']}, cryptography "
                        f"{res['cryptography']})")
    for row in report.crypto_rows(res):
        table.add_row(*row)
    console = Console()
    console.print(table)
    if res["mode_reason"]:
        console.print(f"[yellow]replica mode:[/] {res['mode_reason']}")
    hs = res["handshakes_per_s"]
    console.print(f"handshakes/s (initiation + response + consumption): engine "
                  f"{hs['engine']:.0f}, bare noise {hs['noise']:.0f}")


app.add_typer(bench_app, name="bench")


if __name__ == "__main__":
    app()
