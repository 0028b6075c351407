"""Who may start and approve, per environment: users, user groups, and empty lists."""

from __future__ import annotations

import pytest

from rotation import catalogue
from rotation.errors import NotAllowed
from rotation.policy import Policy

CATALOGUE = catalogue.parse("""
environments:
  staging: {aws_region: eu-west-1}
  production:
    aws_region: eu-west-1
    starters: [U0ALICE, S0SRE]
    approvers: [S0LEADS]
""")
GROUPS = {"S0SRE": {"U0CAROL"}, "S0LEADS": {"U0BOB", "U0ALICE"}}


@pytest.fixture
def policy() -> Policy:
    asked: list[str] = []

    def members(group: str) -> set[str]:
        asked.append(group)
        return GROUPS[group]

    found = Policy(CATALOGUE, members)
    found.asked = asked  # type: ignore[attr-defined]
    return found


@pytest.mark.parametrize("user, env, start, approve", [
    ("U0ANYONE", "staging", True, True),  # empty lists: anyone
    ("U0ALICE", "production", True, True),  # listed, and in S0LEADS
    ("U0CAROL", "production", True, False),  # in S0SRE only
    ("U0BOB", "production", False, True),  # in S0LEADS only
    ("U0MALLORY", "production", False, False),
])
def test_who_may_start_and_approve(policy, user, env, start, approve):
    assert policy.may_start(user, env) is start
    assert policy.may_approve(user, env) is approve


def test_refusals_name_who_may(policy):
    with pytest.raises(NotAllowed, match=r"<@U0MALLORY> may not start or change rotations in "
                                         r"production; ask <@U0ALICE>, <!subteam\^S0SRE>"):
        policy.check_start("U0MALLORY", "production")
    with pytest.raises(NotAllowed, match=r"may not approve in production; ask "
                                         r"<!subteam\^S0LEADS>"):
        policy.check_approve("U0CAROL", "production")


def test_a_listed_user_needs_no_group_lookup(policy):
    policy.check_start("U0ALICE", "production")
    assert policy.asked == []
