"""A real browser for the dashboard's tests: Playwright driving Debian's chromium (apt package `chromium`,
installed by .ci/run), never a browser that Playwright downloads. Screenshots go to tests/artifacts/
(ignored by git), printed in the test output."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from postmux.app import App
from postmux.testing import CHROMIUM, CHROMIUM_ARGS
from tests.support import send

ARTIFACTS = Path(os.environ.get("POSTMUX_ARTIFACTS", Path(__file__).parents[1] / "artifacts" / "browser"))
TOKEN = "dashboard-token-for-tests"

if not os.path.exists(CHROMIUM):
    pytest.skip(f"no {CHROMIUM}: apt-get install chromium (.ci/run does)", allow_module_level=True)


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Any]:
    """A browser context with a fresh profile (its own user-data-dir under tmp_path)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        context = await p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            args=list(CHROMIUM_ARGS),
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            await context.close()


def screenshot_path(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    print(f"screenshot: {path}")
    return path


async def sign_in(page: Any, app: App, token: str = TOKEN) -> None:
    await page.goto(f"http://127.0.0.1:{app.http_port}/")
    await page.fill("input[name=token]", token)
    await page.click("button[type=submit]")


@contextlib.asynccontextmanager
async def load(app: App, max_messages: int = 3000, max_s: float = 60.0) -> AsyncIterator[Callable[[], int]]:
    """Mail sent to the node in the background, bounded in count and time, stopped on exit.

    Yields how many were sent so far."""
    sent = 0

    async def loop() -> None:
        nonlocal sent
        deadline = time.monotonic() + max_s
        while sent < max_messages and time.monotonic() < deadline:
            await asyncio.gather(*(send(app.smtp_port, f"load-{sent}-{i}") for i in range(4)))
            sent += 4
            await asyncio.sleep(0.02)

    task = asyncio.create_task(loop())
    try:
        yield lambda: sent
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
