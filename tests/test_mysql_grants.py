"""normalize_grants: SHOW GRANTS output of MySQL 5.7/8 and MariaDB 10.11, compared by content."""

from __future__ import annotations

import pytest

from rotation.errors import DatabaseError
from rotation.mysql_db import GRANTEE, normalize_grants

OLD, NEW = "signon", "signon_user_20260121"
HASH = "*6C8989366EAF75BB670AD8EA7A7FC1176A95CEF4"


# One SHOW GRANTS line and the canonical grants it stands for.
CANONICAL = [
    pytest.param(
        "GRANT USAGE ON *.* TO `signon`@`%`",
        {"GRANT USAGE ON *.* TO <grantee>"},
        id="mysql8-usage",
    ),
    pytest.param(
        f"GRANT USAGE ON *.* TO `signon`@`%` IDENTIFIED BY PASSWORD '{HASH}'",
        {"GRANT USAGE ON *.* TO <grantee>"},
        id="mariadb-usage-with-password-hash",
    ),
    pytest.param(
        f"GRANT RELOAD, PROCESS ON *.* TO `signon`@`%` IDENTIFIED BY PASSWORD '{HASH}'"
        " REQUIRE SSL WITH MAX_QUERIES_PER_HOUR 10 MAX_USER_CONNECTIONS 20",
        {"GRANT PROCESS, RELOAD ON *.* TO <grantee>"},
        id="mariadb-global-with-require-and-limits",
    ),
    pytest.param(
        f"GRANT USAGE ON *.* TO 'signon'@'%' IDENTIFIED BY PASSWORD '{HASH}'"
        " REQUIRE ISSUER '/C=GB/CN=ca' SUBJECT '/CN=signon' CIPHER 'ECDHE-RSA-AES256-SHA'"
        " WITH MAX_STATEMENT_TIME 0.5",
        {"GRANT USAGE ON *.* TO <grantee>"},
        id="require-issuer-subject-cipher",
    ),
    pytest.param(
        "GRANT USAGE ON *.* TO `signon`@`%` IDENTIFIED VIA ed25519"
        " USING 'ZIgUREUg5PVgQ6LskhXmO+eZLS0nC8be6HPjYWR4YJY'",
        {"GRANT USAGE ON *.* TO <grantee>"},
        id="mariadb-ed25519",
    ),
    pytest.param(
        "GRANT ALL PRIVILEGES ON `signon_production`.* TO `signon`@`%`",
        {"GRANT ALL PRIVILEGES ON `signon_production`.* TO <grantee>"},
        id="database-level",
    ),
    pytest.param(
        "GRANT ALL ON `signon_production`.* TO 'signon'@'%' WITH GRANT OPTION",
        {"GRANT ALL PRIVILEGES ON `signon_production`.* TO <grantee> WITH GRANT OPTION"},
        id="all-spelt-short-with-grant-option",
    ),
    pytest.param(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON `signon_production`.`users` TO `signon`@`%`",
        {"GRANT DELETE, INSERT, SELECT, UPDATE ON `signon_production`.`users` TO <grantee>"},
        id="table-level-privileges-sorted",
    ),
    pytest.param(
        "GRANT SELECT (`id`, `email`), UPDATE (`email`) ON `signon_production`.`users`"
        " TO `signon`@`%`",
        {
            "GRANT SELECT (`email`, `id`), UPDATE (`email`) ON `signon_production`.`users` TO <grantee>"
        },
        id="mysql8-columns-sorted",
    ),
    pytest.param(
        "GRANT SELECT (email, id) ON `signon_production`.`users` TO 'signon'@'%'",
        {"GRANT SELECT (`email`, `id`) ON `signon_production`.`users` TO <grantee>"},
        id="mysql57-unquoted-columns",
    ),
    pytest.param(
        "GRANT SELECT, SELECT (`b`, `a`), INSERT (`c`, `a`), UPDATE ON `app`.`t`"
        " TO `signon`@`%` WITH GRANT OPTION",
        {
            "GRANT INSERT (`a`, `c`), SELECT, SELECT (`a`, `b`), UPDATE ON `app`.`t` TO <grantee> WITH GRANT OPTION"
        },
        id="mariadb-table-and-column-grants-in-one-line",
    ),
    pytest.param(
        "GRANT EXECUTE, ALTER ROUTINE ON PROCEDURE `app`.`purge_sessions` TO `signon`@`%`",
        {"GRANT ALTER ROUTINE, EXECUTE ON PROCEDURE `app`.`purge_sessions` TO <grantee>"},
        id="routine-level",
    ),
    pytest.param(
        "GRANT EXECUTE ON FUNCTION `app`.`slug` TO 'signon'@'%'",
        {"GRANT EXECUTE ON FUNCTION `app`.`slug` TO <grantee>"},
        id="function-level",
    ),
    pytest.param(
        "GRANT BACKUP_ADMIN,XA_RECOVER_ADMIN ON *.* TO `signon`@`%` WITH GRANT OPTION",
        {"GRANT BACKUP_ADMIN, XA_RECOVER_ADMIN ON *.* TO <grantee> WITH GRANT OPTION"},
        id="mysql8-dynamic-privileges",
    ),
    pytest.param(
        "GRANT PROXY ON ``@`` TO `signon`@`%` WITH GRANT OPTION",
        {"GRANT PROXY ON ''@'' TO <grantee> WITH GRANT OPTION"},
        id="mysql8-proxy",
    ),
    pytest.param(
        "GRANT `app_read`@`%`,`app_write`@`%` TO `signon`@`%`",
        {"GRANT `app_read`@`%` TO <grantee>", "GRANT `app_write`@`%` TO <grantee>"},
        id="mysql8-roles",
    ),
    pytest.param(
        "GRANT `app_admin`@`%` TO `signon`@`%` WITH ADMIN OPTION",
        {"GRANT `app_admin`@`%` TO <grantee> WITH ADMIN OPTION"},
        id="mysql8-role-with-admin-option",
    ),
    pytest.param(
        "GRANT `app_read` TO `signon`@`%`",
        {"GRANT `app_read` TO <grantee>"},
        id="mariadb-role",
    ),
    pytest.param(
        "SET DEFAULT ROLE `app_read` FOR `signon`@`%`",
        {"SET DEFAULT ROLE `app_read` FOR <grantee>"},
        id="mariadb-default-role",
    ),
    pytest.param(
        "REVOKE DELETE ON `mysql`.* FROM `signon`@`%`",
        {"REVOKE DELETE ON `mysql`.* FROM <grantee>"},
        id="mysql8-partial-revoke",
    ),
    pytest.param(
        "GRANT SELECT ON `app\\_%`.* TO `signon`@`10.0.%`",
        {"GRANT SELECT ON `app\\_%`.* TO <grantee>"},
        id="wildcard-database-and-host",
    ),
    pytest.param(
        "GRANT ALL PRIVILEGES ON `signon`.* TO `signon`@`%`",
        {"GRANT ALL PRIVILEGES ON `signon`.* TO <grantee>"},
        id="database-named-like-the-user",
    ),
]


