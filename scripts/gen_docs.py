"""Regenerate docs/config.md and docs/cli.md from the code (tests/test_docs.py checks they are current).

Usage: python scripts/gen_docs.py
"""

from __future__ import annotations

from pathlib import Path

import click
from click.testing import CliRunner

from dpbp.cli import main
from dpbp.config import doc_markdown

DOCS = Path(__file__).resolve().parent.parent / "docs"


def config_reference() -> str:
    return doc_markdown()  # the same text `dpbp config show --doc` prints


def commands(group: click.Group, prefix: list[str]):
    for name in sorted(group.commands):
        cmd = group.commands[name]
        yield [*prefix, name], cmd
        if isinstance(cmd, click.Group):
            yield from commands(cmd, [*prefix, name])


def cli_reference() -> str:
    runner = CliRunner()
    parts = ["# CLI reference\n", "Generated from `dpbp ... --help` by `scripts/gen_docs.py` (do not edit by hand).\n"]
    for path, _ in [([], main), *commands(main, [])]:
        result = runner.invoke(main, [*path, "--help"], terminal_width=100)
        title = " ".join(["dpbp", *path])
        parts.append(f"\n## `{title}`\n\n```text\n{result.output.rstrip()}\n```\n")
    return "".join(parts)


def main_() -> None:
    DOCS.mkdir(exist_ok=True)
    (DOCS / "config.md").write_text(config_reference())
    (DOCS / "cli.md").write_text(cli_reference())
    print(f"wrote {DOCS / 'config.md'} and {DOCS / 'cli.md'}")


if __name__ == "__main__":
    main_()
