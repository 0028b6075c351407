"""Button clicks: approve, reject, retry, cancel, hold, ask again, rotate the next environment,
what a waiting step offers (Reactivate old key, Roll back), and "Rotate now" on a key-age reply.

Each click is acked at once and its work queued. Decisions are compare-and-set in the engine,
so a double click or a second process wins once; the loser is told why, in one line. On
success the thread itself changes (the reporter replaces the buttons), so there is no reply.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from handlers import BadRequest, Deps, Reply, enqueue, fleet_messages, messages, parse_value, sender
from rotation import fleet as fleets

Work = Callable[[Deps, dict[str, Any], str, Reply], None]


def _step(target: dict[str, Any]) -> str:
    step = target.get("step")
    if not step:
        raise BadRequest("that button names no step")
    return str(step)


def approve(deps: Deps, target: dict[str, Any], user: str, reply: Reply) -> None:
    """Approve a gate; on a guided step this is "Done", said by whoever did the work."""
    rotation = deps.engine.store.rotation(target["rotation"])
    step = rotation.step(_step(target))
    if step.guided:
        deps.policy.check_start(user, rotation.env)
    else:
        deps.policy.check_approve(user, rotation.env)
        deps.policy.check_four_eyes(user, rotation.env, rotation.initiator)
    shown = target.get("shown")
    deps.engine.approve(rotation.id, step.name, user,
                        shown=str(shown) if shown is not None else None)


def reject(deps: Deps, target: dict[str, Any], user: str, reply: Reply) -> None:
    rotation = deps.engine.store.rotation(target["rotation"])
    deps.policy.check_approve(user, rotation.env)
    deps.engine.reject(rotation.id, _step(target), user)


def hold(deps: Deps, target: dict[str, Any], user: str, reply: Reply) -> None:
    """Anyone who sees the 2nd line notice may hold: a hold only ever stops a step. A
    fleet's notice holds every app it names; the clicker hears of those that could not be."""
    step = _step(target)
    if not (target["also"] or target["fleet"] is not None):
        deps.engine.hold(target["rotation"], step, user)
        return
    held, refused = fleets.hold_notice(deps.engine, target["rotation"], step, user,
                                       also=target["also"], fleet_id=target["fleet"])
    if refused:
        reply(fleet_messages.held(step, held, refused))


def ask_again(deps: Deps, target: dict[str, Any], user: str, reply: Reply) -> None:
    rotation = deps.engine.store.rotation(target["rotation"])
    deps.policy.check_start(user, rotation.env)
    deps.engine.ask_again(rotation.id, _step(target), user)


def retry(deps: Deps, target: dict[str, Any], user: str, reply: Reply) -> None:
    rotation = deps.engine.store.rotation(target["rotation"])
    deps.policy.check_start(user, rotation.env)
    deps.engine.retry(rotation.id, user)


def cancel(deps: Deps, target: dict[str, Any], user: str, reply: Reply) -> None:
    rotation = deps.engine.store.rotation(target["rotation"])
    deps.policy.check_start(user, rotation.env)
    deps.engine.cancel(rotation.id, user)


def rotate_next(deps: Deps, target: dict[str, Any], user: str, reply: Reply) -> None:
    """Start the same rotation in the environment the button names, as the clicker."""
    finished = deps.engine.store.rotation(target["rotation"])
    env = target.get("env")
    if not isinstance(env, str):
        raise BadRequest("that button names no environment")
    deps.policy.check_start(user, env)
    rotation = deps.engine.start(finished.kind, finished.target, env, user, finished.params)
    reply(messages.started(rotation, deps.channel))


def request(deps: Deps, target: dict[str, Any], user: str, reply: Reply) -> None:
    """Ask a waiting step for what it offers; its starters or approvers may."""
    rotation = deps.engine.store.rotation(target["rotation"])
    deps.policy.check_request(user, rotation.env)
    deps.engine.request(rotation.id, target["name"], user)


def rotate_key_now(deps: Deps, target: dict[str, Any], user: str, reply: Reply) -> None:
    """The key-age reply's "Rotate now": rotate that IAM user's key, started by the clicker."""
    deps.policy.check_start(user, target["env"])
    rotation = deps.engine.start("iam-key", target["user"], target["env"], user)
    reply(messages.started(rotation, deps.channel))


