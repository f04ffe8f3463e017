from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from postmux.cli import app

GOOD = """
[smtp]
listen = "127.0.0.1:0"
[[pool]]
name = "default"
members = [{ name = "a", address = "127.0.0.1:2601" }]
"""


def test_check_config_ok(tmp_path: Path) -> None:
    cfg = tmp_path / "ok.toml"
    cfg.write_text(GOOD)
    result = CliRunner().invoke(app, ["check-config", "-c", str(cfg)])
    assert result.exit_code == 0 and result.stdout.strip() == "OK"


def test_check_config_lists_every_error_and_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(GOOD.replace('"127.0.0.1:2601"', '"no-port"') + '\n[retry]\nmax_age = "forever"\n')
    result = CliRunner().invoke(app, ["check-config", "-c", str(cfg)])
    assert result.exit_code == 2
    assert f"{cfg}: pool[0].members[0].address: 'no-port' is not host:port" in result.stderr
    assert f"{cfg}: retry.max_age: 'forever' is not a duration" in result.stderr


def test_serve_refuses_a_bad_file_the_same_way(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[smtp]\nlisten = 1\n")
    done = subprocess.run(
        [sys.executable, "-m", "postmux", "serve", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(Path(__file__).parents[2] / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2
    assert f"{cfg}: smtp.listen:" in done.stderr and f"{cfg}: pool:" in done.stderr
    assert "Traceback" not in done.stderr
