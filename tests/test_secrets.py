"""Secrets Manager helpers and AWS sessions, against moto in-process."""

from __future__ import annotations

import json

import boto3
import pytest
from moto import mock_aws

from rotation import redact, secrets
from rotation.aws import AwsClients, session_for
from rotation.catalogue import Environment
from rotation.errors import SecretError

APP = {"host": "db", "port": 3306, "dbname": "signon_production", "username": "signon",
       "password": "OldPassword0123456789abcdefABCDE"}


@pytest.fixture
def sm():
    with mock_aws():
        client = boto3.client("secretsmanager", region_name="eu-west-1")
        client.create_secret(Name="govuk/signon/mysql", SecretString=json.dumps(APP))
        yield client


def test_read_registers_the_password_and_names_missing_keys(sm):
    value = secrets.read_json(sm, "govuk/signon/mysql", required=secrets.APP_KEYS)
    assert value["username"] == "signon"
    assert redact.redact(f"pw={APP['password']}") == "pw=[redacted]"
    sm.put_secret_value(SecretId="govuk/signon/mysql", SecretString=json.dumps({"host": "db"}))
    with pytest.raises(SecretError, match="has no port, dbname, username, password$"):
        secrets.read_json(sm, "govuk/signon/mysql", required=secrets.APP_KEYS)


def test_missing_and_non_json_secrets_fail_clearly(sm):
    with pytest.raises(SecretError, match="^secret nope not found$"):
        secrets.read_json(sm, "nope")
    assert secrets.read_json(sm, "govuk/signon/mysql", stage="AWSPENDING") is None
    sm.put_secret_value(SecretId="govuk/signon/mysql", SecretString="hunter2hunter2")
    with pytest.raises(SecretError, match="is not JSON") as err:
        secrets.read_json(sm, "govuk/signon/mysql")
    assert "hunter2" not in str(err.value)


def test_pending_then_promote_keeps_the_old_version_as_previous(sm):
    old_version = secrets.version_with(sm, "govuk/signon/mysql", "AWSCURRENT")
    pending = secrets.put_pending(sm, "govuk/signon/mysql", {**APP, "username": "signon_user_2"})
    assert secrets.read_json(sm, "govuk/signon/mysql")["username"] == "signon"
    assert secrets.promote(sm, "govuk/signon/mysql", pending) is True
    assert secrets.promote(sm, "govuk/signon/mysql", pending) is False  # twice is harmless
    stages = secrets.versions(sm, "govuk/signon/mysql")
    assert stages[pending] == ["AWSCURRENT"] and stages[old_version] == ["AWSPREVIOUS"]
    # Ask for the stage: moto 5.2.5 answers an unstaged read with the old version.
    assert secrets.read_json(sm, "govuk/signon/mysql")["username"] == "signon_user_2"


def test_unstage_removes_only_the_named_label(sm):
    pending = secrets.put_pending(sm, "govuk/signon/mysql", {**APP, "username": "x_user"})
    assert secrets.unstage(sm, "govuk/signon/mysql", "AWSPENDING", pending) is True
    assert secrets.unstage(sm, "govuk/signon/mysql", "AWSPENDING", pending) is False
    assert secrets.read_json(sm, "govuk/signon/mysql", stage="AWSPENDING") is None
    assert secrets.read_json(sm, "govuk/signon/mysql")["username"] == "signon"


def test_an_environment_role_is_assumed_with_refreshing_credentials():
    with mock_aws():
        iam = boto3.client("iam", region_name="eu-west-1")
        arn = iam.create_role(RoleName="rotor", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        session = session_for("production", Environment(aws_region="eu-west-1",
                                                        aws_role_arn=arn))
        base = boto3.Session().get_credentials().get_frozen_credentials().access_key
        credentials = session.get_credentials().get_frozen_credentials()
        assert credentials.access_key != base  # not the base credentials: the role's
        assert session.region_name == "eu-west-1"
        plain = session_for("staging", Environment(aws_region="eu-west-2"))
        assert plain.get_credentials().get_frozen_credentials().access_key == base


def test_clients_are_made_once_per_environment_and_service():
    with mock_aws():
        clients = AwsClients({"staging": Environment(aws_region="eu-west-1")})
        assert clients.client("staging", "secretsmanager") is clients.client("staging",
                                                                             "secretsmanager")