def fleet_confirm(deps: Deps, target: dict[str, Any], user: str, reply: Reply) -> None:
    """The fleet's one confirmation (its planner's, then in four-eyes a second person's);
    the fleet's message becomes the plan waiting for a second person, or its table."""
    fleet = fleets.confirm(deps.engine, deps.policy, target["fleet"], user)
    if fleet.message_ref:
        channel, _, ts = fleet.message_ref.partition(":")
        text, blocks = (fleet_messages.plan(fleet, True) if fleet.status == fleets.CONFIRMING
                        else fleet_messages.table(fleet, deps.engine.store.fleet_rotations(
                            fleet.id)))
        deps.client.chat_update(channel=channel, ts=ts, text=text, blocks=blocks)


def fleet_approve(deps: Deps, target: dict[str, Any], user: str, reply: Reply) -> None:
    """"Approve all N STEP": each listed app's own approval, bound to the digest it showed."""
    shown = target["shown"]
    approved = fleets.approve_gate(deps.engine, deps.policy, target["fleet"], target["step"],
                                   user, shown=shown)
    reply(fleet_messages.gate_approved(target["fleet"], target["step"], len(approved),
                                       len(shown)))


def parse_fleet(action: dict[str, Any]) -> dict[str, Any]:
    """A fleet button's value: {"fleet": ID, "step": S, "shown": {"rotation id": digest}}."""
    try:
        data = json.loads(action.get("value") or "")
    except ValueError:
        raise BadRequest("that button's payload is not one Rotor made") from None
    if not isinstance(data, dict) or not isinstance(data.get("fleet"), int):
        raise BadRequest("that button's payload names no fleet")
    shown = data.get("shown", {})
    if not isinstance(shown, dict) or not all(
            k.isdigit() and isinstance(v, str) for k, v in shown.items()):
        raise BadRequest("that button's payload is not one Rotor made")
    data["shown"] = {int(k): v for k, v in shown.items()}
    if "step" in data and not isinstance(data["step"], str):
        raise BadRequest("that button's payload names no step")
    return data


def parse_hold(action: dict[str, Any]) -> dict[str, Any]:
    """A Hold button's value: `messages.value`, and on a fleet's notice "also": [rotation
    ids] or "fleet": ID."""
    data = parse_value(action)
    also, fleet = data.get("also", []), data.get("fleet")
    if not isinstance(also, list) or not all(_is_id(i) for i in also):
        raise BadRequest("that button's payload is not one Rotor made")
    if fleet is not None and not _is_id(fleet):
        raise BadRequest("that button's payload names no fleet")
    return {**data, "also": also, "fleet": fleet}


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_request(action: dict[str, Any]) -> dict[str, Any]:
    """A request button's value: "<rotation id>:<request name>"."""
    rotation, _, name = str(action.get("value") or "").partition(":")
    if not rotation.isdigit() or len(rotation) > 12 or not name:
        raise BadRequest("that button's payload is not one Rotor made")
    return {"rotation": int(rotation), "name": name}


def parse_user_env(action: dict[str, Any]) -> dict[str, Any]:
    """A "Rotate now" button's value: "USER ENV"."""
    words = str(action.get("value") or "").split()
    if len(words) != 2:
        raise BadRequest("that button's payload names no IAM user and environment")
    return {"user": words[0], "env": words[1]}


WORK: dict[str, Work] = {
    messages.APPROVE: approve, messages.REJECT: reject, messages.HOLD: hold,
    messages.ASK_AGAIN: ask_again, messages.RETRY: retry, messages.CANCEL: cancel,
    messages.ROTATE_NEXT: rotate_next, messages.REQUEST: request,
    messages.ROTATE_KEY_NOW: rotate_key_now,
    messages.FLEET_CONFIRM: fleet_confirm, messages.FLEET_APPROVE: fleet_approve,
}
# How each button's value reads; JSON from `messages.value` unless named here.
PARSE: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    messages.HOLD: parse_hold, messages.REQUEST: parse_request,
    messages.ROTATE_KEY_NOW: parse_user_env,
    messages.FLEET_CONFIRM: parse_fleet, messages.FLEET_APPROVE: parse_fleet,
}


def _listener(deps: Deps, action_id: str, work: Work) -> Callable[..., None]:
    parse = PARSE.get(action_id, parse_value)

    def clicked(ack: Any, body: dict[str, Any], action: dict[str, Any], respond: Any) -> None:
        ack()
        enqueue(deps, action_id, body, respond,
                lambda reply: work(deps, parse(action), sender(body), reply), once=True)

    clicked.__name__ = f"clicked_{action_id}"
    return clicked


def register(app: Any, deps: Deps) -> None:
    for action_id, work in WORK.items():
        app.action(action_id)(_listener(deps, action_id, work))
