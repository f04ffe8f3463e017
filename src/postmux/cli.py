"""The `postmux` command. Commands only: the logic lives in the modules below."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer

from postmux.config import ConfigError, Settings, load_config

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
    run_loop(_serve(settings))


async def _serve(settings: Settings) -> None:
    from postmux.app import App

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with App(settings) as running:
        print(
            f"postmux: smtp on port {running.smtp_port}, http on port {running.http_port}",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()


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


def main() -> None:
    app()
