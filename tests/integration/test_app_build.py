"""The node's one build path: transports from an injected factory, reload through each component's own
method, and a start or stop that fails halfway leaving nothing half open."""

from __future__ import annotations

from pathlib import Path

from postmux.app import App
from postmux.config import load_config
from postmux.delivery.memory import MemoryFarm
from tests.integration.test_control import write_config
from tests.support import StartUpstream, make_settings, send, send_many, wait_until

# Nothing listens here: a member that tried to connect would fail, so only the fake can deliver.
NOWHERE = "127.0.0.1:9"


async def test_an_app_with_a_fake_transport_factory_delivers_in_memory(tmp_path: Path) -> None:
    farm = MemoryFarm()
    members = [{"name": "a", "address": NOWHERE}, {"name": "b", "address": NOWHERE}]
    settings = make_settings(tmp_path, [{"name": "default", "policy": "round_robin", "members": members}])
    async with App(settings, transport_factory=farm) as app:
        await send_many(app.smtp_port, [f"m{i}" for i in range(6)], concurrency=3)
        await wait_until(lambda: len(farm.delivered) == 6)
        await wait_until(lambda: app.pools["default"].member("a").delivered == 3)
        assert sorted(d.member for d in farm.delivered) == ["a"] * 3 + ["b"] * 3
        assert all(b"X-Test-Id: m" in d.data and d.recipients == ("user@dest.test",) for d in farm.delivered)
        await wait_until(lambda: app.pools["default"].member("b").delivered == 3)
    assert app.pools["default"].member("a").deferred == 0


async def test_a_reload_routes_new_mail_by_the_new_routes(tmp_path: Path, upstream: StartUpstream) -> None:
    a, b = await upstream("a"), await upstream("b")
    cfg = tmp_path / "postmux.toml"
    write_config(cfg, tmp_path, [("a", a.address, 1)])
    bulk = f'\n[[pool]]\nname = "bulk"\nmembers = [{{ name = "b", address = "{b.address}" }}]\n'
    cfg.write_text(cfg.read_text() + bulk)
    async with App(load_config(cfg), config_path=cfg) as app:
        await send(app.smtp_port, "before", sender="news@example.com")
        await wait_until(lambda: len(a.received) == 1)
        route = '\n[[route]]\nmatch = { sender_domain = "example.com" }\npool = "bulk"\n'
        cfg.write_text(cfg.read_text() + route)
        assert app.control.reload().ok
        await send(app.smtp_port, "after", sender="news@example.com")
        await wait_until(lambda: len(b.received) == 1)
    assert [r.test_id for r in a.received] == ["before"] and [r.test_id for r in b.received] == ["after"]
