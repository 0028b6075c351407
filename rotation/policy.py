"""Who may do what, per environment, from `rotor.yml`: one identity for Slack and the CLI.

A person is a Slack user ID (`U123`, `W123`). In Slack that is who clicked or typed. On the
command line the operator is the AWS principal `sts:GetCallerIdentity` names (the role
session `gds aws … --shell` gives), mapped to a person by `operators:` in rotor.yml
(ARN patterns to user IDs). Rotor records an operator as the actor
`"U123 via arn:aws:sts::…"`: the person first, then the raw principal, so the audit has both
and every rule below runs on the person, wherever they act. An operator who maps to no one
is their principal alone, allowed only where the environment sets
`allow_unmapped_operators` (off in production by default).

Each environment lists `starters` and `approvers`: user IDs or user group IDs (`S123`). An
empty list means anyone. Group membership comes from a callable the bot provides (backed by
Slack's `usergroups.users.list`), so this module knows nothing about Slack.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection
from dataclasses import dataclass

from rotation.catalogue import Catalogue
from rotation.errors import NotAllowed

Members = Callable[[str], Collection[str]]
VIA = " via "


def is_group(entry: str) -> bool:
    """User group IDs start with S; user IDs with U or W."""
    return entry.startswith("S")


def mention(entry: str) -> str:
    return f"<!subteam^{entry}>" if is_group(entry) else f"<@{entry}>"


def person(actor: str | None) -> str:
    """The canonical person behind an actor: the Slack user of "U123 via arn:…", or the
    principal of an unmapped operator."""
    return (actor or "").split(VIA, 1)[0]


def principal(actor: str | None) -> str | None:
    """The raw AWS principal an actor acted as on the command line, if any."""
    actor = actor or ""
    if VIA in actor:
        return actor.split(VIA, 1)[1]
    return actor if actor.startswith("arn:") else None


def is_mapped(actor: str) -> bool:
    return not person(actor).startswith("arn:")


@dataclass(frozen=True)
class Operator:
    """Someone at the command line: their AWS principal and the person it maps to."""

    principal: str
    user: str | None  # the Slack user ID from `operators:`, None when unmapped

    @property
    def actor(self) -> str:
        return f"{self.user}{VIA}{self.principal}" if self.user else self.principal


def operator(catalogue: Catalogue, arn: str) -> Operator:
    """Map an AWS principal ARN to a person with rotor.yml's `operators:` (first match)."""
    for pattern, user in catalogue.operators.items():
        if fnmatch.fnmatchcase(arn, pattern):
            return Operator(arn, user)
    return Operator(arn, None)


class PolicyRefusal(NotAllowed):
    """A person is not on the environment's list for what they tried."""

    def __init__(self, who: str, what: str, env: str, ask: Collection[str]) -> None:
        self.who, self.what, self.env, self.ask = who, what, env, tuple(ask)
        super().__init__(f"{_name(who)} may not {what} in {env}; ask {Policy.who(self.ask)}")


def _name(who: str) -> str:
    return f"<@{who}>" if is_mapped(who) else who


class Policy:
    """Answers "may this person start / approve / look in this environment", or raises
    NotAllowed. Every check takes an actor and runs on its person."""

    def __init__(self, catalogue: Catalogue, members: Members) -> None:
        self.catalogue = catalogue
        self.members = members

    def may_start(self, actor: str, env: str) -> bool:
        return self._listed(actor, self.catalogue.environment(env).starters)

    def may_approve(self, actor: str, env: str) -> bool:
        return self._listed(actor, self.catalogue.environment(env).approvers)

    def check_operator(self, actor: str, env: str) -> None:
        """A CLI operator who maps to no one acts only where the environment allows it."""
        if not is_mapped(actor) and not self.catalogue.allows_unmapped_operators(env):
            raise NotAllowed(f"{person(actor)} maps to no one in rotor.yml's `operators:`, and "
                             f"{env} does not allow unmapped operators; add your role session "
                             "ARN pattern there")

    def check_start(self, actor: str, env: str) -> None:
        """Starting, retrying, asking again, cancelling and planning are the starters'."""
        self.check_operator(actor, env)
        if not self.may_start(actor, env):
            raise PolicyRefusal(person(actor), "start or change rotations", env,
                                self.catalogue.environment(env).starters)

    def check_plan(self, actor: str, env: str) -> None:
        """A plan logs in as the admin and reads the world: a starter's right."""
        self.check_operator(actor, env)
        if not self.may_start(actor, env):
            raise PolicyRefusal(person(actor), "plan rotations", env,
                                self.catalogue.environment(env).starters)

    def check_approve(self, actor: str, env: str) -> None:
        self.check_operator(actor, env)
        if not self.may_approve(actor, env):
            raise PolicyRefusal(person(actor), "approve", env,
                                self.catalogue.environment(env).approvers)

    def check_four_eyes(self, actor: str, env: str, initiator: str) -> None:
        """In a four-eyes environment the approver is another person than the starter, however
        each of them reached Rotor (Slack or the CLI)."""
        if self.catalogue.four_eyes(env) and person(actor) == person(initiator):
            raise NotAllowed(f"{env} needs a second person: the one who started the rotation "
                             "cannot approve it")

    def check_request(self, actor: str, env: str, what: str = "ask for that") -> None:
        """Recovery buttons (Reactivate, Roll back) and key ages: starters and approvers."""
        self.check_operator(actor, env)
        if not (self.may_start(actor, env) or self.may_approve(actor, env)):
            environment = self.catalogue.environment(env)
            raise PolicyRefusal(person(actor), what, env,
                                dict.fromkeys((*environment.starters, *environment.approvers)))

    def check_keys(self, actor: str, env: str) -> None:
        self.check_request(actor, env, "see access key ages")

    def approvers(self, env: str) -> tuple[str, ...]:
        return self.catalogue.environment(env).approvers

    @staticmethod
    def who(entries: Collection[str]) -> str:
        return ", ".join(mention(e) for e in entries) if entries else "anyone"

    def _listed(self, actor: str, entries: Collection[str]) -> bool:
        user = person(actor)
        if not entries or user in entries:
            return True
        if not is_mapped(actor):
            return False  # an unmapped principal is in no Slack user group
        return any(is_group(entry) and user in self.members(entry) for entry in entries)
