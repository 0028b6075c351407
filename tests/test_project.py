"""Drift tests: the README, CI script, Dockerfile and CLI keep agreeing with each other."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import click

from bot.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _first_code_block(text: str) -> list[str]:
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block, "README has no shell block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands_run_and_test():
    assert README.index("```sh") < 1200, "the set-up commands must be near the top"
    assert _first_code_block(README) == ["make run", "make test"]


def test_ci_runs_the_readmes_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    assert script.rstrip().splitlines()[-1] == "make test"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: lint\n\t\$\(BIN\)/pytest$", makefile, re.M)
    assert re.search(r"^lint: .*\n\t\$\(BIN\)/ruff check \.\n\t\$\(BIN\)/mypy$", makefile, re.M)


def test_every_cli_command_is_documented_in_the_readme():
    ctx = click.Context(main)
    for name in main.list_commands(ctx):
        assert f"rotor {name}" in README, f"`rotor {name}` is missing from README.md"


def test_the_image_is_slim_non_root_and_ships_every_package():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.count("FROM python:3.11-slim") == 2
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    assert 'CMD ["serve"]' in dockerfile and 'ENTRYPOINT ["rotor"]' in dockerfile
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]
    for package in packages:
        assert f"COPY {package} {package}" in dockerfile
    for copied in re.findall(r"^COPY (?!--)(\S+)", dockerfile, re.M):
        assert (ROOT / copied).exists(), f"Dockerfile copies {copied}, which does not exist"


def test_the_console_script_is_rotor():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"rotor": "bot.cli:main"}
