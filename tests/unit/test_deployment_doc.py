"""docs/deployment.md's examples are real: its [smtp] table loads, its haproxy.cfg passes `haproxy -c`."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from postmux.config import SmtpSettings
from tests.e2e.test_haproxy import haproxy_binary

DOC = Path(__file__).parents[2] / "docs" / "deployment.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


def test_the_nodes_smtp_table_loads_with_proxy_protocol_on() -> None:
    [node] = blocks("toml")
    smtp = SmtpSettings.model_validate(tomllib.loads(node)["smtp"])
    assert smtp.proxy_protocol and smtp.proxy_trusted == ("10.0.0.5/32",)


def test_the_haproxy_cfg_passes_haproxys_own_check(tmp_path: Path) -> None:
    binary = haproxy_binary()
    if binary is None:
        pytest.skip("haproxy is not installed (.ci/run installs Debian's package)")
    [cfg] = blocks("haproxy")
    assert "send-proxy-v2" in cfg and "option smtpchk" in cfg
    path = tmp_path / "haproxy.cfg"
    path.write_text(cfg)
    checked = subprocess.run([binary, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
