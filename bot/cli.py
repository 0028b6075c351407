"""The `rotor` command: the break-glass path when Slack is down, and the way to run the bot."""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import click

from rotation.errors import NotAllowed, RotorError
from rotation.explain import check_kube_context, explain

if TYPE_CHECKING:  # `rotor --help` and `rotor status` import no kind and no client
    from bot.settings import Settings
    from rotation.engine import Engine
    from rotation.policy import Policy
    from rotation.store import AuditRow, RotationRow, Store

# Exit codes of the commands that run a rotation (documented in the README).
DONE, FAILED, PARKED, INTERRUPTED = 0, 1, 3, 130
# Without --follow, a rotation whose next check is further off than this is left parked.
PARK_SECONDS = 300
# The command that starts, or resumes, each kind; `_kind_command` adds the rest.
COMMANDS = {"mysql": "rotate", "postgres": "rotate"}
# `rotor request ID WHAT`: what a person types, and the request the step offers.
REQUESTS = {"roll-back": "rollback", "reactivate": "reactivate"}

SYMBOL = {"done": "✓", "skipped": "–", "failed": "✗", "waiting": "…", "needs-approval": "?",
          "running": "▸", "pending": " "}


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"rotor: {message}", err=True)
    sys.exit(code)


class _Obj:
    """Settings and engine, made on first use so `--help` needs no config."""

    def __init__(self, config: str | None, state: str | None = None) -> None:
        self.config = config
        self.state = state
        self.second_line_told: str | None = None
        self._settings: Settings | None = None
        self._engine: Engine | None = None
        self._actor: str | None = None
        self._policy: Policy | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from bot.settings import Settings
            from bot.wiring import setup_logging

            self._settings = Settings.load(config_path=self.config)
            if self.state:
                self._settings = dataclasses.replace(self._settings, state_path=self.state)
            setup_logging(self._settings.log_level, fmt=self._settings.log_format)
        return self._settings

    @property
    def store(self) -> Store:
        """The state DB alone: reading it needs neither the catalogue nor any client."""
        if self._engine is not None:
            return self._engine.store
        import time

        from bot.settings import state_path
        from rotation.store import Store as StateStore

        return StateStore(state_path(), clock=time.time)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from bot.notify import SlackSecondLine, second_line_for_cli
            from bot.wiring import build_engine

            ask = (lambda question: click.prompt(question)) if sys.stdin.isatty() else None
            second_line = second_line_for_cli(self.settings, self.second_line_told, ask)
            self._engine = build_engine(self.settings, second_line=second_line)
            if isinstance(second_line, SlackSecondLine):  # notices once, even across retries
                second_line.store = self._engine.store
        return self._engine

    @property
    def actor(self) -> str:
        """The operator, from sts:GetCallerIdentity, as "U123 via arn:…" (or the bare ARN)."""
        if self._actor is None:
            from bot.identity import caller_arn
            from rotation.policy import operator

            catalogue = self.settings.catalogue
            region = next((e.aws_region for e in catalogue.environments.values()), None)
            self._actor = operator(catalogue, caller_arn(region)).actor
        return self._actor

    @property
    def policy(self) -> Policy:
        """The same rules as in Slack; user groups are looked up in Slack when it is set up."""
        if self._policy is None:
            from rotation.policy import Policy

            settings = self.settings
            if settings.slack_bot_token:
                from bot import slack

                members: Any = slack.GroupMembers(slack.web_client(settings.slack_bot_token,
                                                                   settings.slack_api_url))
            else:
                def members(group: str) -> Any:
                    raise NotAllowed(f"cannot check who is in user group {group} without "
                                     "SLACK_BOT_TOKEN")
            self._policy = Policy(settings.catalogue, members)
        return self._policy


