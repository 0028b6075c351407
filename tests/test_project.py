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


def test_readme_opens_with_exactly_two_commands_demo_and_test():
    assert README.index("```sh") < 1200, "the set-up commands must be near the top"
    assert _first_code_block(README) == ["make demo", "make test"]
    assert "`make run`" in README[README.index("## Running it for real"):]


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


CATALOGUE = """
environments:
  staging: {aws_region: eu-west-1, restored_from: production, restore_time: "03:00"}
  production: {aws_region: eu-west-1}
apps:
  signon: {engine: mysql}
  account-api: {engine: postgres}
iam_users:
  logs:
    environments:
      production:
        secrets: [{id: govuk/logs}]
        manual: [{place: Fastly, instruction: Paste it}]
secrets:
  serverless: {environments: {production: {ecs_services: [{cluster: c, service: s}]}}}
databases:
  signon: {engine: mysql, apps: [signon]}
"""


def test_every_step_of_every_kind_is_in_the_readmes_runbook_table():
    from bot.wiring import kinds
    from rotation import catalogue

    cat = catalogue.parse(CATALOGUE)
    runs = [("mysql", "signon", {}), ("postgres", "account-api", {}),
            ("postgres", "account-api", {"compromised": True}), ("iam-key", "logs", {}),
            ("secret", "serverless", {}), ("rds-admin", "signon", {})]
    table = README[README.index("## Every runbook step"):]
    registered = kinds()
    assert {kind for kind, _, _ in runs} == set(registered)
    for kind, target, params in runs:
        for step in registered[kind].steps(cat, target, "production", params):
            name = re.sub(r"^(manual)-.*", r"\1-<place>", step.name)
            name = re.sub(r"^(rollback)-.*", r"\1-*", name)
            assert f"`{name}`" in table, f"{kind} step {step.name} is missing from README.md"


def test_the_readmes_configuration_reference_is_generated_from_the_models():
    from bot.reference import BEGIN, END, config_reference

    start, end = README.index(BEGIN), README.index(END) + len(END)
    assert README[start:end] == config_reference(), \
        "README is out of date: paste the output of `rotor config-reference`"


def test_every_catalogue_key_has_a_description():
    from bot.reference import config_reference

    for row in config_reference().splitlines():
        if row.startswith("| `"):
            assert row.rstrip(" |").split("|")[-1].strip(), f"no description: {row}"


ENV_READ = re.compile(r"""(?:environ|env|getenv)(?:\.get)?\(?\[?\s*["']([A-Z][A-Z0-9_]{2,})["']""")


# Keys of a WSGI request's environ, and variables set for Python, by pytest, or by tests for
# the client.
WSGI_AND_PYTHON = {"CONTENT_LENGTH", "CONTENT_TYPE", "HTTP_", "PATH_INFO", "REQUEST_METHOD",
                   "PYTHONPATH",
                   "PYTHONUNBUFFERED", "KUBERNETES_SERVICE_PORT", "PYTEST_CURRENT_TEST"}


def test_every_environment_variable_the_code_reads_is_in_the_reference():
    from bot.reference import ENVIRONMENT

    listed = {part.strip() for name in ENVIRONMENT for part in name.split(",")}
    found = set()
    for folder in ("bot", "handlers", "rotation", "tests", "benchmarks", "demo"):
        for path in (ROOT / folder).rglob("*.py"):
            found |= {name for name in ENV_READ.findall(path.read_text())
                      if not name.startswith("AWS_") and name not in WSGI_AND_PYTHON}
    assert {"ROTOR_BIND", "ROTOR_CONFIG", "ROTOR_EXTRA_KINDS"} <= found  # the scan works
    assert found - listed == set(), "add them to bot/reference.py ENVIRONMENT"


def test_the_readme_points_at_nothing_outside_the_repository():
    assert "shared/" not in README and "runbooks/" not in README
    for link in re.findall(r"\]\((?!https?://|#)([^)]+)\)", README):
        assert (ROOT / link).exists(), f"README links to {link}, which is not in the repository"
    assert (ROOT / "LICENSE").read_text().startswith("The MIT License")
