"""Idempotency across a crash: one Idempotency-Key sent 5 times, once after kill -9 of `postmux serve` and a
restart, stores and delivers one message, and every answer carries the same ids.

The key, the request's digest and the answer are in the spool, written in the transaction that stored the
message (Spool.store_all): the restarted process finds them there, whatever it remembered in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import httpx
import pytest

from postmux.passwords import hash_password
from tests.e2e.test_crash import start_serve, tail, write_config
from tests.support import Upstream, accept, free_port, wait_until

API_KEY = "crash-" + "c" * 26
BODY = {
    "envelope_sender": "app@example.com",
    "recipients": [{"email": "user@dest.test"}],
    "content": "From: app@example.com\nSubject: once\nX-Test-Id: once-only\n\nexactly once\n",
    "tags": {"test": "idempotency"},
}


async def submit(http_port: int) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=10) as client:
        return await client.post(
            "/api/v1/messages",
            json=BODY,
            headers={"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": "order-77"},
        )


@pytest.mark.slow
async def test_a_replayed_key_delivers_once_across_kill_9_and_restart(tmp_path: Path) -> None:
    up = await Upstream("up", accept).start()
    smtp_port, http_port = free_port(), free_port()
    cfg = write_config(tmp_path, smtp_port, http_port, [(up.name, up.address, 2)])
    cfg.write_text(
        cfg.read_text() + f'\n[[api_key]]\nname = "crash"\nhash = "{hash_password(API_KEY, n=1024)}"\n'
    )
    logs = [tmp_path / "serve-1.log", tmp_path / "serve-2.log"]
    procs = []
    try:
        procs.append(await start_serve(cfg, logs[0], smtp_port))
        answers = [await submit(http_port) for _ in range(3)]
        procs[0].send_signal(signal.SIGKILL)
        await procs[0].wait()
        procs.append(await start_serve(cfg, logs[1], smtp_port))
        answers += [await submit(http_port) for _ in range(2)]
        assert [a.status_code for a in answers] == [202] * 5, [a.text for a in answers]
        ids = [[m["id"] for m in a.json()["messages"]] for a in answers]
        assert all(i == ids[0] for i in ids) and len(ids[0]) == 1, ids
        assert [a.headers.get("Idempotent-Replayed") for a in answers] == [None] + ["true"] * 4
        await wait_until(lambda: len(up.received) >= 1, timeout=20)
        await asyncio.sleep(1.5)  # a second copy, if one were stored, would be delivered by now
        copies = [r for r in up.received if r.header("X-Test-Id") == "once-only"]
        assert len(copies) == 1, f"{len(copies)} copies delivered\n{tail(logs[1])}"
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 20)
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        await up.stop()