class _Command(click.Command):
    """An expected failure from the world (no credentials, AccessDenied, a database that
    does not answer) becomes one line naming the environment; its trace goes to the log at
    DEBUG. Anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            message = explain(exc, ctx.params.get("env"))
            if message is None:
                if isinstance(exc, RotorError):
                    _fail(str(exc))
                raise
            import logging

            logging.getLogger("rotor.cli").debug("%s", type(exc).__name__, exc_info=True)
            _fail(message)


class _Group(click.Group):
    """Every RotorError becomes one line on stderr and exit 1; nothing else is caught."""

    command_class = _Command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RotorError as exc:
            _fail(str(exc))


@click.group(cls=_Group)
@click.version_option(package_name="rotor", message="rotor %(version)s")
@click.option("--config", envvar="ROTOR_CONFIG", metavar="PATH",
              help="The catalogue (default ./rotor.yml).")
@click.option("--state", envvar="ROTOR_STATE", metavar="PATH|URL",
              help="The state DB: a SQLite file (default ./rotor.db) or a postgresql:// URL.")
@click.pass_context
def main(ctx: click.Context, config: str | None, state: str | None) -> None:
    """Rotor: safe, resumable, audited credential rotations."""
    ctx.obj = _Obj(config, state)


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts else "-"


def _audit_line(row: AuditRow) -> str:
    mark = {"step": SYMBOL.get(row.to_status or "", "·"), "waiting": "…",
            "approval-requested": "?", "approved": "✓", "rejected": "✗",
            "finished": "✓", "cancelled": "✗"}.get(row.event, "·")
    what = row.step or row.event
    label = row.event if row.event not in ("step",) else (row.to_status or "")
    detail = f": {row.detail}" if row.detail else ""
    return f"{mark} {what} {label}{detail}" + (f" (by {row.actor})" if row.actor != "rotor" else "")


def _print_status(rotation: RotationRow) -> None:
    click.echo(f"#{rotation.id} {rotation.kind} {rotation.target} in {rotation.env}: "
               f"{rotation.phase}, {rotation.progress} (started by {rotation.initiator} "
               f"{_when(rotation.created_at)})")
    for step in rotation.steps:
        line = f"  {SYMBOL[step.status]} {step.position + 1:>2}. {step.name:<16} {step.status}"
        note = step.error or step.wait_reason or step.gate_summary or step.result
        if step.status == "waiting" and step.waiting_since:
            note = f"{step.wait_reason} (since {_when(step.waiting_since)})"
        click.echo(line + (f"  {note}" if note and not step.finished else ""))


@main.command()
@click.argument("app")
@click.argument("env")
@click.pass_obj
def plan(obj: _Obj, app: str, env: str) -> None:
    """Show the steps and what preflight finds. Changes nothing."""
    engine = obj.engine
    kind = engine.catalogue.app(app).engine
    engine.catalogue.environment(env)
    obj.policy.check_plan(obj.actor, env)
    steps, found = engine.plan(kind, app, env)
    click.echo(f"{kind} rotation of {app} in {env}:")
    for i, step in enumerate(steps, 1):
        mark = "  [destructive, needs approval]" if step.destructive else ""
        click.echo(f"  {i:>2}. {step.name:<16} {step.title}{mark}")
    click.echo(f"preflight: {found}")


def resume_command(rotation: RotationRow) -> str:
    """The exact command that carries this rotation on, for its kind."""
    name = COMMANDS.get(rotation.kind)
    if name is None:
        return f"rotor status {rotation.id}"
    if rotation.params.get("cleanup"):
        return f"rotor cleanup {rotation.target} {rotation.env}"
    flags = " --compromised" if rotation.params.get("compromised") else ""
    return f"rotor {name} {rotation.target} {rotation.env}{flags}"


def _park(engine: Engine, rotation: RotationRow) -> NoReturn:
    """Leave a long wait to `rotor serve`, or to the same command later, and say so."""
    step = rotation.current
    assert step is not None and step.next_check_at is not None
    click.echo(f"rotation #{rotation.id} is parked at {step.name}: it waits for "
               f"{step.wait_reason}; Rotor checks again at {_when(step.next_check_at)}")
    wanted = {engine_name: cli_name for cli_name, engine_name in REQUESTS.items()}
    for offer in engine.offers(rotation):
        if offer in wanted:
            click.echo(f"  meanwhile: `rotor request {rotation.id} {wanted[offer]}`")
    click.echo(f"  resume: `{resume_command(rotation)}` then (`rotor serve` carries it on "
               "by itself), or add --follow to wait here")
    sys.exit(PARKED)


def _drive(engine: Engine, policy: Policy, rotation_id: int, actor: str, yes: bool,
           follow: bool = False) -> NoReturn:
    """Run the rotation in the foreground until it finishes or needs someone else; without
    `follow`, return as soon as it parks in a wait longer than PARK_SECONDS."""
    from rotation.policy import person
    from rotation.store import ACTIVE

    seen = max((r.id for r in engine.store.audit_rows(rotation_id)), default=0)
    wake = threading.Event()
    engine.on_change = lambda _id: wake.set()
    waiting_shown = ""
    while True:
        rotation = engine.advance(rotation_id)
        for row in engine.store.audit_rows(rotation_id, after=seen):
            if waiting_shown:
                click.echo()
                waiting_shown = ""
            click.echo(_audit_line(row))
            seen = row.id
        if rotation.status != ACTIVE:
            if rotation.status == "done":
                click.echo(f"rotation #{rotation.id} done: {rotation.progress}")
                sys.exit(0)
            _fail(f"rotation #{rotation.id} was {rotation.status}")
        step = rotation.current
        assert step is not None
        if step.status == "failed":
            _fail(f"rotation #{rotation.id} stopped at {step.name}: {step.error} "
                  f"(`rotor retry {rotation.id}` or `rotor cancel {rotation.id}`)")
        if step.status == "needs-approval" and step.decision is None and step.guided:
            policy.check_start(actor, rotation.env)
            click.echo(f"» {step.name}: {step.gate_summary}")
            if click.confirm("  Done?", default=False):
                engine.approve(rotation.id, step.name, actor)
                continue
            _fail(f"rotation #{rotation.id} waits at {step.name} until it is done; run the same "
                  "command again then")
        if step.status == "needs-approval" and step.decision is None:
            second = (engine.catalogue.four_eyes(rotation.env)
                      and person(actor) == person(rotation.initiator))
            if second or not policy.may_approve(actor, rotation.env):
                if waiting_shown != "approval":
                    who = "a second person" if second else "an approver"
                    click.echo(f"? {step.name} needs {who} in {rotation.env}: "
                               f"`rotor approve {rotation.id}` (Ctrl-C leaves it resumable)")
                    waiting_shown = "approval"
                wake.wait(0.25)  # the approval comes from another process: poll the store
                wake.clear()
                continue
            if yes or click.confirm(f"? {step.gate_summary}\n  Approve?", default=False):
                engine.approve(rotation.id, step.name, actor)
            else:
                engine.reject(rotation.id, step.name, actor)
            continue
        delay = max(0.0, (step.next_check_at or engine.clock()) - engine.clock(),
                    (rotation.next_run_at or 0) - engine.clock())  # e.g. its host is full
        if step.status == "waiting" and not follow and delay > PARK_SECONDS:
            if waiting_shown:
                click.echo()
            _park(engine, rotation)
        if step.status == "waiting":
            waited = int(engine.clock() - (step.waiting_since or engine.clock()))
            line = f"… {step.name}: waiting for {step.wait_reason} ({waited}s)"
            if sys.stdout.isatty():
                click.echo(f"\r{line:<100}", nl=False)
                waiting_shown = "wait"
            elif waiting_shown != step.wait_reason:
                click.echo(line)
                waiting_shown = step.wait_reason or ""
        # An Event, not a sleep: approvals from another process wake us on the next poll.
        wake.wait(min(delay, 0.25))
        wake.clear()


def _start_or_resume(obj: _Obj, kind: str, target: str, env: str, yes: bool, follow: bool,
                     params: dict[str, Any] | None = None) -> NoReturn:
    """Start the rotation, or resume the active one, and drive it in the foreground."""
    engine = obj.engine
    engine.catalogue.environment(env)
    actor = obj.actor
    obj.policy.check_start(actor, env)
    active = engine.store.find_active(kind, target, env)
    if active is not None and bool(active.params.get("cleanup")) != bool((params or {}).get(
            "cleanup")):
        _fail(f"rotation #{active.id} of {target} in {env} is active; finish or cancel it "
              f"first ({resume_command(active)})")
    if active is not None:
        click.echo(f"resuming rotation #{active.id} ({active.phase}, {active.progress})")
        rotation_id = active.id
    else:
        rotation_id = engine.start(kind, target, env, actor, params or {}).id
        click.echo(f"started rotation #{rotation_id}: {kind} {target} in {env}")
    try:
        _drive(engine, obj.policy, rotation_id, actor, yes, follow)
    except KeyboardInterrupt:
        _fail(f"interrupted; rotation #{rotation_id} is resumable: run the same command again",
              INTERRUPTED)


def _told(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    ctx.ensure_object(_Obj).second_line_told = value
    return value


YES = click.option("--yes", is_flag=True, help="Approve every gate you are allowed to approve.")
FOLLOW = click.option("--follow", is_flag=True,
                      help="Stay through long waits (hours, days) instead of parking the "
                           f"rotation when its next check is over {PARK_SECONDS // 60} min off.")
TOLD = click.option("--second-line-told", metavar="HOW", callback=_told, expose_value=False,
                    help="Without Slack: how you told 2nd line (recorded in the audit).")


@main.command()
@click.argument("names", nargs=-1, required=True, metavar="APP... ENV")
@click.option("--all", "every", is_flag=True, help="Every app in the catalogue (a fleet).")
@YES
@FOLLOW
@TOLD
@click.option("--compromised", is_flag=True,
              help="Credentials are compromised: no overnight wait; every restored copy too.")
@click.pass_obj
def rotate(obj: _Obj, names: tuple[str, ...], every: bool, yes: bool, follow: bool,
           compromised: bool) -> None:
    """Start, or resume, the rotation of APP's database credentials in ENV; with several
    apps, or --all, rotate them as one fleet: the plan first, then one confirmation."""
    *apps, env = names
    if every and apps:
        _fail("give either --all ENV or APP... ENV, not both")
    if not every and not apps:
        _fail("give the app(s) and the environment: rotor rotate APP... ENV (or --all ENV)")
    if every or len(apps) > 1:
        _rotate_fleet(obj, None if every else apps, env, yes, compromised)
    app = apps[0]
    kind = obj.engine.catalogue.app(app).engine
    environment = obj.engine.catalogue.environment(env)
    check_kube_context(env, environment.kube_context,
                       environment.kubeconfig or obj.settings.kubeconfig)
    _start_or_resume(obj, kind, app, env, yes, follow,
                     {"compromised": True} if compromised else {})


def _print_fleet(fleet: Any) -> None:
    click.echo(f"fleet #{fleet.id} in {fleet.env}"
               + (" (compromised)" if fleet.params.get("compromised") else "") + ":")
    for line in fleet.plan:
        what = f"skipped: {line['skip']}" if line.get("skip") else line.get("action", "")
        rid = f" #{line['rotation']}" if line.get("rotation") else ""
        click.echo(f"  {line['app']:<24} {line['kind']:<9} {what}{rid}")


def _rotate_fleet(obj: _Obj, apps: list[str] | None, env: str, yes: bool,
                  compromised: bool) -> NoReturn:
    """Plan the fleet, show it, take one confirmation, start it (four-eyes: a second person
    starts it with `rotor approve-fleet ID`), then drive its rotations here."""
    from rotation import fleet as fleets

    engine = obj.engine
    environment = engine.catalogue.environment(env)
    for app in apps or ():
        engine.catalogue.app(app)
    check_kube_context(env, environment.kube_context,
                       environment.kubeconfig or obj.settings.kubeconfig)
    actor = obj.actor
    fleet = fleets.propose(engine, obj.policy, actor, apps, env, compromised=compromised)
    _print_fleet(fleet)
    count = sum(1 for p in fleet.plan if not p.get("skip"))
    if not (yes or click.confirm(f"Rotate these {count} apps in {env}?", default=False)):
        fleets.cancel(engine, fleet.id, actor)
        _fail(f"fleet #{fleet.id} not started")
    fleet = fleets.confirm(engine, obj.policy, fleet.id, actor)
    if fleet.status == fleets.CONFIRMING:
        click.echo(f"fleet #{fleet.id} needs a second person in {env}: "
                   f"`rotor approve-fleet {fleet.id}` starts it")
        sys.exit(PARKED)
    click.echo(f"started fleet #{fleet.id}: {count} rotations")
    _drive_fleet(engine, obj.policy, fleet.id, actor, yes)


def _drive_fleet(engine: Engine, policy: Policy, fleet_id: int, actor: str,
                 yes: bool) -> NoReturn:
    """Advance every rotation of the fleet in turn until each is done, failed, or waits for
    someone else (or a long wait); one line per change of an app's state. A gate that the
    actor may approve is asked once for every app waiting at it."""
    from rotation import fleet as fleets
    from rotation.policy import person
    from rotation.store import ACTIVE

    store = engine.store
    fleet = store.fleet(fleet_id)
    shown: dict[int, str] = {}
    asked: set[str] = set()
    try:
        while True:
            rows = store.fleet_rotations(fleet_id)
            for row in rows:
                if row.status == ACTIVE and row.next_run_at is not None \
                        and row.next_run_at <= engine.clock():
                    engine.advance(row.id)
            rows = store.fleet_rotations(fleet_id)
            for row in rows:
                state = fleets.member_state(row)
                if shown.get(row.id) != state:
                    click.echo(f"  {row.target:<24} {state}")
                    shown[row.id] = state
            result = fleets.status(fleet, rows)
            if result.word == "done":
                click.echo(result.line(fleet))
                sys.exit(DONE)
            for gate, members in fleets.waiting_at(rows).items():
                mine = (policy.may_approve(actor, fleet.env) and not (
                    engine.catalogue.four_eyes(fleet.env)
                    and person(actor) == person(fleet.initiator)))
                if not mine or gate in asked:
                    continue
                apps = ", ".join(r.target for r in members)
                if yes or click.confirm(f"? approve {gate} for {len(members)} apps ({apps})?",
                                        default=False):
                    fleets.approve_gate(engine, policy, fleet_id, gate, actor, shown={
                        r.id: (r.current.gate_digest or "") if r.current else ""
                        for r in members})
                else:
                    asked.add(gate)
            rows = store.fleet_rotations(fleet_id)
            now = engine.clock()
            moving = [r for r in rows if r.status == ACTIVE and r.next_run_at is not None
                      and r.next_run_at - now <= PARK_SECONDS
                      and not (r.current and r.current.status == "failed")]
            if not moving:
                click.echo(fleets.status(fleet, rows).line(fleet))
                for gate in fleets.waiting_at(rows):
                    click.echo(f"  approve: `rotor approve-fleet {fleet_id} --gate {gate}`")
                click.echo("  `rotor serve` carries the fleet on; `rotor status` shows it")
                failed = fleets.status(fleet, rows).word == "failed"
                sys.exit(FAILED if failed else PARKED)
            wake_at = min(r.next_run_at for r in moving if r.next_run_at is not None)
            time.sleep(min(0.25, max(0.0, wake_at - now)))
    except KeyboardInterrupt:
        _fail(f"interrupted; fleet #{fleet_id} carries on with `rotor serve`", INTERRUPTED)


@main.command("approve-fleet")
@click.argument("fleet_id", type=int)
@click.option("--gate", metavar="STEP", help="Approve this step for every app waiting at it.")
@click.option("--yes", is_flag=True, help="Do not ask before approving.")
@click.pass_obj
def approve_fleet(obj: _Obj, fleet_id: int, gate: str | None, yes: bool) -> None:
    """Confirm a fleet as the second person (four-eyes), or with --gate approve one step for
    every app of the fleet waiting at it (each app's approval bound to what it showed)."""
    from rotation import fleet as fleets

    engine, actor, policy = obj.engine, obj.actor, obj.policy
    fleet = engine.store.fleet(fleet_id)
    if gate is None:
        if fleet.status != fleets.CONFIRMING:
            _fail(f"fleet #{fleet_id} is {fleet.status}, not waiting for a second person; "
                  "approve a step with --gate STEP")
        _print_fleet(fleet)
        policy.check_approve(actor, fleet.env)
        policy.check_four_eyes(actor, fleet.env, fleet.initiator)
        if not (yes or click.confirm("Start this fleet?", default=False)):
            _fail(f"fleet #{fleet_id} not started")
        fleet = fleets.confirm(engine, policy, fleet_id, actor)
        click.echo(f"fleet #{fleet_id} started: "
                   f"{sum(1 for p in fleet.plan if p.get('rotation'))} rotations; "
                   "`rotor serve` carries them on")
        return
    members = fleets.waiting_at(engine.store.fleet_rotations(fleet_id), gate).get(gate, [])
    if not members:
        _fail(f"no app of fleet #{fleet_id} waits for an approval of {gate}")
    for row in members:
        click.echo(f"  #{row.id} {row.target}: {row.current.gate_summary if row.current else ''}")
    policy.check_approve(actor, fleet.env)
    policy.check_four_eyes(actor, fleet.env, fleet.initiator)
    if not (yes or click.confirm(f"Approve {gate} for these {len(members)} apps?",
                                 default=False)):
        _fail("nothing approved")
    approved = fleets.approve_gate(engine, policy, fleet_id, gate, actor, shown={
        r.id: (r.current.gate_digest or "") if r.current else "" for r in members})
    click.echo(f"approved {gate} for {len(approved)} of {len(members)} apps")


@main.command()
@click.argument("app")
@click.argument("env")
@YES
@FOLLOW
@TOLD
@click.pass_obj
def cleanup(obj: _Obj, app: str, env: str, yes: bool, follow: bool) -> None:
    """Drop the database users earlier rotations of APP made in ENV that nothing uses
    (what a cancel leaves behind), after an approval."""
    kind = obj.engine.catalogue.app(app).engine
    environment = obj.engine.catalogue.environment(env)
    check_kube_context(env, environment.kube_context,
                       environment.kubeconfig or obj.settings.kubeconfig)
    _start_or_resume(obj, kind, app, env, yes, follow, {"cleanup": True})


def _kind_command(name: str, kind: str, argument: str, doc: str) -> None:
    """`rotor NAME ARGUMENT ENV [--yes]` for a kind whose target is not an app."""

    @click.argument(argument.lower())
    @click.argument("env")
    @YES
    @FOLLOW
    @TOLD
    @click.pass_obj
    def command(obj: _Obj, env: str, yes: bool, follow: bool, **target: str) -> None:
        _start_or_resume(obj, kind, target[argument.lower()], env, yes, follow)

    command.__doc__ = doc
    COMMANDS[kind] = name
    main.command(name)(command)


_kind_command("rotate-key", "iam-key", "USER",
              "Start, or resume, the rotation of an IAM user's access key in ENV.")
_kind_command("rotate-secret", "secret", "SECRET_ID",
              "Start, or resume, a Secrets Manager rotation of SECRET_ID and redeploy its "
              "consumers.")
_kind_command("rotate-admin", "rds-admin", "DATABASE",
              "Start, or resume, the rotation of DATABASE's RDS admin password "
              "(Terraform-guided).")


@main.command()
@click.argument("rotation_id", type=int, required=False)
@click.pass_obj
def status(obj: _Obj, rotation_id: int | None) -> None:
    """Show one rotation, or every active one and the most recent."""
    import os

    from bot.settings import state_path

    if not os.path.exists(state_path()):
        click.echo(f"no rotations yet (no state DB at {state_path()})")
        return
    store = obj.store
    if rotation_id is not None:
        _print_status(store.rotation(rotation_id))
        return
    from rotation import fleet as fleets

    for fleet in store.fleets(3):
        click.echo(fleets.status(fleet, store.fleet_rotations(fleet.id)).line(fleet))
    rows = store.active() or store.recent(10)
    if not rows:
        click.echo("no rotations yet")
    for row in rows:
        _print_status(row)


@main.command()
@click.argument("rotation_id", type=int)
@click.pass_obj
def retry(obj: _Obj, rotation_id: int) -> None:
    """Run a rotation's failed step again."""
    obj.policy.check_start(obj.actor, obj.engine.store.rotation(rotation_id).env)
    rotation = obj.engine.retry(rotation_id, obj.actor)
    click.echo(f"rotation #{rotation.id}: retrying {rotation.current.name if rotation.current else '-'}"
               f"; continue it with `{resume_command(rotation)}`")


@main.command()
@click.argument("rotation_id", type=int)
@click.pass_obj
def cancel(obj: _Obj, rotation_id: int) -> None:
    """Cancel a rotation, leaving the app on credentials that work."""
    obj.policy.check_start(obj.actor, obj.engine.store.rotation(rotation_id).env)
    rotation = obj.engine.cancel(rotation_id, obj.actor)
    if rotation.status == "cancelled":
        detail = obj.engine.store.audit_rows(rotation_id)[-1].detail
        click.echo(f"rotation #{rotation.id} cancelled: {detail}")
    else:
        click.echo(f"rotation #{rotation.id}: cancel requested; the worker running it will "
                   "finish the cancel")


@main.command()
@click.argument("rotation_id", type=int)
@click.option("--reject", is_flag=True, help="Reject instead of approving.")
@click.pass_obj
def approve(obj: _Obj, rotation_id: int, reject: bool) -> None:
    """Approve (or reject) the step a rotation is waiting on, as a second person."""
    engine = obj.engine
    rotation = engine.store.rotation(rotation_id)
    step = rotation.current
    if step is None or step.status != "needs-approval":
        _fail(f"rotation #{rotation_id} is not waiting for an approval ({rotation.phase})")
    actor, policy = obj.actor, obj.policy
    if step.guided:
        policy.check_start(actor, rotation.env)
    else:
        policy.check_approve(actor, rotation.env)
        if not reject:
            policy.check_four_eyes(actor, rotation.env, rotation.initiator)
    click.echo(f"#{rotation_id} {step.name}: {step.gate_summary}")
    if reject:
        engine.reject(rotation_id, step.name, actor)
        click.echo("rejected")
    else:
        engine.approve(rotation_id, step.name, actor)
        click.echo("approved")


@main.command()
@click.argument("rotation_id", type=int)
@click.argument("what", type=click.Choice(sorted(REQUESTS)))
@FOLLOW
@click.pass_obj
def request(obj: _Obj, rotation_id: int, what: str, follow: bool) -> None:
    """Ask a waiting step for what it offers (the Slack buttons): roll back a secret
    rotation, or reactivate an old access key; then carry the rotation on."""
    engine, actor, policy = obj.engine, obj.actor, obj.policy
    policy.check_request(actor, engine.store.rotation(rotation_id).env, what)
    engine.request(rotation_id, REQUESTS[what], actor)
    click.echo(f"rotation #{rotation_id}: {what} requested")
    try:
        _drive(engine, policy, rotation_id, actor, False, follow)
    except KeyboardInterrupt:
        rotation = engine.store.rotation(rotation_id)
        _fail(f"interrupted; rotation #{rotation_id} is resumable: `{resume_command(rotation)}`",
              INTERRUPTED)


@main.command()
@click.option("--once", is_flag=True,
              help="Headless: one rotation approved by two demo people, printed as text; "
                   "exit 0 when it is done with no failed login.")
def demo(once: bool) -> None:
    """A whole world on this machine and a web page that plays Slack: watch a rotation."""
    import os

    from demo.run import main as run_demo

    sys.exit(run_demo(once, mysql_url=os.environ.get("ROTOR_DEMO_MYSQL_URL") or None))


@main.command("config-reference")
def config_reference() -> None:
    """Print the reference of every rotor.yml key and environment variable (Markdown)."""
    from bot.reference import config_reference as text

    click.echo(text())


@main.command()
@click.pass_obj
def serve(obj: _Obj) -> None:
    """Run the Slack bot, the engine's workers and the scheduler in one process."""
    from bot.serve import run

    run(obj.settings)


@main.command()
@click.argument("env", required=False)
@click.pass_obj
def keys(obj: _Obj, env: str | None) -> None:
    """Access keys due for rotation in ENV (or every environment), from the credential report."""
    from rotation.iam import key_age_report

    engine = obj.engine
    names = [env] if env else list(engine.catalogue.environments)
    for name in names:
        engine.catalogue.environment(name)
    allowed = [n for n in names if _may_see_keys(obj, n, only=env is None)]
    if not allowed:
        obj.policy.check_keys(obj.actor, names[0])  # says why, and who to ask
    for name in allowed:
        report = key_age_report(engine.clients, engine.catalogue, name, engine.clock())
        click.echo(f"{name}: {len(report.overdue)} overdue (older than {report.max_age_days} "
                   f"days), {len(report.due_soon)} due soon ({report.warn_days} days or more); "
                   f"{report.active_keys} active keys of {report.users} users")
        for found in report.findings:
            state = "overdue " if found.overdue else "due soon"
            how = f"rotor rotate-key {found.user} {name}" if found.rotatable else \
                "not in rotor.yml: rotate by hand"
            click.echo(f"  {state} {found.user:<32} key {found.slot} {found.age_days:>5} days "
                       f"old, last used {_when(found.last_used)}  {how}")


def _may_see_keys(obj: _Obj, env: str, *, only: bool) -> bool:
    """Key ages need starter or approver rights; without an ENV, the environments you may."""
    try:
        obj.policy.check_keys(obj.actor, env)
    except NotAllowed:
        if not only:
            raise
        return False
    return True


@main.group()
def state() -> None:
    """The state DB."""


@state.command("copy")
@click.option("--to", "to", required=True, metavar="URL",
              help="The new state DB, e.g. postgresql://rotor@db.internal/rotor; must be empty.")
@click.pass_obj
def state_copy(obj: _Obj, to: str) -> None:
    """Copy the whole state (audit history, unfinished rotations) into an empty store.

    Stop every `rotor serve` first; point them at the new store (ROTOR_STATE) after."""
    from rotation.store import Store

    source = Store(obj.settings.state_path, clock=time.time)
    target = Store(to, clock=time.time)
    try:
        counts = target.copy_from(source)
    finally:
        target.close()
        source.close()
    click.echo(f"copied {source.describe()} to {target.describe()}: "
               + ", ".join(f"{n} {table}" for table, n in counts.items()))


from bot import cli_ops  # noqa: E402

cli_ops.register(main)

if __name__ == "__main__":  # pragma: no cover
    main()
