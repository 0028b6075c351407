"""A `secret` kind with one long wait that offers Roll back, for `rotor` subprocess tests of
parking and `rotor request` (loaded with ROTOR_EXTRA_KINDS=tests.parking_kind)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rotation.catalogue import Catalogue
from rotation.engine import Context, Done, Outcome, Step, Wait


def grace(ctx: Context) -> Outcome:
    who = ctx.requested("rollback")
    if who:
        return Done(f"rolled back by {who}")
    until = ctx.data.setdefault("grace_until", ctx.now() + 3600)
    if ctx.now() >= until:
        return Done("no roll back asked for")
    return Wait("the grace period to end", timeout=7200, check_at=until)


class GraceKind:
    name = "secret"

    def validate(self, catalogue: Catalogue, target: str, env: str,
                 params: Mapping[str, Any]) -> None:
        catalogue.environment(env)

    def steps(self, catalogue: Catalogue, target: str, env: str,
              params: Mapping[str, Any]) -> list[Step]:
        return [Step("rotate", "Rotate", lambda ctx: Done("rotated")),
                Step("grace", "Keep Roll back for an hour", grace, offers=("rollback",))]

    def cancel(self, ctx: Context) -> str:
        return "nothing to undo"


KINDS = {"secret": GraceKind()}