@pytest.mark.parametrize(("line", "expected"), CANONICAL)
def test_canonical_form(line: str, expected: set[str]) -> None:
    host = "10.0.%" if "10.0.%" in line else "%"
    normalized = normalize_grants([line], OLD, host)
    assert normalized == expected
    assert all(GRANTEE in grant and "PASSWORD" not in grant for grant in normalized)


# Two users holding the same grants, printed differently.
SAME = [
    pytest.param(
        "%",
        [
            "GRANT USAGE ON *.* TO `signon`@`%`",
            "GRANT ALL PRIVILEGES ON `signon_production`.* TO `signon`@`%`",
        ],
        [
            "GRANT USAGE ON *.* TO `signon_user_20260121`@`%`",
            "GRANT ALL PRIVILEGES ON `signon_production`.* TO `signon_user_20260121`@`%`",
        ],
        id="runbook-example",
    ),
    pytest.param(
        "%",
        [
            "GRANT SELECT, RELOAD, PROCESS ON *.* TO `signon`@`%` WITH GRANT OPTION",
            "GRANT BACKUP_ADMIN,XA_RECOVER_ADMIN ON *.* TO `signon`@`%`",
            "GRANT SELECT (`id`, `email`), INSERT (`email`) ON `app`.`users` TO `signon`@`%`",
            "GRANT EXECUTE ON PROCEDURE `app`.`purge` TO `signon`@`%`",
            "GRANT `app_read`@`%`,`app_write`@`%` TO `signon`@`%`",
            "GRANT `app_admin`@`%` TO `signon`@`%` WITH ADMIN OPTION",
            "REVOKE DELETE ON `mysql`.* FROM `signon`@`%`",
        ],
        [
            "GRANT PROCESS, RELOAD, SELECT ON *.* TO `signon_user_20260121`@`%` WITH GRANT OPTION",
            "GRANT XA_RECOVER_ADMIN,BACKUP_ADMIN ON *.* TO `signon_user_20260121`@`%`",
            "GRANT INSERT (`email`), SELECT (`email`, `id`) ON `app`.`users`"
            " TO `signon_user_20260121`@`%`",
            "GRANT EXECUTE ON PROCEDURE `app`.`purge` TO `signon_user_20260121`@`%`",
            "GRANT `app_write`@`%`,`app_read`@`%` TO `signon_user_20260121`@`%`",
            "GRANT `app_admin`@`%` TO `signon_user_20260121`@`%` WITH ADMIN OPTION",
            "REVOKE DELETE ON `mysql`.* FROM `signon_user_20260121`@`%`",
        ],
        id="mysql8",
    ),
    pytest.param(
        "%",
        [
            "GRANT USAGE ON *.* TO 'signon'@'%' IDENTIFIED BY PASSWORD '*6C8989366EAF75BB670AD8EA7A7"
            "FC1176A95CEF4' REQUIRE SSL WITH MAX_USER_CONNECTIONS 20",
            "GRANT SELECT (email, id) ON `app`.`users` TO 'signon'@'%'",
            "GRANT ALL PRIVILEGES ON `app`.* TO 'signon'@'%' WITH GRANT OPTION",
        ],
        [
            "GRANT USAGE ON *.* TO `signon_user_20260121`@`%` REQUIRE SSL",
            "GRANT SELECT (`id`, `email`) ON `app`.`users` TO `signon_user_20260121`@`%`",
            "GRANT ALL PRIVILEGES ON `app`.* TO `signon_user_20260121`@`%` WITH GRANT OPTION",
        ],
        id="mysql57-single-quotes-vs-mysql8-backticks",
    ),
    pytest.param(
        "%",
        [
            f"GRANT RELOAD, PROCESS ON *.* TO `signon`@`%` IDENTIFIED BY PASSWORD '{HASH}'"
            " REQUIRE SSL",
            "GRANT ALL PRIVILEGES ON `signon_production`.* TO `signon`@`%`",
            "GRANT SELECT, SELECT (`a`, `b`), INSERT (`a`, `c`), UPDATE ON `signon_production`.`t`"
            " TO `signon`@`%` WITH GRANT OPTION",
            "GRANT EXECUTE ON PROCEDURE `signon_production`.`p` TO `signon`@`%`",
            "GRANT `app_read` TO `signon`@`%`",
            "GRANT `app_admin` TO `signon`@`%` WITH ADMIN OPTION",
            "SET DEFAULT ROLE `app_read` FOR `signon`@`%`",
        ],
        [
            "GRANT `app_admin` TO `signon_user_20260121`@`%` WITH ADMIN OPTION",
            "GRANT `app_read` TO `signon_user_20260121`@`%`",
            "GRANT RELOAD, PROCESS ON *.* TO `signon_user_20260121`@`%` IDENTIFIED BY PASSWORD"
            " '*0D3CED9BEC10A777AEC23CCC353A8C08A633045E' REQUIRE SSL",
            "GRANT ALL PRIVILEGES ON `signon_production`.* TO `signon_user_20260121`@`%`",
            "GRANT UPDATE, SELECT (`b`, `a`), INSERT (`c`, `a`), SELECT"
            " ON `signon_production`.`t` TO `signon_user_20260121`@`%` WITH GRANT OPTION",
            "GRANT EXECUTE ON PROCEDURE `signon_production`.`p` TO `signon_user_20260121`@`%`",
            "SET DEFAULT ROLE `app_read` FOR `signon_user_20260121`@`%`",
        ],
        id="mariadb-10.11",
    ),
    pytest.param(
        "10.0.%",
        ["GRANT SELECT ON `signon`.* TO `signon`@`10.0.%`"],
        ["GRANT SELECT ON `signon`.* TO 'signon_user_20260121'@'10.0.%'"],
        id="only-the-grantee-is-replaced",
    ),
]


