"""rotor.yml: conventions, overrides, and errors that name the key and what is wrong."""

from __future__ import annotations

import pytest

from rotation import catalogue
from rotation.errors import ConfigError, UnknownName

ISSUE_EXAMPLE = """
environments:
  staging:    {aws_region: eu-west-1}
  production: {aws_region: eu-west-1, aws_role_arn: "arn:aws:iam::111111111111:role/rotor", kube_context: production}
apps:
  signon: {engine: mysql}
"""


def test_a_typical_app_is_one_line_with_every_default_resolved():
    target = catalogue.parse(ISSUE_EXAMPLE).target("signon", "production")
    assert target.secret == "govuk/signon/mysql"
    assert target.admin_secret == "production-rds-admin-passwords"
    assert (target.admin_key, target.admin_user) == ("signon", "aws_db_admin")
    assert (target.namespace, target.external_secret) == ("apps", "signon-mysql")
    assert (target.deployment, target.container, target.secret_key) == ("signon", "app",
                                                                        "DATABASE_URL")


def test_overrides_per_app_and_per_app_and_environment():
    cat = catalogue.parse(ISSUE_EXAMPLE.replace(
        "signon: {engine: mysql}",
        "signon:\n    engine: mysql\n    admin_key: signon-mysql\n    environments:\n"
        "      production: {deployment: signon-web, admin_key: blue-mysql}"))
    assert cat.target("signon", "staging").admin_key == "signon-mysql"
    assert cat.target("signon", "staging").deployment == "signon"
    prod = cat.target("signon", "production")
    assert (prod.admin_key, prod.deployment) == ("blue-mysql", "signon-web")


def test_production_defaults_to_four_eyes_and_second_line():
    cat = catalogue.parse(ISSUE_EXAMPLE)
    assert cat.four_eyes("production") and cat.notify_second_line("production")
    assert not cat.four_eyes("staging") and not cat.notify_second_line("staging")


@pytest.mark.parametrize("text, message", [
    ("apps: {}", "rotor.yml: environments: Field required"),
    ("environments: {staging: {}}", "rotor.yml: environments.staging.aws_region: Field required"),
    (ISSUE_EXAMPLE.replace("engine: mysql", "engine: oracle"),
     "rotor.yml: apps.signon.engine: Input should be 'mysql' or 'postgres'"),
    (ISSUE_EXAMPLE.replace("engine: mysql", "engine: mysql, colour: red"),
     "rotor.yml: apps.signon.colour: unknown key"),
    (ISSUE_EXAMPLE.replace("signon:", "'sign on;':"),
     "rotor.yml: apps: name 'sign on;' must be lower-case letters, digits and hyphens"),
    ("environments: [1, 2", "rotor.yml line 1: not valid YAML"),
    ("- just a list", "rotor.yml: expected a mapping"),
    ("environments:\n  staging: {aws_region: eu-west-1, restored_from: production, restore_time: '03:00'}",
     "rotor.yml: environments.staging.restored_from: no environment named 'production'"),
    ("environments:\n  staging: {aws_region: eu-west-1, timezone: Mars/Olympus}",
     "rotor.yml: environments.staging.timezone: unknown timezone 'Mars/Olympus'"),
])
def test_a_bad_catalogue_names_the_key_and_what_is_wrong(text, message):
    with pytest.raises(ConfigError) as err:
        catalogue.parse(text)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_unknown_names_suggest_the_closest():
    cat = catalogue.parse(ISSUE_EXAMPLE)
    with pytest.raises(UnknownName, match="unknown app 'sigon' \\(did you mean 'signon'\\?\\)"):
        cat.target("sigon", "staging")
    with pytest.raises(UnknownName, match="did you mean 'production'"):
        cat.environment("prodution")


def test_a_missing_file_says_how_to_point_at_one(tmp_path):
    with pytest.raises(ConfigError, match="no such file \\(set --config or ROTOR_CONFIG\\)"):
        catalogue.load(tmp_path / "nope.yml")


def test_the_shipped_catalogue_is_valid():
    cat = catalogue.load("rotor.yml")
    assert "signon" in cat.apps


FULL = ISSUE_EXAMPLE + """
iam_users:
  govuk-fastly-logs:
    environments:
      production:
        secrets: [{id: govuk/fastly/logs}]
        external_secrets: [fastly-logs]
        deployments: [fastly-logs]
        ecs_services: [{cluster: main, service: logs}]
        manual: [{place: Fastly CDN logging, instruction: "Paste the new key into the logging endpoint"}]
secrets:
  serverless-credentials:
    environments:
      staging: {ecs_services: [{cluster: FargateClusterDemo, service: FargateServiceDemo}]}
databases:
  signon: {engine: mysql, apps: [signon]}
"""


