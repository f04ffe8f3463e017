"""The configuration reference's examples are real configurations: each full one must load."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, TypeAdapter
from typer.testing import CliRunner

from postmux import config
from postmux.cli import app
from postmux.config import load_config, settings_from_dict

DOC = Path(__file__).parents[2] / "docs" / "configuration.md"


def test_every_complete_example_in_the_configuration_reference_loads() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.S)
    complete = [b for b in blocks if "[[pool]]" in b and "members" in b]
    assert complete, "the reference lost its examples"
    for block in complete:
        settings_from_dict(tomllib.loads(block), path="docs/configuration.md")


ROOT = Path(__file__).parents[2]
SAMPLE = ROOT / "docs" / "examples" / "postmux.toml"
# The reference's headings whose tables document one settings model each.
SECTIONS: dict[str, type[BaseModel]] = {
    "[smtp]": config.SmtpSettings,
    "[smtp.tls]": config.SmtpTlsSettings,
    "[http]": config.HttpSettings,
    "[api]": config.ApiSettings,
    "[[api_key]]": config.ApiKey,
    "[spool]": config.SpoolSettings,
    "[retry]": config.RetrySettings,
    "[delivery]": config.DeliverySettings,
    "[events]": config.EventSettings,
    "[shutdown]": config.ShutdownSettings,
    "[[pool]]": config.PoolSettings,
    "Members": config.MemberSettings,
    "IP warm-up": config.WarmupSettings,
    "[pool.health]": config.HealthSettings,
    "[pool.check]": config.CheckSettings,
    "[dns]": config.DnsSettings,
    "[spf]": config.SpfSettings,
    "[bounces]": config.BounceSettings,
    "[suppression]": config.SuppressionSettings,
    "[shaping]": config.ShapingSettings,
    "[throttles]": config.ThrottlesSettings,
    "Reactions": config.ReactionRule,
    "[[webhook]]": config.WebhookSettings,
    "[[dkim]]": config.DkimSettings,
    "Selectors": config.DkimSelectorSettings,
    "[dmarc]": config.DmarcSettings,
    "[unsubscribe]": config.UnsubscribeSettings,
}


def documented_defaults() -> list[tuple[str, type[BaseModel], str, object]]:
    """(section, model, key, default) for each table row whose default is one TOML literal."""
    rows: list[tuple[str, type[BaseModel], str, object]] = []
    section = ""
    for line in DOC.read_text().splitlines():
        heading = re.match(r"#+ (.*)", line)
        if heading:
            section = heading.group(1).strip()
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        model = SECTIONS.get(section)
        literal = re.fullmatch(r"`([^`]+)`(?: \(.*\))?", cells[2]) if len(cells) >= 4 else None
        if model is None or literal is None or not re.fullmatch(r"`\w+`", cells[0]):
            continue
        try:
            value = tomllib.loads(f"x = {literal.group(1)}")["x"]
        except tomllib.TOMLDecodeError:
            continue
        rows.append((section, model, cells[0].strip("`"), value))
    return rows


def test_every_default_in_the_configuration_reference_is_the_codes_default() -> None:
    rows = documented_defaults()
    assert len(rows) > 60, "the reference's tables were not found"
    wrong = []
    for section, model, key, value in rows:
        field = model.model_fields[key]
        kind = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
        documented = TypeAdapter(kind).validate_python(value)
        default = field.default
        if key == "tls" and model is config.MemberSettings:
            default = "opportunistic"  # documented as the effective mode of a member without credentials
        if documented != default and not (isinstance(default, tuple) and tuple(documented) == default):
            wrong.append(f"{section} {key}: documented {value!r}, code {default!r}")
    assert wrong == []


def test_the_sample_configuration_passes_check_config() -> None:
    result = CliRunner().invoke(app, ["check-config", "-c", str(SAMPLE)])
    assert result.exit_code == 0 and result.stdout == "OK\n", result.output
    settings = load_config(SAMPLE)
    assert [p.name for p in settings.pool] == ["default", "bulk"]


def test_the_docs_point_at_nothing_outside_the_repository() -> None:
    docs = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    outside = []
    for doc in docs:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            resolved = (doc.parent / target).resolve()
            if not resolved.exists() or ROOT.resolve() not in resolved.parents:
                outside.append(f"{doc.relative_to(ROOT)}: link {target}")
        for path in re.findall(r"`((?:\.\./|/work/|/home/)[^`]*)`", text):
            outside.append(f"{doc.relative_to(ROOT)}: path {path}")
    assert outside == []


def test_the_license_pyproject_names_is_in_the_repository() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
