"""The configuration reference's examples are real configurations: each full one must load."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from postmux.config import settings_from_dict

DOC = Path(__file__).parents[2] / "docs" / "configuration.md"


def test_every_complete_example_in_the_configuration_reference_loads() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.S)
    complete = [b for b in blocks if "[[pool]]" in b and "members" in b]
    assert complete, "the reference lost its examples"
    for block in complete:
        settings_from_dict(tomllib.loads(block), path="docs/configuration.md")
