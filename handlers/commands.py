"""`/rotate`: the grammar, and one small function per subcommand.

Parsing is pure and instant, so help and usage errors are the ack itself. Everything that
reads or changes state runs in Rotor's job queue and answers through the response URL.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from handlers import Deps, Reply, enqueue, fleet_messages, messages, reminder_messages, sender
from rotation import fleet as fleets
from rotation import iam
from rotation.catalogue import Catalogue
from rotation.errors import NotAllowed, UnknownName

COMPROMISED = "--compromised"
CLEANUP = "--cleanup"  # after a cancel: drop the users earlier rotations made that nothing uses
# Other runbooks' subcommands and the rotation kind each starts.
OTHER_KINDS = {"key": "iam-key", "secret": "secret", "admin": "rds-admin"}
VERBS = ("help", "plan", "status", "list", "cancel", "retry", "keys", "all", *OTHER_KINDS)
_ARGS = {"key": ("USER", "ENV"), "secret": ("SECRET_ID", "ENV"), "admin": ("DATABASE", "ENV")}
_TARGET = {"key": re.compile(r"^[A-Za-z0-9+=,.@_-]{1,64}$"),
           "secret": re.compile(r"^[A-Za-z0-9/_+=.@-]{1,512}$"),
           "admin": re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")}


@dataclass(frozen=True)
class Command:
    """A parsed `/rotate`; `reply` set means it is answered at once (help, usage)."""

    verb: str
    kind: str | None = None
    target: str | None = None
    env: str | None = None
    rotation_id: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    reply: str | None = None
    apps: tuple[str, ...] | None = None  # a fleet of these apps (None with `all`: every app)


def _usage(problem: str, **values: Any) -> Command:
    """A usage reply: `problem` names one of `messages.PROBLEMS`, or is the catalogue's text."""
    if problem in messages.PROBLEMS:
        text = messages.PROBLEMS[problem].format(**{
            key: messages.escape(value) if key in messages.TYPED else value
            for key, value in values.items()})
    elif problem.startswith("unknown subcommand or app"):  # messages.unknown_word: escaped
        text = problem
    else:  # the catalogue's words, which quote what was typed
        text = messages.escape(problem)
    return Command("usage", reply=messages.usage(text))


def parse(text: str, catalogue: Catalogue, kinds: Mapping[str, Any]) -> Command:
    """Turn `/rotate` text into a Command, or into the usage line that explains what is wrong."""
    words = text.split()
    flags = [w for w in words if w.startswith("--")]
    args = [w for w in words if not w.startswith("--")]
    unknown = [f for f in flags if f not in (COMPROMISED, CLEANUP)]
    if unknown:
        return _usage("unknown-option", option=unknown[0], only=f"{COMPROMISED} or {CLEANUP}")
    if len(set(flags)) > 1:
        return _usage("one-flag", flags=f"{COMPROMISED} and {CLEANUP}")
    if not args or args[0].lower() == "help":
        return Command("help", reply=messages.help_text())
    verb, rest = args[0].lower(), args[1:]
    if flags and verb in ("plan", "status", "list", "cancel", "retry", "keys"):
        return _usage("misplaced-flag", flag=flags[0], verb=verb)
    if CLEANUP in flags and verb in OTHER_KINDS:
        return _usage("cleanup-apps")
    if verb == "list":
        return _usage("no-arguments", verb=verb, got=" ".join(rest)) if rest else \
            Command("list")
    if verb == "status":
        if not rest:
            return Command("status")
        if len(rest) == 1:
            return _with_id("status", rest[0])
        return _app_env("status", rest, catalogue, kinds, check_kind=False)
    if verb in ("cancel", "retry"):
        if len(rest) != 1:
            return _usage("one-id", verb=verb)
        return _with_id(verb, rest[0])
    if verb == "plan":
        return _app_env("plan", rest, catalogue, kinds)
    if verb == "keys":
        if len(rest) > 1:
            return _usage("unexpected", extra=" ".join(rest[1:]), shape="keys [ENV]")
        problem = _lookup(catalogue, None, rest[0].lower()) if rest else None
        return _usage(problem) if problem else Command("keys", env=rest[0].lower() if rest
                                                       else None)
    if verb in OTHER_KINDS:
        return _other(verb, rest, flags, catalogue, kinds)
    if verb == "all" or "," in verb:
        return _fleet(verb, rest, flags, catalogue, kinds)
    return _app_env("start", args, catalogue, kinds, flag=flags[0] if flags else None)


def _with_id(verb: str, word: str) -> Command:
    digits = word.removeprefix("#")
    if not digits.isdigit() or len(digits) > 12:
        return _usage("not-an-id", word=word, verb=verb)
    return Command(verb, rotation_id=int(digits))


