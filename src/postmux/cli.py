"""The `postmux` command. Commands only: the logic lives in the modules below."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import tomllib
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote, urlencode

import typer

from postmux.config import (
    ConfigError,
    HttpSettings,
    Settings,
    http_notes,
    load_config,
    split_hostport,
    zone_notes,
)

if TYPE_CHECKING:
    from postmux.admin.client import AdminClient

# No rich markup in help: it would swallow every word in square brackets ("[http] listen", "[smtp]"),
# and postmux's help names config sections that way.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="postmux: an outbound email gateway.",
)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="The TOML configuration file.")]

EXIT_CONFIG = 2
EXIT_SOFTWARE = 70  # sysexits.h EX_SOFTWARE: the node stopped itself on a defect (a loop kept crashing)


def _load_or_exit(path: Path) -> Settings:
    try:
        return load_config(path)
    except ConfigError as e:
        typer.echo(e.render(), err=True)
        raise typer.Exit(EXIT_CONFIG) from None


def _version(value: bool) -> None:
    if value:
        from postmux import __version__

        typer.echo(f"postmux {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """postmux: an outbound email gateway."""


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
    """Validate a configuration file: prints OK, or every error with its key and reason (exit 2).

    Then, on stderr, what the HTTP listener exposes (admin API on or off), and a warning when it listens
    beyond this host or when [node] zone names a zone no member of a pool is in.
    """
    settings = _load_or_exit(config)
    typer.echo("OK")
    for level, note in http_notes(settings.http) + zone_notes(settings.node.zone, settings.pool):
        typer.echo(f"{config}: {level}: {note}", err=True)


@app.command()
def migrate(config: ConfigOption) -> None:
    """Bring the PostgreSQL spool's tables to this version's schema ([spool] backend = "postgresql").

    Run once per upgrade, from any node, before the upgraded nodes start: a node refuses to start on an
    older schema (a fresh, empty database gets its tables at the first start without it). A SQLite spool
    upgrades itself when it opens: nothing to do.
    """
    settings = _load_or_exit(config)
    if settings.spool.backend != "postgresql":
        typer.echo("the SQLite spool upgrades its file when it opens: nothing to migrate")
        return
    from postmux.spool.postgres_schema import migrate_database

    try:
        before, after = asyncio.run(migrate_database(settings.spool.dsn))
    except Exception as e:  # an unreachable server, a refused login, a newer schema: said in one line
        typer.echo(f"postmux: cannot migrate the spool: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"spool schema: version {before} -> {after}"
        if before != after
        else f"spool schema: version {after}, up to date"
    )


@app.command()
def serve(config: ConfigOption) -> None:
    """Accept mail over SMTP and deliver it through the configured pools until SIGTERM or SIGINT."""
    # From the first moment: SIGHUP's default action ends the process, and a start takes a second or two
    # (a logrotate's SIGHUP then killed the node). One that comes before the node has started is done
    # once it has (_serve).
    signal.signal(signal.SIGHUP, lambda signum, frame: _early_hangups.append(signum))
    settings = _load_or_exit(config)
    from postmux.app import StartupError
    from postmux.logs import configure_logging

    configure_logging()
    try:
        run_loop(_serve(settings, config))
    except StartupError as e:
        # What only a start can find (port in use, spool locked or unusable, log unwritable): one line.
        typer.echo(f"postmux: cannot start: {e}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except _NodeFailed as e:
        # Not 0: a service manager restarts the node, and whoever looks sees that it failed.
        typer.echo(f"postmux: stopped on a defect: {e}", err=True)
        raise typer.Exit(EXIT_SOFTWARE) from None


_early_hangups: list[int] = []  # SIGHUPs that came while the node was starting


class _NodeFailed(Exception):
    """The node stopped itself: one of its loops kept crashing (postmux/supervision.py)."""


async def _serve(settings: Settings, config_path: Path) -> None:
    import structlog

    from postmux.app import App
    from postmux.heap import settle_heap

    log = structlog.get_logger("postmux.serve")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("signal received", signal=sig.name, action="stop accepting, drain, exit")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    async with App(settings, config_path=config_path) as running:
        # SIGHUP reopens the event log (log rotation) and reloads the configuration, as Unix daemons do;
        # a bad file changes nothing.
        loop.add_signal_handler(signal.SIGHUP, running.hangup)
        if _early_hangups:  # asked for while starting: the file may have changed since it was read
            _early_hangups.clear()
            running.hangup()
        settle_heap()  # what start built is never collected again (postmux/heap.py)
        print(
            f"postmux: smtp on port {running.smtp_port}, http on port {running.http_port}",
            file=sys.stderr,
            flush=True,
        )
        # Until a signal, or until a background loop keeps crashing: a node that cannot dispatch must not
        # go on accepting mail, so it drains and exits as at SIGTERM, then says why with a non-zero status.
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(running.failed.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        failure = running.failure
    log.info("stopped")
    if failure is not None:
        raise _NodeFailed(failure)


@app.command()
def passwd() -> None:
    """Print a scrypt hash for [[smtp.users]] password_hash or [[api_key]] hash; the secret is read from the
    terminal or stdin.

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


