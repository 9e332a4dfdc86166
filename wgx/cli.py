"""Command-line interfaces: `wgx` (provisioning) and `wgx-userspace` (the daemon).

This is the only module that prints for humans.
"""

from __future__ import annotations

import base64
import logging
import os
import sys
from typing import Annotated

import typer

from wgx import __version__
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


@app.command()
def genkey() -> None:
    """Print a new private key (base64), like `wg genkey`.

    Example: [bold]umask 077; wgx genkey > private.key[/bold]
    """
    if sys.stdout.isatty():
        typer.echo("warning: writing a private key to a terminal", err=True)
    typer.echo(_b64(crypto.generate_private_key()))


@app.command()
def pubkey() -> None:
    """Read a private key on stdin and print its public key, like `wg pubkey`.

    Example: [bold]wgx pubkey < private.key > public.key[/bold]
    """
    typer.echo(_b64(crypto.public_key(_read_key(sys.stdin.read()))))


@app.command()
def genpsk() -> None:
    """Print a new preshared key (base64), like `wg genpsk`.

    Example: [bold]wgx genpsk > psk.key[/bold]
    """
    typer.echo(_b64(os.urandom(32)))


@app.command()
def version() -> None:
    """Print the wgx version."""
    typer.echo(f"wgx {__version__}")


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
    LOG_LEVEL=silent|error|info|verbose (default error),
    WGX_LOG_FILE=PATH (where a daemonized process logs; default nowhere).
    """
    from wgx.control.device import Device, DeviceOptions

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
    foreground = foreground or os.environ.get("WG_PROCESS_FOREGROUND") == "1"
    dataplane = os.environ.get("WGX_DATAPLANE", "auto")
    try:
        dev = Device.open(interface, DeviceOptions(dataplane=dataplane))
    except (OSError, ValueError) as e:
        typer.echo(f"error: cannot create interface {interface}: {e}", err=True)
        raise typer.Exit(1) from None
    if not foreground and os.fork() > 0:
        os._exit(0)
    if not foreground:
        os.setsid()
        _detach_stdio(os.environ.get("WGX_LOG_FILE"))
    logging.basicConfig(level=LOG_LEVELS[level], stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        reason = dev.run()
    finally:
        dev.close()
    logging.getLogger("wgx").info("exiting: %s", reason)


def _detach_stdio(log_file: str | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log_file else null
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)


def userspace_main() -> None:
    """Entry point of the `wgx-userspace` console script."""
    userspace_app()


if __name__ == "__main__":
    app()
