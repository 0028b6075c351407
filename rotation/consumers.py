"""Redeploy what reads a secret after it changed: ExternalSecrets, Deployments, ECS services.

The runbooks' "Force sync of Kubernetes secrets" and "Check application variables", and the
Secrets Manager runbook's `aws ecs update-service --force-new-deployment`, for the consumers
rotor.yml lists under a secret (a `Consumers` entry). A kind puts `steps(...)` after the step
that changed the secret; the application-credential kinds reach the same `force_sync` and
`roll_out` through `appcreds`.

Waits are persisted (`Wait`), never slept. What a step must find again on resume (force-sync
epochs, the pods that ran before the sync, ECS deployment ids) lives in `ctx.data` under
`consumers.<key>`: names, ids and times, never a value. Values a synced Secret must hold are
compared in memory and never kept or shown.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from rotation import ecs
from rotation.catalogue import Consumers, EcsService
from rotation.engine import Context, Done, Outcome, Skipped, Step, Wait
from rotation.errors import StepFailed
from rotation.kube import FORCE_SYNC_ANNOTATION, ExternalSecretStatus, Kube


@dataclass(frozen=True)
class Expected:
    """What a synced Secret must show: at least one of the `new` values, and none of the
    `old` ones (in any key, as they are or URL-encoded in a connection URL). A Secret's
    template may leave some of the secret's keys out; it may not keep an old value."""

    new: Collection[str]
    old: Collection[str] = ()


ConsumersOf = Callable[[Context], Consumers]
ExpectedOf = Callable[[Context], Expected]
# A reason to skip the step, or None to run it.
SkipUnless = Callable[[Context], str | None]


# -- one ExternalSecret, one Deployment: shared with appcreds --------------------------------


def force_sync(
    ctx: Context, kube: Kube, namespace: str, name: str, state: dict[str, Any]
) -> ExternalSecretStatus | None:
    """Runbook "Force sync of Kubernetes secrets" for one ExternalSecret.

    Returns its status once ESO synced it after Rotor's force-sync, None while it has not.
    `state` is this ExternalSecret's part of ctx.data: the epoch and the status before it.
    """
    if "epoch" not in state:
        before = kube.external_secret(namespace, name)
        # Strictly increasing, so a retry within the same second still forces a new sync,
        # and past whatever epoch the annotation holds now (an earlier sync in this second).
        now_set = before.annotations.get(FORCE_SYNC_ANNOTATION, "")
        epoch = max(
            int(ctx.now()),
            state.get("last_epoch", 0) + 1,
            int(now_set) + 1 if now_set.isdigit() else 0,
        )
        state.update(
            baseline=before.synced_resource_version,
            synced_at=ctx.now(),
            epoch=epoch,
            last_epoch=epoch,
        )
        ctx.save()
    kube.force_sync(namespace, name, state["epoch"])  # the same epoch again changes nothing
    status = kube.external_secret(namespace, name)
    # ESO reports an error only once it has tried; the condition may still be the one from
    # before our force-sync, so an error counts after a short grace.
    if status.reason == "SecretSyncedError" and ctx.waited >= ctx.catalogue.waits.sync_error_grace:
        del state["epoch"]  # a retry forces a fresh sync
        raise StepFailed(
            f"ExternalSecret {namespace}/{name} failed to sync: "
            f"{status.message or 'SecretSyncedError'}"
        )
    if (
        status.synced_resource_version != state["baseline"]
        and status.ready
        and status.reason == "SecretSynced"
    ):
        return status
    return None


def pod_uids(kube: Kube, namespace: str, deployment: str) -> list[str]:
    return sorted(p.uid for p in kube.deployment_pods(namespace, deployment))