dkim_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="DKIM keys ([[dkim]] in the config)."
)
app.add_typer(dkim_app, name="dkim")


@dkim_app.command("genkey")
def dkim_genkey(
    domain: Annotated[str, typer.Argument(help="The signing domain (d=).")],
    selector: Annotated[str, typer.Argument(help="The selector (s=): where the record goes in DNS.")],
    algorithm: Annotated[
        str, typer.Option(help="rsa (RSA-2048, rsa-sha256) or ed25519 (ed25519-sha256, RFC 8463).")
    ] = "rsa",
    out: Annotated[Path, typer.Option(help="The directory the key file is written to.")] = Path("."),
) -> None:
    """Write a new private key to OUT/DOMAIN.SELECTOR.key (mode 0600; never over an existing file; OUT made,
    mode 0700, when it does not exist) and print the DNS TXT record to publish at
    SELECTOR._domainkey.DOMAIN, then the [[dkim]] lines for the config."""
    import os

    from postmux.dkim import Algorithm, generate_key

    if algorithm not in ("rsa", "ed25519"):
        typer.echo(f"postmux dkim genkey: --algorithm is rsa or ed25519, not {algorithm!r}", err=True)
        raise typer.Exit(EXIT_CONFIG)
    full: Algorithm = "rsa-sha256" if algorithm == "rsa" else "ed25519-sha256"
    pem, key = generate_key(full)
    path = out / f"{domain}.{selector}.key"
    try:
        # A directory that does not exist yet is made, as `mkdir -p`, for keys alone: 0700 (umask aside).
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        typer.echo(f"postmux dkim genkey: cannot make the directory {out}: {e.strerror or e}", err=True)
        raise typer.Exit(1) from None
    try:
        # O_EXCL: a key in use is never overwritten; 0600 from the start, never readable by others.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        typer.echo(f"postmux dkim genkey: {path}: {e.strerror or e}", err=True)
        raise typer.Exit(1) from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    typer.echo(f"; private key written to {path}", err=True)
    typer.echo(f"{selector}._domainkey.{domain}. IN TXT {_txt_strings(key.record())}")
    typer.echo(
        f'; config:\n; [[dkim]]\n; domain = "{domain}"\n; selectors = [{{ name = "{selector}", '
        f'algorithm = "{full}", key_file = "{path.resolve()}" }}]',
        err=True,
    )


def _txt_strings(record: str) -> str:
    """A TXT value in quoted strings of at most 255 octets each (RFC 1035 3.3.14; RSA-2048's is ~400)."""
    return " ".join(f'"{record[i : i + 255]}"' for i in range(0, len(record), 255))


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
    from postmux.admin.client import AdminClient

    if config is not None:
        http = _http_of(config)
        host, port = split_hostport(http.listen)
        url = url or f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        token = token or http.admin_token
    return AdminClient(url or "http://127.0.0.1:8025", token)