def _app_env(verb: str, rest: list[str], catalogue: Catalogue, kinds: Mapping[str, Any], *,
             check_kind: bool = True, flag: str | None = None) -> Command:
    shape = "APP ENV" if verb == "start" else f"{verb} APP ENV"
    if len(rest) < 2:
        if verb == "start" and rest and rest[0] not in catalogue.apps:
            return _usage(_unknown_word(rest[0], catalogue))
        return _usage("needs-app-env", shape=shape, envs=", ".join(catalogue.environments))
    if len(rest) > 2:
        return _usage("unexpected", extra=" ".join(rest[2:]), shape=shape)
    app, env = rest[0].lower(), rest[1].lower()
    if app not in catalogue.apps and app in catalogue.environments and env in catalogue.apps:
        return _usage("swapped", fixed=f"{shape.replace('APP ENV', '')}{env} {app}")
    if verb == "start" and app not in catalogue.apps:
        return _usage(_unknown_word(app, catalogue))  # a mistyped subcommand, or app
    problem = _lookup(catalogue, app, env)
    if problem:
        return _usage(problem)
    kind = catalogue.app(app).engine
    if check_kind and kind not in kinds:
        return Command("unavailable", reply=messages.not_available(f"{app} {env}", kind))
    params = {flag.removeprefix("--"): True} if flag else {}
    return Command(verb, kind=kind, target=app, env=env, params=params)


def _fleet(verb: str, rest: list[str], flags: list[str], catalogue: Catalogue,
           kinds: Mapping[str, Any]) -> Command:
    """`/rotate all ENV [--compromised]` or `/rotate APP1,APP2,… ENV`: one fleet."""
    shape = "all ENV" if verb == "all" else "APP1,APP2,… ENV"
    if CLEANUP in flags:
        return _usage("unexpected", extra=CLEANUP, shape=shape)
    if len(rest) != 1:
        return _usage("needs-app-env", shape=shape, envs=", ".join(catalogue.environments))
    env = rest[0].lower()
    apps = None if verb == "all" else tuple(dict.fromkeys(a for a in verb.split(",") if a))
    for app in apps or ():
        if app not in catalogue.apps:
            return _usage(_unknown_word(app, catalogue))
    problem = _lookup(catalogue, None, env)
    if problem:
        return _usage(problem)
    missing = sorted({catalogue.app(a).engine for a in apps or catalogue.apps} - set(kinds))
    if missing:
        return Command("unavailable", reply=messages.not_available(shape, missing[0]))
    return Command("all", env=env, apps=apps,
                   params={"compromised": True} if flags else {})


def _lookup(catalogue: Catalogue, app: str | None, env: str) -> str | None:
    """The catalogue's own message (with its "did you mean") for an unknown name."""
    try:
        if app is not None:
            catalogue.app(app)
        catalogue.environment(env)
    except UnknownName as exc:
        return str(exc)
    return None


def _unknown_word(word: str, catalogue: Catalogue) -> str:
    """An unknown first word: the closest subcommand or app, whichever is nearer."""
    close = difflib.get_close_matches(word.lower(), [*VERBS, *catalogue.apps], n=1, cutoff=0.6)
    return messages.unknown_word(word, close[0] if close else None)


def _other(verb: str, rest: list[str], flags: list[str], catalogue: Catalogue,
           kinds: Mapping[str, Any]) -> Command:
    shape = " ".join((verb, *_ARGS[verb]))
    if len(rest) != 2:
        return _usage("needs-args", shape=shape, args=" and ".join(_ARGS[verb]))
    target, env = rest[0], rest[1].lower()
    if not _TARGET[verb].match(target):
        return _usage("invalid-target", target=target, what=_ARGS[verb][0])
    problem = _lookup(catalogue, None, env)
    if problem:
        return _usage(problem)
    kind = OTHER_KINDS[verb]
    if kind not in kinds:
        return Command("unavailable", reply=messages.not_available(verb, kind))
    params = {"compromised": True} if flags else {}
    return Command("start", kind=kind, target=target, env=env, params=params)


# -- the work, run in the job queue ----------------------------------------------------------


def start(deps: Deps, cmd: Command, user: str, reply: Reply) -> None:
    assert cmd.kind and cmd.target and cmd.env
    deps.policy.check_start(user, cmd.env)
    rotation = deps.engine.start(cmd.kind, cmd.target, cmd.env, user, cmd.params)
    reply(messages.started(rotation, deps.channel))