def roll_out(
    ctx: Context,
    kube: Kube,
    namespace: str,
    deployment: str,
    *,
    since: float,
    pods_before: Collection[str],
    state: dict[str, Any],
    restart_after: float,
) -> Outcome:
    """Runbook "Check application variables": every ready pod started after `since`.

    Reloader usually rolls the Deployment when its Secret changes; when no new pod has
    appeared `restart_after` seconds into the wait, Rotor restarts it like
    `kubectl rollout restart` (once; `state` remembers it). A Deployment with no Reloader
    annotation is never rolled by a Secret change, so it is restarted at once.
    """
    waits = ctx.catalogue.waits
    where = f"deployment {namespace}/{deployment}"
    status = kube.deployment(namespace, deployment)
    if status.progress_deadline_exceeded:
        raise StepFailed(f"{where} rollout failed: ProgressDeadlineExceeded")
    if status.replicas == 0:
        return Done(f"{where} is scaled to zero; nothing to roll")
    before = set(pods_before)
    # Kubernetes timestamps have whole seconds: compare against the second of the sync.
    second = math.floor(since)
    ready = [p for p in kube.deployment_pods(namespace, deployment) if p.ready]
    fresh = [
        p
        for p in ready
        if p.uid not in before and p.start_time is not None and p.start_time.timestamp() >= second
    ]
    if ready and len(fresh) == len(ready) and status.complete:
        how = " after a restart" if state.get("restarted_at") else ""
        return Done(f"{where}: all {len(fresh)} ready pods started after the sync{how}")
    if not status.reloader:
        restart_after = 0.0
    if not fresh and not state.get("restarted_at") and ctx.waited >= restart_after:
        kube.restart_deployment(namespace, deployment, ctx.today())
        state["restarted_at"] = ctx.now()
        ctx.save()
        if status.reloader:
            ctx.log.info(
                "no pod started within %ss of the sync; restarted %s", int(restart_after), where
            )
        else:
            ctx.log.info("%s has no Reloader annotation; restarted it at once", where)
        return Wait(f"{where} to roll out after a restart", timeout=waits.rollout)
    return Wait(f"{where} to roll out with the new secret", timeout=waits.rollout)


def secret_problem(kube: Kube, namespace: str, name: str, expected: Expected) -> str | None:
    """Why the Secret does not show `expected`, or None when it does (values never leave
    `Kube.secret_contains`)."""
    if kube.secret_contains(namespace, name, expected.old):
        return f"Secret {namespace}/{name} still holds the old value"
    if expected.new and not kube.secret_contains(namespace, name, expected.new):
        return f"Secret {namespace}/{name} does not hold the new value"
    return None


# -- the steps ---------------------------------------------------------------------------


def _state(ctx: Context, key: str) -> dict[str, Any]:
    state: dict[str, Any] = ctx.data.setdefault("consumers", {}).setdefault(key, {})
    return state


def sync_external_secrets(
    ctx: Context, consumers: Consumers, key: str, expect: ExpectedOf | None = None
) -> Outcome:
    """Runbook: "Force sync of Kubernetes secrets" for every ExternalSecret listed, then
    check that each Secret it writes holds the new value."""
    if not consumers.external_secrets:
        return Skipped("no ExternalSecrets are listed for this secret in rotor.yml")
    namespace = consumers.namespace
    kube = ctx.clients.kube(ctx.env)
    state = _state(ctx, key)
    if "pods_before" not in state:
        # The pods running before the first force-sync: the rollout waits for all to go.
        state["pods_before"] = {d: pod_uids(kube, namespace, d) for d in consumers.deployments}
        ctx.save()
    synced: dict[str, str] = state.setdefault("synced", {})
    each: dict[str, dict[str, Any]] = state.setdefault("external_secrets", {})
    waiting = []
    for name in consumers.external_secrets:
        if name in synced:
            continue
        status = force_sync(ctx, kube, namespace, name, each.setdefault(name, {}))
        if status is None:
            waiting.append(f"{namespace}/{name}")
            continue
        problem = (
            secret_problem(kube, namespace, status.target_secret, expect(ctx)) if expect else None
        )
        if problem:
            del each[name]["epoch"]  # a retry forces a fresh sync
            raise StepFailed(f"ExternalSecret {namespace}/{name} synced, but {problem}")
        synced[name] = status.target_secret
    if waiting:
        return Wait(
            f"ExternalSecrets {', '.join(waiting)} to sync", timeout=ctx.catalogue.waits.sync
        )
    # Pods must have started after the last of the syncs to have every new value.
    state["since"] = max(each[name]["synced_at"] for name in consumers.external_secrets)
    checked = ", each holding the new value" if expect else ""
    return Done(
        f"synced {', '.join(f'{namespace}/{n}' for n in consumers.external_secrets)}"
        f" into Secrets {', '.join(sorted(set(synced.values())))}{checked}"
    )


