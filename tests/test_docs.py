"""The generated references in docs/ match the code, and the README's set-up block is as promised."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_current():
    assert (ROOT / "docs" / "config.md").read_text() == load_generator().config_reference(), \
        "docs/config.md is stale: run python scripts/gen_docs.py"


def test_cli_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == load_generator().cli_reference(), \
        "docs/cli.md is stale: run python scripts/gen_docs.py"


def test_readme_opens_with_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```[a-z]*\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert len(block) == 2
    assert block[0].startswith("pip install") and block[0].endswith("dpbp train")
    assert block[1].startswith("pip install") and "pytest" in block[1]