def fleet(deps: Deps, cmd: Command, user: str, reply: Reply) -> None:
    """Plan the fleet and post its one message, the plan with a Confirm button."""
    assert cmd.env
    planned = fleets.propose(deps.engine, deps.policy, user, cmd.apps, cmd.env,
                             compromised=bool(cmd.params.get("compromised")))
    text, blocks = fleet_messages.plan(planned, deps.engine.catalogue.four_eyes(cmd.env))
    posted = deps.client.chat_postMessage(channel=deps.channel, text=text, blocks=blocks,
                                          unfurl_links=False)
    deps.engine.store.set_fleet_message(planned.id, f"{posted['channel']}:{posted['ts']}")
    reply(fleet_messages.planned(planned))


def plan(deps: Deps, cmd: Command, user: str, reply: Reply) -> None:
    assert cmd.kind and cmd.target and cmd.env
    deps.policy.check_plan(user, cmd.env)
    steps, found = deps.engine.plan(cmd.kind, cmd.target, cmd.env, cmd.params)
    reply(messages.plan(cmd.kind, cmd.target, cmd.env, steps, found))


def status(deps: Deps, cmd: Command, user: str, reply: Reply) -> None:
    store = deps.engine.store
    if cmd.rotation_id is not None:
        rotation = store.rotation(cmd.rotation_id)
        reply(messages.status_detail(rotation, deps.links.thread_link(rotation)))
        return
    if cmd.target and cmd.env:
        latest = store.latest_for(cmd.target, cmd.env)
        if latest is None:
            reply(messages.no_rotation_of(cmd.target, cmd.env))
        else:
            reply(messages.status_detail(latest, deps.links.thread_link(latest)))
        return
    rows = store.active() or store.recent(10)
    reply(messages.status(rows, {r.id: deps.links.thread_link(r) for r in rows}))


def listing(deps: Deps, cmd: Command, user: str, reply: Reply) -> None:
    store = deps.engine.store
    active, recent = store.active(), store.recent(10)
    links = {r.id: deps.links.thread_link(r) for r in (*active, *recent)}
    reply(messages.listing(active, recent, links))


def keys(deps: Deps, cmd: Command, user: str, reply: Reply) -> None:
    """The key-age check, for the asker: IAM's credential report of one or every environment."""
    engine = deps.engine
    envs = [cmd.env] if cmd.env else list(engine.catalogue.environments)
    allowed = [env for env in envs if _may_see_keys(deps, user, env)]
    if not allowed:
        deps.policy.check_keys(user, envs[0])  # says why, and who to ask
    envs = allowed
    reply(reminder_messages.key_age_reply([iam.key_age_report(engine.clients, engine.catalogue, env,
                                                     engine.clock()) for env in envs]))


def _may_see_keys(deps: Deps, user: str, env: str) -> bool:
    try:
        deps.policy.check_keys(user, env)
    except NotAllowed:
        return False
    return True


def answer(deps: Deps, cmd: Command, user: str, reply: Reply) -> None:
    """Help and usage, once the sender's workspace is known to be allowed."""
    reply(cmd.reply or "")


def cancel(deps: Deps, cmd: Command, user: str, reply: Reply) -> None:
    assert cmd.rotation_id is not None
    deps.policy.check_start(user, deps.engine.store.rotation(cmd.rotation_id).env)
    reply(messages.cancel_requested(deps.engine.cancel(cmd.rotation_id, user)))


def retry(deps: Deps, cmd: Command, user: str, reply: Reply) -> None:
    assert cmd.rotation_id is not None
    deps.policy.check_start(user, deps.engine.store.rotation(cmd.rotation_id).env)
    reply(messages.retrying(deps.engine.retry(cmd.rotation_id, user)))


MUTATING = ("start", "cancel", "retry", "all")
WORK: dict[str, Callable[[Deps, Command, str, Reply], None]] = {
    "start": start, "all": fleet, "plan": plan, "status": status, "list": listing, "keys": keys,
    "cancel": cancel, "retry": retry,
}


def register(app: Any, deps: Deps) -> None:
    @app.command(messages.COMMAND)
    def rotate(ack: Any, command: dict[str, Any], body: dict[str, Any], respond: Any) -> None:
        allowed = deps.workspace.verdict(body)
        if allowed is False:
            ack(text=messages.refused(NotAllowed(messages.REFUSED_WORKSPACE)))
            return
        # Slack sends the text with &, < and > as entities; the builders escape it once.
        cmd = parse(messages.unescape(command.get("text") or ""), deps.engine.catalogue,
                    deps.engine.kinds)
        if cmd.reply is not None and allowed:
            ack(text=cmd.reply)
            return
        ack()
        work = answer if cmd.reply is not None else WORK[cmd.verb]
        enqueue(deps, f"/rotate {cmd.verb}", body, respond,
                lambda reply: work(deps, cmd, sender(body), reply),
                once=cmd.verb in MUTATING)