def roll_out_deployments(ctx: Context, consumers: Consumers, key: str) -> Outcome:
    """Runbook: "Check application variables": every listed Deployment runs only pods that
    started after the secret changed."""
    if not consumers.deployments:
        return Skipped("no Deployments are listed for this secret in rotor.yml")
    namespace = consumers.namespace
    kube = ctx.clients.kube(ctx.env)
    state = _state(ctx, key)
    if "since" not in state:
        # No ExternalSecret changed a Secret for Reloader to notice: these pods read the
        # secret when they start, so Rotor restarts them straight away.
        state.update(
            since=ctx.now(),
            restart_now=True,
            pods_before={d: pod_uids(kube, namespace, d) for d in consumers.deployments},
        )
        ctx.save()
    restart_after = 0.0 if state.get("restart_now") else ctx.catalogue.waits.rollout_start
    rollouts = state.setdefault("rollouts", {})
    done: list[str] = []
    waiting: list[str] = []
    for deployment in consumers.deployments:
        outcome = roll_out(
            ctx,
            kube,
            namespace,
            deployment,
            since=state["since"],
            pods_before=state["pods_before"].get(deployment, ()),
            state=rollouts.setdefault(deployment, {}),
            restart_after=restart_after,
        )
        if isinstance(outcome, Wait):
            waiting.append(outcome.reason)
        elif isinstance(outcome, Done):
            done.append(outcome.result)
    if waiting:
        return Wait("; ".join(waiting), timeout=ctx.catalogue.waits.rollout)
    return Done("; ".join(done))


def _start_ecs_deployment(
    ctx: Context, client: Any, service: EcsService, entry: dict[str, Any]
) -> None:
    """Force one new deployment, even across a crash between the call and saving its id."""
    found = ecs.describe(client, service.cluster, service.service)
    ecs.check_redeployable(found, service.cluster, service.service)
    primary = ecs.primary_id(found)
    if "before" in entry and primary != entry["before"]:
        # The call went through before this process stopped: follow what it started.
        entry["deployment"] = primary
        ctx.save()
        return
    entry["before"] = primary
    ctx.save()
    entry["deployment"] = ecs.force_new_deployment(client, service.cluster, service.service)
    ctx.save()
    ctx.log.info(
        "forced deployment %s of ECS service %s/%s",
        entry["deployment"],
        service.cluster,
        service.service,
    )


def redeploy_ecs_services(ctx: Context, consumers: Consumers, key: str) -> Outcome:
    """Runbook: `aws ecs update-service --force-new-deployment`, then "check the ECS console
    for progress": follow that deployment until its rolloutState is COMPLETED."""
    if not consumers.ecs_services:
        return Skipped("no ECS services are listed for this secret in rotor.yml")
    client = ctx.clients.aws(ctx.env, "ecs")
    tracked: dict[str, dict[str, Any]] = _state(ctx, key).setdefault("ecs", {})
    for service in consumers.ecs_services:
        entry = tracked.setdefault(f"{service.cluster}/{service.service}", {})
        if "deployment" not in entry:
            _start_ecs_deployment(ctx, client, service, entry)
    waiting = []
    for service in consumers.ecs_services:
        name = f"{service.cluster}/{service.service}"
        try:
            completed = ecs.deployment_completed(
                client, service.cluster, service.service, tracked[name]["deployment"]
            )
        except StepFailed:
            del tracked[name]  # a retry forces a fresh deployment
            raise
        if not completed:
            waiting.append(f"{name} ({tracked[name]['deployment']})")
    if waiting:
        return Wait(
            f"ECS deployments of {', '.join(waiting)} to complete",
            timeout=ctx.catalogue.waits.rollout,
        )
    return Done(
        "ECS deployments completed: "
        + ", ".join(f"{name} ({entry['deployment']})" for name, entry in tracked.items())
    )


def steps(
    consumers_of: ConsumersOf,
    *,
    key: str = "redeploy",
    prefix: str = "",
    expect: ExpectedOf | None = None,
    skip_unless: SkipUnless | None = None,
    why: str = "",
) -> list[Step]:
    """The three redeploy steps for the consumers `consumers_of(ctx)` returns.

    `key` keeps their state apart from another redeploy in the same rotation (a roll back),
    `prefix` their names; `expect` gives the values the synced Secrets must hold, and
    `skip_unless` a reason to skip them all (or None to run).
    """

    def guarded(run: Callable[[Context, Consumers], Outcome]) -> Callable[[Context], Outcome]:
        def step(ctx: Context) -> Outcome:
            reason = skip_unless(ctx) if skip_unless else None
            return Skipped(reason) if reason else run(ctx, consumers_of(ctx))

        return step

    return [
        Step(
            prefix + "sync",
            f"Force-sync the ExternalSecrets and check their Secrets{why}",
            guarded(lambda ctx, c: sync_external_secrets(ctx, c, key, expect)),
        ),
        Step(
            prefix + "rollout",
            f"Wait for the Deployments to roll out{why}",
            guarded(lambda ctx, c: roll_out_deployments(ctx, c, key)),
        ),
        Step(
            prefix + "ecs",
            f"Force a new deployment of the ECS services and follow it{why}",
            guarded(lambda ctx, c: redeploy_ecs_services(ctx, c, key)),
        ),
    ]
