"""Who may start and who may approve rotations, per environment, from `rotor.yml`.

Each environment lists `starters` and `approvers`: Slack user IDs (`U123`, `W123`) or user
group IDs (`S123`). An empty list means anyone in the workspace may. Group membership comes
from a callable the bot provides (backed by Slack's `usergroups.users.list`), so this module
knows nothing about Slack. Four-eyes (the approver is not the initiator) is the engine's rule,
checked in `Engine.approve`; this module only answers "is this person on the list".
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from rotation.catalogue import Catalogue
from rotation.errors import NotAllowed

Members = Callable[[str], Collection[str]]


def is_group(entry: str) -> bool:
    """User group IDs start with S; user IDs with U or W."""
    return entry.startswith("S")


def mention(entry: str) -> str:
    return f"<!subteam^{entry}>" if is_group(entry) else f"<@{entry}>"


class Policy:
    """Answers "may this user start / approve in this environment", or raises NotAllowed."""

    def __init__(self, catalogue: Catalogue, members: Members) -> None:
        self.catalogue = catalogue
        self.members = members

    def may_start(self, user: str, env: str) -> bool:
        return self._listed(user, self.catalogue.environment(env).starters)

    def may_approve(self, user: str, env: str) -> bool:
        return self._listed(user, self.catalogue.environment(env).approvers)

    def check_start(self, user: str, env: str) -> None:
        """Starting, retrying, asking again and cancelling are the starters' business."""
        if not self.may_start(user, env):
            raise NotAllowed(f"<@{user}> may not start or change rotations in {env}; ask "
                             f"{self.who(self.catalogue.environment(env).starters)}")

    def check_approve(self, user: str, env: str) -> None:
        if not self.may_approve(user, env):
            raise NotAllowed(f"<@{user}> may not approve in {env}; ask "
                             f"{self.who(self.catalogue.environment(env).approvers)}")

    def check_request(self, user: str, env: str) -> None:
        """Recovery buttons (Reactivate, Roll back) are for starters and approvers alike."""
        if not (self.may_start(user, env) or self.may_approve(user, env)):
            environment = self.catalogue.environment(env)
            who = self.who(dict.fromkeys((*environment.starters, *environment.approvers)))
            raise NotAllowed(f"<@{user}> may not ask for that in {env}; ask {who}")

    def approvers(self, env: str) -> tuple[str, ...]:
        return self.catalogue.environment(env).approvers

    @staticmethod
    def who(entries: Collection[str]) -> str:
        return ", ".join(mention(e) for e in entries) if entries else "anyone"

    def _listed(self, user: str, entries: Collection[str]) -> bool:
        if not entries or user in entries:
            return True
        return any(is_group(entry) and user in self.members(entry) for entry in entries)