@pytest.mark.parametrize(("host", "old_lines", "new_lines"), SAME)
def test_equal_but_for_the_name(host: str, old_lines: list[str], new_lines: list[str]) -> None:
    old = normalize_grants(old_lines, OLD, host)
    new = normalize_grants(new_lines, NEW, host)
    assert old == new
    assert not any("PASSWORD" in grant or OLD in grant.split(" TO ")[-1] for grant in old)


# Differences that must not be normalized away: (old, new, missing in new, extra in new).
DIFFERENT = [
    pytest.param(
        ["GRANT SELECT, INSERT ON `app`.* TO `signon`@`%`"],
        ["GRANT SELECT ON `app`.* TO `signon_user_20260121`@`%`"],
        {"GRANT INSERT, SELECT ON `app`.* TO <grantee>"},
        {"GRANT SELECT ON `app`.* TO <grantee>"},
        id="missing-privilege",
    ),
    pytest.param(
        ["GRANT SELECT ON `app`.* TO `signon`@`%` WITH GRANT OPTION"],
        ["GRANT SELECT ON `app`.* TO `signon_user_20260121`@`%`"],
        {"GRANT SELECT ON `app`.* TO <grantee> WITH GRANT OPTION"},
        {"GRANT SELECT ON `app`.* TO <grantee>"},
        id="missing-grant-option",
    ),
    pytest.param(
        ["GRANT SELECT (`a`, `b`) ON `app`.`t` TO `signon`@`%`"],
        ["GRANT SELECT (`a`) ON `app`.`t` TO `signon_user_20260121`@`%`"],
        {"GRANT SELECT (`a`, `b`) ON `app`.`t` TO <grantee>"},
        {"GRANT SELECT (`a`) ON `app`.`t` TO <grantee>"},
        id="missing-column",
    ),
    pytest.param(
        ["GRANT `r` TO `signon`@`%` WITH ADMIN OPTION", "SET DEFAULT ROLE `r` FOR `signon`@`%`"],
        ["GRANT `r` TO `signon_user_20260121`@`%`"],
        {"GRANT `r` TO <grantee> WITH ADMIN OPTION", "SET DEFAULT ROLE `r` FOR <grantee>"},
        {"GRANT `r` TO <grantee>"},
        id="missing-admin-option-and-default-role",
    ),
    pytest.param(
        ["GRANT SELECT ON `app`.* TO `signon`@`%`"],
        ["GRANT SELECT ON `app2`.* TO `signon_user_20260121`@`%`"],
        {"GRANT SELECT ON `app`.* TO <grantee>"},
        {"GRANT SELECT ON `app2`.* TO <grantee>"},
        id="other-database",
    ),
]