def _http_of(config: Path) -> HttpSettings:
    """The [http] table of -c: all an admin verb needs. A file with errors elsewhere (an edit under way)
    still names the node to reach, with the errors said; every verb refused on it before, reload too."""
    try:
        return load_config(config).http
    except ConfigError as e:
        try:
            http = HttpSettings.model_validate(
                tomllib.loads(config.read_text(encoding="utf-8-sig")).get("http", {})
            )
        except (OSError, ValueError, RecursionError):  # not even [http] can be read: the whole file's errors
            typer.echo(e.render(), err=True)
            raise typer.Exit(EXIT_CONFIG) from None
        typer.echo(e.render(), err=True)
        typer.echo(f"(using {config}'s [http] table to reach the node)", err=True)
        return http


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


@app.command()
def webhooks(
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
    drop: Annotated[
        str | None,
        typer.Option(
            "--drop",
            metavar="ENDPOINT",
            help="Delete the records waiting for ENDPOINT, an endpoint no longer configured (never sent).",
        ),
    ] = None,
) -> None:
    """Each webhook endpoint: records waiting (backlog), the oldest one's age, last success, last error."""
    as_json = json or not sys.stdout.isatty()
    if drop is not None:
        _admin(config, url, token).drop_webhook_records(drop, as_json=as_json)
        return
    _admin(config, url, token).show("/webhooks", as_json=as_json)


@app.command()
def blocklists(
    config: OptionalConfig = None, url: UrlOption = None, token: TokenOption = None, json: JsonOption = False
) -> None:
    """The blocklist watch: each sending IP and domain x zone, listed or not, and when it was last asked."""
    _admin(config, url, token).show("/blocklists", as_json=json or not sys.stdout.isatty())


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
    verb: str,
    name: str,
    config: Path | None,
    url: str | None,
    token: str | None,
    json: bool,
    query: dict[str, str] | None = None,
) -> None:
    # A name is one path segment, whatever it holds: unencoded, "b/enable?" would call b's enable.
    path = f"/members/{quote(name, safe='')}/{verb}"
    if query:
        path += "?" + urlencode(query)
    _admin(config, url, token).post(path, as_json=json or not sys.stdout.isatty())


DestinationOption = Annotated[
    str | None,
    typer.Option(
        "--destination", "-d", help="Only toward this destination: a provider (google) or a domain."
    ),
]


@app.command()
def suspend(
    name: NameArgument,
    destination: Annotated[
        str, typer.Option("--destination", "-d", help="The provider (google) or domain to keep it from.")
    ],
    for_: Annotated[
        str, typer.Option("--for", help="How long: 30s, 15m, 2h (a reaction's suspension, set by hand).")
    ] = "1h",
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
) -> None:
    """Keep a member from one destination for a while; its mail there goes to the other members."""
    _member_verb("suspend", name, config, url, token, json, {"destination": destination, "duration": for_})


@app.command()
def resume(
    name: NameArgument,
    destination: DestinationOption = None,
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
) -> None:
    """Lift a member's shaping suspensions now (a reaction's or `suspend`'s), toward every destination
    or one."""
    _member_verb(
        "resume", name, config, url, token, json, {"destination": destination} if destination else None
    )


# -- the queue: a selector names the recipients a verb acts on -----------------------------------------

IdOption = Annotated[str | None, typer.Option("--id", help="One message, by its id (the event log's id).")]
PoolOption = Annotated[str | None, typer.Option("--pool", help="Recipients queued for this pool.")]
DomainOption = Annotated[str | None, typer.Option("--domain", help="Recipients at this domain.")]
ProviderOption = Annotated[
    str | None,
    typer.Option("--provider", help="Recipients at domains this provider runs (google, microsoft, ...)."),
]
MemberOption = Annotated[
    str | None, typer.Option("--member", help="Recipients whose last attempt went to this member.")
]
SenderOption = Annotated[
    str | None, typer.Option("--sender", help="Mail from this sender ('' for the null sender, DSNs).")
]
OlderThanOption = Annotated[
    str | None, typer.Option("--older-than", help="Mail accepted at least this long ago: 30m, 2h, 5d.")
]
StateOption = Annotated[
    str | None, typer.Option("--state", help="Recipients in this state: queued, leased, held.")
]
AllOption = Annotated[
    bool, typer.Option("--all", help="Act on every message (a mass action without a selector needs it).")
]


