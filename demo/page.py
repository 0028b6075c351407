"""The web page that plays Slack (filled in below)."""

from __future__ import annotations

from demo.world import World


def attach(world: World) -> None:
    raise NotImplementedError