@pytest.mark.parametrize(("old_lines", "new_lines", "missing", "extra"), DIFFERENT)
def test_differences_survive(
    old_lines: list[str], new_lines: list[str], missing: set[str], extra: set[str]
) -> None:
    old = normalize_grants(old_lines, OLD, "%")
    new = normalize_grants(new_lines, NEW, "%")
    assert (old - new, new - old) == (missing, extra)


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("GRANT SELECT ON `app`.* TO `someone_else`@`%`", id="other-grantee"),
        pytest.param("GRANT SELECT ON `app`.* TO `signon`@`localhost`", id="other-host"),
        pytest.param("GRANT SELECT ON `app`.* TO `signon`@`%`, `x`@`%`", id="two-grantees"),
        pytest.param(
            "GRANT SELECT ON `app`.* TO `signon`@`%` WITH FROBNICATE", id="unknown-option"
        ),
        pytest.param("DROP USER `signon`@`%`", id="not-a-grant"),
        pytest.param(
            f"GRANT SELECT ON `app`.* TO `other`@`%` IDENTIFIED BY PASSWORD '{HASH}'",
            id="hash-in-unreadable-line",
        ),
    ],
)
def test_unreadable_lines_fail_without_leaking_the_hash(line: str) -> None:
    with pytest.raises(DatabaseError, match="cannot read SHOW GRANTS line") as failure:
        normalize_grants([line], OLD, "%")
    assert HASH not in str(failure.value)