def _selector(
    id_: str | None,
    pool: str | None,
    domain: str | None,
    provider: str | None,
    member: str | None,
    sender: str | None,
    older_than: str | None,
    state: str | None,
    all_: bool = False,
) -> dict[str, Any]:
    named = {
        "id": id_,
        "pool": pool,
        "domain": domain,
        "provider": provider,
        "member": member,
        "sender": sender,
        "older_than": older_than,
        "state": state,
    }
    fields: dict[str, Any] = {k: v for k, v in named.items() if v is not None}
    if all_:
        fields["all"] = True
    return fields


def _params(fields: dict[str, Any]) -> dict[str, str]:
    return {k: "true" if v is True else str(v) for k, v in fields.items()}


queue_app = typer.Typer(
    rich_markup_mode=None,
    help="The queue: a summary by pool and destination, `list` of its messages, `show ID` of one.",
)
app.add_typer(queue_app, name="queue")


@queue_app.callback(invoke_without_command=True)
def queue(
    ctx: typer.Context,
    id_: IdOption = None,
    pool: PoolOption = None,
    domain: DomainOption = None,
    provider: ProviderOption = None,
    member: MemberOption = None,
    sender: SenderOption = None,
    older_than: OlderThanOption = None,
    state: StateOption = None,
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
) -> None:
    """The queue by pool and destination: recipients per state, the oldest message's age, the last error."""
    if ctx.invoked_subcommand is not None:
        return
    fields = _selector(id_, pool, domain, provider, member, sender, older_than, state)
    _admin(config, url, token).queue_summary(_params(fields), as_json=json or not sys.stdout.isatty())


@queue_app.command("list")
def queue_list(
    id_: IdOption = None,
    pool: PoolOption = None,
    domain: DomainOption = None,
    provider: ProviderOption = None,
    member: MemberOption = None,
    sender: SenderOption = None,
    older_than: OlderThanOption = None,
    state: StateOption = None,
    limit: Annotated[int, typer.Option("--limit", help="Messages per page (at most 1000).")] = 100,
    after: Annotated[str, typer.Option("--after", help="The page after this message id.")] = "",
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
) -> None:
    """Messages in the queue, oldest first, with the recipients the selector chooses."""
    fields = _selector(id_, pool, domain, provider, member, sender, older_than, state)
    params = {**_params(fields), "limit": str(limit), **({"after": after} if after else {})}
    _admin(config, url, token).queue_list(params, as_json=json or not sys.stdout.isatty())


@queue_app.command("show")
def queue_show(
    message_id: Annotated[str, typer.Argument(help="The message's id (the event log's id field).")],
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
) -> None:
    """One message: its envelope, its header fields, each recipient's state, and every attempt kept."""
    _admin(config, url, token).queue_show(message_id, as_json=json or not sys.stdout.isatty())


def _queue_verb(
    verb: str, fields: dict[str, Any], config: Path | None, url: str | None, token: str | None, json: bool
) -> None:
    _admin(config, url, token).queue_verb(verb, fields, as_json=json or not sys.stdout.isatty())


@app.command()
def flush(
    id_: IdOption = None,
    pool: PoolOption = None,
    domain: DomainOption = None,
    provider: ProviderOption = None,
    member: MemberOption = None,
    sender: SenderOption = None,
    older_than: OlderThanOption = None,
    state: StateOption = None,
    all_: AllOption = False,
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
) -> None:
    """Make deferred recipients due now (as postqueue -f); held ones stay held."""
    fields = _selector(id_, pool, domain, provider, member, sender, older_than, state, all_)
    _queue_verb("flush", fields, config, url, token, json)


@app.command()
def hold(
    id_: IdOption = None,
    pool: PoolOption = None,
    domain: DomainOption = None,
    provider: ProviderOption = None,
    member: MemberOption = None,
    sender: SenderOption = None,
    older_than: OlderThanOption = None,
    state: StateOption = None,
    all_: AllOption = False,
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
) -> None:
    """Set queued recipients aside until released: never tried, never expired meanwhile."""
    fields = _selector(id_, pool, domain, provider, member, sender, older_than, state, all_)
    _queue_verb("hold", fields, config, url, token, json)