def test_iam_users_secrets_and_databases_are_catalogued():
    cat = catalogue.parse(FULL)
    places = cat.iam_user("govuk-fastly-logs", "production")
    assert places.secrets[0].key_id_field == "access_key_id"
    assert places.manual[0].place == "Fastly CDN logging"
    assert cat.managed_secret("serverless-credentials", "staging").ecs_services[0].service == \
        "FargateServiceDemo"
    assert cat.database("signon").backup_secret == "govuk/db-backup/passwd"
    assert cat.key_age.max_key_age_days == 90 and cat.key_age.warn_days == 80
    with pytest.raises(UnknownName, match="has no key in staging"):
        cat.iam_user("govuk-fastly-logs", "staging")
    with pytest.raises(UnknownName, match="is not rotated in production"):
        cat.managed_secret("serverless-credentials", "production")


def test_sections_may_only_name_known_environments_and_apps():
    with pytest.raises(ConfigError, match="iam_users.u.environments.moon: no such environment"):
        catalogue.parse(ISSUE_EXAMPLE + "iam_users: {u: {environments: {moon: {}}}}")
    with pytest.raises(ConfigError, match="databases.d.apps: no app named 'nope'"):
        catalogue.parse(ISSUE_EXAMPLE + "databases: {d: {engine: mysql, apps: [nope]}}")


def _errors(text: str) -> str:
    with pytest.raises(ConfigError) as err:
        catalogue.parse(text)
    return str(err.value)


def test_every_problem_is_reported_at_once_and_a_misspelt_key_gets_its_name():
    message = _errors("""
environments:
  staging: {aws_regoin: eu-west-1}
  production: {aws_region: eu-wset-1, aws_role_arn: not-an-arn}
apps:
  signon: {engine: mysql, deploymnet: web}
key_age: {schedule: "0 9 * * someday", timezone: Europe/Lundun}
slack: {channel: govuk-developers, second_line_channel: "#Has Spaces"}
""")
    lines = message.splitlines()
    assert lines[0] == "rotor.yml: 8 problems:"
    assert "environments.staging.aws_regoin: unknown key (did you mean 'aws_region'?)" in lines[1]
    assert "Field required" not in message  # the misspelt key is the one reason
    expected = [
        "environments.production.aws_region: unknown AWS region 'eu-wset-1' "
        "(did you mean 'eu-west-1'?)",
        "environments.production.aws_role_arn: 'not-an-arn' is not an IAM role ARN",
        "apps.signon.deploymnet: unknown key (did you mean 'deployment'?)",
        "key_age.schedule: '0 9 * * someday' is not a cron expression",
        "key_age.timezone: unknown timezone 'Europe/Lundun'",
        "slack.channel: channel 'govuk-developers' must be '#name' (lower case) or a channel ID "
        "(did you mean '#govuk-developers'?)",
        "slack.second_line_channel: channel '#Has Spaces' must be",
    ]
    for line in expected:
        assert any(line in got for got in lines), (line, message)


def test_cross_references_are_all_reported_too():
    message = _errors(ISSUE_EXAMPLE + "iam_users: {u: {environments: {prod: {}}}}\n"
                      "databases: {d: {engine: mysql, apps: [sigon]}}")
    assert "2 problems" in message
    assert "iam_users.u.environments.prod: no such environment (did you mean 'production'?)" \
        in message
    assert "databases.d.apps: no app named 'sigon' (did you mean 'signon'?)" in message


def test_valid_values_pass():
    cat = catalogue.parse(ISSUE_EXAMPLE + """
key_age: {schedule: "30 8 * * mon-fri", timezone: America/New_York}
slack: {channel: "#rotor_test-1", second_line_channel: C0123ABCDE}
""")
    assert cat.key_age.schedule == "30 8 * * mon-fri"
    assert cat.environments["production"].aws_region == "eu-west-1"


@pytest.mark.parametrize("typed, meant", [("prod", "production"), ("live", "production"),
                                          ("stg", "staging"), ("stag", "staging"),
                                          ("Production", "production"), ("produc", "production")])
def test_aliases_and_prefixes_suggest_the_environment(typed, meant):
    cat = catalogue.parse(ISSUE_EXAMPLE)
    with pytest.raises(UnknownName, match=f"unknown environment '{typed}' "
                                          f"\\(did you mean '{meant}'\\?\\)"):
        cat.environment(typed)
