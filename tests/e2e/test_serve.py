"""`postmux serve` as a real process: one per spool, start failures in one line, signals logged and obeyed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.support import StartUpstream, send, toml_head, wait_until

SRC = Path(__file__).resolve().parents[2] / "src"
STARTED = "postmux: smtp on port"


def write_config(tmp_path: Path, member: str, smtp: str = "127.0.0.1:0", http: str = "127.0.0.1:0") -> Path:
    cfg = tmp_path / "postmux.toml"
    cfg.write_text(
        toml_head(tmp_path, smtp=smtp, http=http)
        + f"""[[pool]]
name = "default"
members = [{{ name = "a", address = "{member}" }}]
"""
    )
    return cfg


class Serve:
    """One `postmux serve` process; its stderr goes to a file that the test reads."""

    def __init__(self, cfg: Path, log_path: Path) -> None:
        self.cfg, self.log_path = cfg, log_path
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logged(self, event: str) -> list[dict[str, object]]:
        lines = [json.loads(x) for x in self.output.splitlines() if x.startswith("{")]
        return [x for x in lines if x.get("event") == event]

    async def launch(self) -> Serve:
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        with self.log_path.open("wb") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "postmux", "serve", "-c", str(self.cfg)),
                cwd=self.cfg.parent,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log_file,
            )
        return self

    async def started(self) -> int:
        """Wait for the start line; the SMTP port it names."""
        assert self.proc is not None
        await wait_until(lambda: STARTED in self.output or self.proc.returncode is not None, timeout=30)
        assert STARTED in self.output, f"serve did not start:\n{self.output}"
        return int(self.output.split(STARTED, 1)[1].split(",", 1)[0])

    async def exit_code(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def stop_by_pid(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., Serve]]:
    """Start `postmux serve` processes; each is killed by its PID at the end if it still runs."""
    started: list[Serve] = []

    def make(cfg: Path, name: str = "serve") -> Serve:
        s = Serve(cfg, tmp_path / f"{name}-{len(started)}.log")
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop_by_pid()
        if s.proc is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(s.proc.wait(), 10)


@pytest.mark.slow
async def test_a_second_serve_on_a_held_spool_refuses_naming_the_holder_and_one_starts_after_kill_9(
    tmp_path: Path, upstream: StartUpstream, serve: Callable[..., Serve]
) -> None:
    up = await upstream("a")
    cfg = write_config(tmp_path, up.address)
    first = await serve(cfg, "first").launch()
    port = await first.started()

    second = await serve(cfg, "second").launch()
    assert await second.exit_code() == 2
    refusal = second.output.strip()
    # One line that names the holder; no traceback, no recovery of the first one's work.
    assert refusal.count("\n") == 0, refusal
    assert f"in use by process {first.pid}" in refusal and "spool.db" in refusal, refusal
    assert not second.logged("recovered unfinished work")

    await send(port, "after-the-refusal")  # the first one still owns its spool and delivers, once
    await wait_until(lambda: [r.test_id for r in up.received] == ["after-the-refusal"])

    os.kill(first.pid, signal.SIGKILL)  # the kernel drops the lock with the process
    assert await first.exit_code() == -signal.SIGKILL
    third = await serve(cfg, "third").launch()
    await send(await third.started(), "after-kill-9")
    await wait_until(lambda: "after-kill-9" in [r.test_id for r in up.received])


def _in_use() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize(
    "fault",
    [
        "http port in use",
        "smtp port in use",
        "spool is a directory",
        "spool under a file",
        "log under a file",
    ],
)
async def test_a_failure_only_a_start_can_find_is_one_line_naming_its_cause_and_exit_2(
    tmp_path: Path, serve: Callable[..., Serve], fault: str
) -> None:
    taken = _in_use()
    port = f"127.0.0.1:{taken.getsockname()[1]}"
    try:
        cfg = write_config(
            tmp_path,
            "127.0.0.1:9",
            smtp=port if fault == "smtp port in use" else "127.0.0.1:0",
            http=port if fault == "http port in use" else "127.0.0.1:0",
        )
        (tmp_path / "file").write_text("not a directory")
        text = cfg.read_text()
        if fault == "spool is a directory":
            (tmp_path / "spool.db").mkdir()
        elif fault == "spool under a file":
            text = text.replace(str(tmp_path / "spool.db"), str(tmp_path / "file" / "spool.db"))
        elif fault == "log under a file":
            text = text.replace(str(tmp_path / "events.jsonl"), str(tmp_path / "file" / "events.jsonl"))
        cfg.write_text(text)
        proc = await serve(cfg).launch()
        assert await proc.exit_code() == 2, proc.output
    finally:
        taken.close()
    out = proc.output.strip()
    assert "Traceback" not in out and out.count("\n") == 0, out
    in_file = tmp_path / "file"
    expected = {
        "http port in use": f"[http] listen {port}: ",
        "smtp port in use": f"[smtp] listen {port}: ",
        "spool is a directory": f"spool {tmp_path / 'spool.db'}: ",
        # The parent in the way is named too.
        "spool under a file": f"spool {in_file / 'spool.db'}: file exists ({in_file})",
        "log under a file": f"event log {in_file / 'events.jsonl'}: file exists ({in_file})",
    }[fault]
    assert out.startswith("postmux: cannot start: ") and expected in out, out
    if "port" in fault:
        assert "address already in use" in out, out


@pytest.mark.slow
async def test_start_and_sigterm_are_logged_with_each_step_of_the_shutdown(
    tmp_path: Path, upstream: StartUpstream, serve: Callable[..., Serve]
) -> None:
    up = await upstream("a")
    proc = await serve(write_config(tmp_path, up.address)).launch()
    await proc.started()
    [listening] = proc.logged("http listening")  # the start log says what the HTTP listener serves
    assert listening["admin_api"] == "off" and listening["listen"] == "127.0.0.1:0"
    os.kill(proc.pid, signal.SIGTERM)
    assert await proc.exit_code() == 0, proc.output
    [received] = proc.logged("signal received")
    assert received["signal"] == "SIGTERM"
    steps = [
        "shutdown: stopped accepting mail",
        "shutdown: finishing attempts in flight",
        "shutdown: spool closed",
        "stopped",
    ]
    for step in steps:
        assert proc.logged(step), f"{step!r} not logged:\n{proc.output}"
    order = [json.loads(x)["event"] for x in proc.output.splitlines() if x.startswith("{")]
    assert [e for e in order if e in steps] == steps


@pytest.mark.slow
async def test_sighup_reopens_the_event_log_after_it_was_moved_away(
    tmp_path: Path, upstream: StartUpstream, serve: Callable[..., Serve]
) -> None:
    up = await upstream("a")
    proc = await serve(write_config(tmp_path, up.address)).launch()
    port = await proc.started()
    log, rotated = tmp_path / "events.jsonl", tmp_path / "events.jsonl.1"

    def logged_ids(path: Path) -> str:
        return path.read_text() if path.exists() else ""

    await send(port, "before-rotation")
    await wait_until(lambda: "Delivery" in logged_ids(log))
    log.rename(rotated)  # as logrotate does, then it sends SIGHUP
    os.kill(proc.pid, signal.SIGHUP)
    await wait_until(lambda: log.exists(), timeout=10)
    await send(port, "after-rotation")
    await wait_until(lambda: len(up.received) == 2)
    await wait_until(lambda: '"type":"Delivery"' in logged_ids(log))
    assert logged_ids(rotated).count('"type":"Delivery"') == 1  # the moved file got nothing more
    assert proc.logged("signal received")[0]["signal"] == "SIGHUP"
    assert proc.proc is not None and proc.proc.returncode is None  # SIGHUP does not stop it
    await wait_until(lambda: bool(proc.logged("configuration reloaded")))  # and it still reloads


@pytest.mark.slow
async def test_a_sighup_while_the_node_starts_is_a_reload_once_started_not_the_end_of_it(
    tmp_path: Path, upstream: StartUpstream, serve: Callable[..., Serve]
) -> None:
    """SIGHUP's default action ends a process, and the handler came only once the node had started: a
    logrotate's SIGHUP during a start (the ingress workers take a while) killed the node (exit 129)."""
    up = await upstream("a")
    cfg = write_config(tmp_path, up.address)
    cfg.write_text(cfg.read_text().replace("[smtp]\n", "[smtp]\nworkers = 2\n"))
    proc = await serve(cfg).launch()

    def children() -> str:  # the ingress workers, which the node starts (and waits for) while starting
        tasks = Path(f"/proc/{proc.pid}/task")
        return "".join(t.joinpath("children").read_text() for t in tasks.iterdir()) if tasks.exists() else ""

    await wait_until(lambda: bool(children().strip()), timeout=30, interval=0.005)
    assert not proc.logged("http listening")  # still starting
    os.kill(proc.pid, signal.SIGHUP)
    await proc.started()
    await wait_until(lambda: bool(proc.logged("configuration reloaded")), timeout=10)
    assert proc.proc is not None and proc.proc.returncode is None, proc.output
    os.kill(proc.pid, signal.SIGTERM)
    assert await proc.exit_code() == 0, proc.output