@app.command()
def release(
    message_id: Annotated[
        str | None, typer.Argument(help="A message's id (or choose with --id, ...).")
    ] = None,
    id_: IdOption = None,
    pool: PoolOption = None,
    domain: DomainOption = None,
    provider: ProviderOption = None,
    member: MemberOption = None,
    sender: SenderOption = None,
    older_than: OlderThanOption = None,
    all_: AllOption = False,
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
) -> None:
    """Queue held recipients again, due now (held by `hold`, or after max_local_errors crashes in a row)."""
    fields = _selector(id_, pool, domain, provider, member, sender, older_than, None, all_)
    if message_id is not None and not fields:
        # `release ID`, as before selectors: that message's held recipients, 404 when none is held.
        path = f"/messages/{quote(message_id, safe='')}/release"
        _admin(config, url, token).post(path, as_json=json or not sys.stdout.isatty())
        return
    if message_id is not None:
        fields["id"] = message_id
    _queue_verb("release", fields, config, url, token, json)


@app.command()
def delete(
    id_: IdOption = None,
    pool: PoolOption = None,
    domain: DomainOption = None,
    provider: ProviderOption = None,
    member: MemberOption = None,
    sender: SenderOption = None,
    older_than: OlderThanOption = None,
    state: StateOption = None,
    all_: AllOption = False,
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
) -> None:
    """Remove queued and held recipients silently: no DSN, no delivery (as postsuper -d)."""
    fields = _selector(id_, pool, domain, provider, member, sender, older_than, state, all_)
    _queue_verb("delete", fields, config, url, token, json)


@app.command()
def bounce(
    reason: Annotated[str, typer.Option("--reason", help="Why, in words: the sender reads it in the DSN.")],
    id_: IdOption = None,
    pool: PoolOption = None,
    domain: DomainOption = None,
    provider: ProviderOption = None,
    member: MemberOption = None,
    sender: SenderOption = None,
    older_than: OlderThanOption = None,
    state: StateOption = None,
    all_: AllOption = False,
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
) -> None:
    """End queued and held recipients as bounced (550 5.0.0 with the reason); each sender gets a DSN."""
    fields = _selector(id_, pool, domain, provider, member, sender, older_than, state, all_)
    _queue_verb("bounce", {**fields, "reason": reason}, config, url, token, json)


@app.command()
def move(
    to: Annotated[str, typer.Option("--to", help="The pool to give the recipients to.")],
    id_: IdOption = None,
    pool: PoolOption = None,
    domain: DomainOption = None,
    provider: ProviderOption = None,
    member: MemberOption = None,
    sender: SenderOption = None,
    older_than: OlderThanOption = None,
    state: StateOption = None,
    all_: AllOption = False,
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
) -> None:
    """Give queued and held recipients to another pool, their state and due time kept."""
    fields = _selector(id_, pool, domain, provider, member, sender, older_than, state, all_)
    _queue_verb("move", {**fields, "to": to}, config, url, token, json)


