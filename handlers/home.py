"""The App Home tab: active rotations, and those waiting for an approval."""

from __future__ import annotations

from typing import Any

from handlers import Deps, enqueue, messages


def publish(deps: Deps, user: str) -> None:
    active = deps.engine.store.active()
    view = messages.home(active, {r.id: deps.links.thread_link(r) for r in active})
    deps.client.views_publish(user_id=user, view=view)


def register(app: Any, deps: Deps) -> None:
    @app.event("app_home_opened")
    def opened(event: dict[str, Any], body: dict[str, Any]) -> None:
        if event.get("tab", "home") == "home" and event.get("user"):
            enqueue(deps, "home", body, None, lambda reply: publish(deps, event["user"]),
                    once=False)
