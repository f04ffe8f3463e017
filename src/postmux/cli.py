"""The `postmux` command. Commands only: the logic lives in the modules below."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from postmux.config import ConfigError, Settings, load_config, split_hostport

if TYPE_CHECKING:
    from postmux.admin_client import AdminClient

app = typer.Typer(add_completion=False, no_args_is_help=True, help="postmux: an outbound email gateway.")

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="The TOML configuration file.")]

EXIT_CONFIG = 2


def _load_or_exit(path: Path) -> Settings:
    try:
        return load_config(path)
    except ConfigError as e:
        typer.echo(e.render(), err=True)
        raise typer.Exit(EXIT_CONFIG) from None


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine on uvloop when it is installed (faster sockets), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


@app.command("check-config")
def check_config(config: ConfigOption) -> None:
    """Validate a configuration file: prints OK, or every error with its key and reason (exit 2)."""
    _load_or_exit(config)
    typer.echo("OK")


@app.command()
def serve(config: ConfigOption) -> None:
    """Accept mail over SMTP and deliver it through the configured pools until SIGTERM or SIGINT."""
    settings = _load_or_exit(config)
    from postmux.logs import configure_logging

    configure_logging()
    run_loop(_serve(settings, config))


async def _serve(settings: Settings, config_path: Path) -> None:
    from postmux.app import App

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with App(settings, config_path=config_path) as running:
        # SIGHUP reloads the configuration, as every Unix daemon does; a bad file changes nothing.
        loop.add_signal_handler(signal.SIGHUP, running.control.reload)
        print(
            f"postmux: smtp on port {running.smtp_port}, http on port {running.http_port}",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()


@app.command()
def passwd() -> None:
    """Print a scrypt hash for [[smtp.users]] password_hash; the password is read from the terminal or stdin.

    Never from the command line: arguments show in `ps` and in shell history.
    """
    from postmux.passwords import hash_password

    if sys.stdin.isatty():
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True, err=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        typer.echo("postmux passwd: empty password", err=True)
        raise typer.Exit(EXIT_CONFIG)
    typer.echo(hash_password(password))


@app.command()
def demo(
    messages: Annotated[int, typer.Option(help="How many messages to send through the farm.")] = 3000,
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps its spool and event log.")] = Path(
        "var/demo"
    ),
) -> None:
    """Start three local upstreams (fast, slow, flaky), postmux in front, send mail, show the balance."""
    from postmux.demo import run_demo

    with contextlib.suppress(KeyboardInterrupt):
        run_loop(run_demo(messages, workdir))


# -- admin verbs over the HTTP admin API ----------------------------------------------------------------

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url", envvar="POSTMUX_URL", help="The admin API's base URL; default: [http] listen of -c."
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="POSTMUX_ADMIN_TOKEN", help="Bearer token; default: [http] admin_token of -c."
    ),
]
OptionalConfig = Annotated[
    Path | None, typer.Option("--config", "-c", help="Read the URL and token from this configuration file.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="JSON output (the default when not on a terminal).")]


def _admin(config: Path | None, url: str | None, token: str | None) -> AdminClient:
    from postmux.admin_client import AdminClient

    if config is not None:
        settings = _load_or_exit(config)
        host, port = split_hostport(settings.http.listen)
        url = url or f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        token = token or settings.http.admin_token
    return AdminClient(url or "http://127.0.0.1:8025", token)


@app.command()
def members(
    config: OptionalConfig = None, url: UrlOption = None, token: TokenOption = None, json: JsonOption = False
) -> None:
    """Every member of every pool: state, weight, connections, in flight, latency, recent errors."""
    _admin(config, url, token).show("/members", as_json=json or not sys.stdout.isatty())


@app.command()
def shaping(
    config: OptionalConfig = None, url: UrlOption = None, token: TokenOption = None, json: JsonOption = False
) -> None:
    """Effective limits per member x destination (provider or domain), and what last changed each."""
    _admin(config, url, token).show("/shaping", as_json=json or not sys.stdout.isatty())


NameArgument = Annotated[str, typer.Argument(help="The member's name (in every pool that has it).")]


@app.command()
def drain(
    name: NameArgument,
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
) -> None:
    """Stop giving a member new work; what it has in flight finishes."""
    _member_verb("drain", name, config, url, token, json)


@app.command()
def enable(
    name: NameArgument,
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
) -> None:
    """Give a drained member work again."""
    _member_verb("enable", name, config, url, token, json)


def _member_verb(
    verb: str, name: str, config: Path | None, url: str | None, token: str | None, json: bool
) -> None:
    _admin(config, url, token).post(f"/members/{name}/{verb}", as_json=json or not sys.stdout.isatty())


MessageIdArgument = Annotated[str, typer.Argument(help="The message's id (the event log's id field).")]


@app.command()
def release(
    message_id: MessageIdArgument,
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
) -> None:
    """Queue a held message again, due now (mail is held after max_local_errors crashes in a row)."""
    from urllib.parse import quote

    path = f"/messages/{quote(message_id, safe='')}/release"
    _admin(config, url, token).post(path, as_json=json or not sys.stdout.isatty())


@app.command()
def reload(
    config: OptionalConfig = None, url: UrlOption = None, token: TokenOption = None, json: JsonOption = False
) -> None:
    """Make the running postmux read its configuration file again (as SIGHUP does)."""
    _admin(config, url, token).post("/reload", as_json=json or not sys.stdout.isatty())


def main() -> None:
    app()