@app.command()
def doctor(
    domain: Annotated[str, typer.Argument(help="The sending domain (the From: and envelope sender's).")],
    local: Annotated[
        bool,
        typer.Option(
            "--local", help="Examine here with the configuration of -c, without asking a running node."
        ),
    ] = False,
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
) -> None:
    """Check a sending domain's DNS against postmux's configuration: MX, SPF (and each pool IP), DKIM
    selectors, DMARC, reverse DNS of source members, MTA-STS, TLS-RPT, then the Gmail/Yahoo bulk-sender
    rules. Exit 0 when nothing fails, 1 when something fails, 2 when the domain could not be examined."""
    as_json = json or not sys.stdout.isatty()
    if not local:
        raise typer.Exit(_admin(config, url, token).doctor(domain, as_json=as_json))
    if config is None:
        typer.echo("postmux doctor: --local needs -c FILE (the configuration to examine with)", err=True)
        raise typer.Exit(EXIT_CONFIG)
    import dataclasses
    import logging

    from postmux.admin.client import print_doctor
    from postmux.logs import configure_logging
    from postmux.reputation.doctor import doctor_domain
    from postmux.reputation.doctor_dns import DnsDoctor

    settings = _load_or_exit(config)
    configure_logging(logging.WARNING)  # the report is the output: only trouble is logged, on stderr
    try:
        name = doctor_domain(domain)
    except ValueError as e:
        typer.echo(f"postmux doctor: {e}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    report = asyncio.run(DnsDoctor(settings).examine(name))
    raise typer.Exit(print_doctor(dataclasses.asdict(report), as_json=as_json))


@app.command()
def reload(
    config: OptionalConfig = None, url: UrlOption = None, token: TokenOption = None, json: JsonOption = False
) -> None:
    """Make the running postmux read its configuration file again (as SIGHUP does)."""
    _admin(config, url, token).post("/reload", as_json=json or not sys.stdout.isatty())


@app.command()
def top(
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    interval: Annotated[float, typer.Option(help="Seconds between frames.", min=0.2)] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
) -> None:
    """The dashboard at a glance in the terminal: members, redundancy, throughput, queues (Ctrl-C quits)."""
    from rich.console import Console

    from postmux.admin import top as view

    client = _admin(config, url, token)
    view.run(lambda: client.get("/dashboard"), interval, once, Console())


suppression_app = typer.Typer(
    rich_markup_mode=None,
    help="The suppression list: recipients who get no more mail (list, add, remove, import, export CSV).",
)
app.add_typer(suppression_app, name="suppression")
AddressArgument = Annotated[str, typer.Argument(help="An address, or *@domain for a whole domain.")]
ScopeOption = Annotated[str, typer.Option("--scope", help="global, sender_domain:DOMAIN or api_key:NAME.")]


@suppression_app.command("list")
def suppression_list(
    address: Annotated[str, typer.Option("--address", help="Only this address (or *@domain).")] = "",
    scope: Annotated[str, typer.Option("--scope", help="Only this scope.")] = "",
    expired: Annotated[bool, typer.Option("--expired", help="Expired entries too.")] = False,
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
) -> None:
    """The entries, oldest first: address, scope, source, reason, when made, when they expire."""
    params = {k: v for k, v in {"address": address, "scope": scope}.items() if v}
    if expired:
        params["expired"] = "true"
    _admin(config, url, token).suppression_list(params, as_json=json or not sys.stdout.isatty())


@suppression_app.command("add")
def suppression_add(
    address: AddressArgument,
    reason: Annotated[
        str, typer.Option("--reason", help="Why (quoted in the 550 reply).")
    ] = "added by an operator",
    source: Annotated[
        str, typer.Option("--source", help="bounce, complaint, unsubscribe or manual.")
    ] = "manual",
    scope: ScopeOption = "global",
    expires_in: Annotated[
        str | None, typer.Option("--expires-in", help="A duration (30d); none: until removed.")
    ] = None,
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
) -> None:
    """Add an entry (or replace the one of that address and scope)."""
    payload: dict[str, object] = {"address": address, "reason": reason, "source": source, "scope": scope}
    if expires_in is not None:
        payload["expires_in"] = expires_in
    _admin(config, url, token).suppression_add(payload, as_json=json or not sys.stdout.isatty())


@suppression_app.command("remove")
def suppression_remove(
    address: AddressArgument,
    scope: ScopeOption = "global",
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
) -> None:
    """Remove the entry of an address (or *@domain) in a scope: mail to it flows again."""
    _admin(config, url, token).suppression_remove(address, scope, as_json=json or not sys.stdout.isatty())


@suppression_app.command("import")
def suppression_import(
    file: Annotated[
        Path, typer.Argument(help="A CSV file with a header row (address required); - for stdin.")
    ],
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonOption = False,
) -> None:
    """Add the entries of a CSV file (export's columns: address,scope,reason,source,created,expires)."""
    data = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
    _admin(config, url, token).suppression_import(data, as_json=json or not sys.stdout.isatty())


@suppression_app.command("export")
def suppression_export(
    expired: Annotated[bool, typer.Option("--expired", help="Expired entries too.")] = False,
    config: OptionalConfig = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Every entry as CSV on standard output."""
    text = _admin(config, url, token).suppression_export({"expired": "true"} if expired else {})
    sys.stdout.write(text)


def main() -> None:
    app()
