"""Redeploying a secret's consumers (`rotation.consumers`): moto's ECS, the fake Kubernetes API.

A small kind changes the secret and then runs the three redeploy steps, through the real
engine. moto has no ECS deployment controller; `tests.rig.EcsDeployments` plays it (see there
for what it simulates).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import pytest

from bot.settings import Settings
from bot.wiring import build_engine
from rotation import appcreds, consumers, ecs
from rotation import secrets as sm_secrets
from rotation.catalogue import Catalogue
from rotation.engine import Context, Done, Engine, Outcome, Step
from tests.rig import Rig, drive


def change(ctx: Context) -> Outcome:
    """Give the secret a new password, as a rotation would."""
    if ctx.data.get("changed"):
        return Done("already changed")
    sm = ctx.clients.aws(ctx.env, "secretsmanager")
    current = sm_secrets.read_json(sm, ctx.target) or {}
    ctx.data["changed"] = sm_secrets.put_current(
        sm, ctx.target, {**current, "password": appcreds.new_password()}
    )
    return Done("new password in AWSCURRENT")


def new_password(ctx: Context) -> consumers.Expected:
    sm = ctx.clients.aws(ctx.env, "secretsmanager")
    new = (sm_secrets.read_json(sm, ctx.target) or {})["password"]
    old = (sm_secrets.read_json(sm, ctx.target, stage="AWSPREVIOUS") or {})["password"]
    return consumers.Expected(new=[new], old=[old])


class RedeployKind:
    name = "redeploy"

    def validate(
        self, catalogue: Catalogue, target: str, env: str, params: Mapping[str, Any]
    ) -> None:
        catalogue.managed_secret(target, env)

    def steps(
        self, catalogue: Catalogue, target: str, env: str, params: Mapping[str, Any]
    ) -> list[Step]:
        return [
            Step("change", "Change the secret", change),
            *consumers.steps(
                lambda ctx: ctx.catalogue.managed_secret(ctx.target, ctx.env), expect=new_password
            ),
        ]

    def cancel(self, ctx: Context) -> str:
        return "nothing"



def ecs_client(world: Rig) -> Any:
    return world.client("ecs")


def ecs_service(world: Rig, name: str = "web") -> dict[str, str]:
    """A service whose tasks read the secret at start, with the circuit breaker on."""
    client = ecs_client(world)
    cluster = f"{world.app}-cluster"
    client.create_cluster(clusterName=cluster)
    arn = world.sm().describe_secret(SecretId=world.secret_id())["ARN"]
    client.register_task_definition(
        family=f"{world.app}-{name}",
        containerDefinitions=[
            {
                "name": "app",
                "image": "app:1",
                "memory": 128,
                "secrets": [{"name": "DATABASE_PASSWORD", "valueFrom": f"{arn}:password::"}],
            }
        ],
    )
    client.create_service(
        cluster=cluster,
        serviceName=name,
        taskDefinition=f"{world.app}-{name}",
        desiredCount=2,
        deploymentConfiguration={"deploymentCircuitBreaker": {"enable": True, "rollback": True}},
    )
    return {"cluster": cluster, "service": name}


def configure(world: Rig, **consumers_: Any) -> None:
    """List the rig's secret under `secrets:` with these consumers in staging."""
    config = json.loads(world.config_path.read_text())
    config["secrets"] = {world.secret_id(): {"environments": {"staging": consumers_}}}
    world.config_path.write_text(json.dumps(config, indent=2))


def engine_for(world: Rig) -> Engine:
    engine = build_engine(Settings.load(), clock=world.clock)
    engine.kinds["redeploy"] = RedeployKind()
    return engine




def test_every_consumer_is_redeployed_and_checked(world, deployments, caplog):
    caplog.set_level(logging.DEBUG, logger="rotor")
    service = ecs_service(world)
    configure(
        world,
        external_secrets=[world.external_secret],
        deployments=[world.app],
        ecs_services=[service],
    )
    pods_before = {p["metadata"]["uid"] for p in world.kube.pods("apps", world.app)}
    engine = engine_for(world)
    final = drive(engine, engine.start("redeploy", world.secret_id(), "staging", "alice").id)
    assert final.status == "done", [(s.name, s.status, s.error) for s in final.steps]

    password = world.current()["password"]
    assert f":{password}@" in world.kube.secret_data("apps", world.external_secret)["DATABASE_URL"]
    live = [
        p for p in world.kube.pods("apps", world.app) if "deletionTimestamp" not in p["metadata"]
    ]
    assert live and not {p["metadata"]["uid"] for p in live} & pods_before
    assert "holding the new value" in final.step("sync").result
    assert "ready pods started after the sync" in final.step("rollout").result

    assert len(deployments.forced) == 1
    cluster, name, deployment = deployments.forced[0]
    described = ecs_client(world).describe_services(cluster=cluster, services=[name])
    assert described["services"][0]["deployments"][0]["id"] == deployment
    assert described["services"][0]["deployments"][0]["rolloutState"] == "COMPLETED"
    assert deployment in final.step("ecs").result

    dump = "\n".join(engine.store.db.iterdump())
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert password not in dump and password not in logs


def test_waits_for_the_ecs_deployment_and_never_forces_twice(world, deployments):
    deployments.delay = 60
    configure(world, ecs_services=[ecs_service(world)])
    engine = engine_for(world)
    rotation = engine.start("redeploy", world.secret_id(), "staging", "alice")
    row = engine.advance(rotation.id)
    for _ in range(3):
        row = engine.advance(rotation.id)
    assert row.current.name == "ecs" and row.current.status == "waiting"
    assert "to complete" in row.current.wait_reason
    world.clock.advance(61)
    assert drive(engine, rotation.id).status == "done"
    assert len(deployments.forced) == 1


def test_deployments_without_an_external_secret_are_restarted_at_once(world):
    configure(world, deployments=[world.app])
    world.kube.reloader_enabled = False
    engine = engine_for(world)
    final = drive(engine, engine.start("redeploy", world.secret_id(), "staging", "alice").id)
    assert final.status == "done"
    assert final.step("sync").status == "skipped" and final.step("ecs").status == "skipped"
    assert "after a restart" in final.step("rollout").result
    template = world.kube.deployment("apps", world.app)["spec"]["template"]["metadata"]
    assert "kubectl.kubernetes.io/restartedAt" in template["annotations"]


def test_a_failed_ecs_deployment_fails_the_step_and_retry_forces_a_new_one(world, deployments):
    service = ecs_service(world)
    configure(world, ecs_services=[service])
    deployments.outcomes[(service["cluster"], service["service"])] = "FAILED"
    engine = engine_for(world)
    rotation = engine.start("redeploy", world.secret_id(), "staging", "alice")
    row = drive(engine, rotation.id)
    assert row.current.name == "ecs" and row.current.status == "failed"
    assert "circuit breaker: tasks failed to start" in row.current.error
    assert "\n" not in row.current.error

    deployments.outcomes.clear()
    engine.retry(rotation.id, "alice")
    assert drive(engine, rotation.id).status == "done"
    assert len({d for _, _, d in deployments.forced}) == 2


def test_a_circuit_breaker_rollback_fails_though_the_service_is_stable(world, deployments):
    service = ecs_service(world)
    configure(world, ecs_services=[service])
    deployments.outcomes[(service["cluster"], service["service"])] = "ROLLED_BACK"
    engine = engine_for(world)
    row = drive(engine, engine.start("redeploy", world.secret_id(), "staging", "alice").id)
    assert row.current.name == "ecs" and row.current.status == "failed"
    assert "no longer PRIMARY" in row.current.error
    # What the services_stable waiter alone would have concluded: all is well.
    ecs_client(world).get_waiter("services_stable").wait(
        cluster=service["cluster"],
        services=[service["service"]],
        WaiterConfig={"Delay": 1, "MaxAttempts": 1},
    )


class Crash(BaseException):
    """The process dies (nothing in the engine catches it)."""


def test_a_crash_after_update_service_follows_that_deployment(world, deployments, monkeypatch):
    configure(world, ecs_services=[ecs_service(world)])
    real = ecs.force_new_deployment

    def dies_after(*args: Any) -> str:
        real(*args)
        raise Crash

    monkeypatch.setattr(ecs, "force_new_deployment", dies_after)
    engine = engine_for(world)
    rotation = engine.start("redeploy", world.secret_id(), "staging", "alice")
    with pytest.raises(Crash):
        drive(engine, rotation.id)
    monkeypatch.setattr(ecs, "force_new_deployment", real)
    final = drive(engine_for(world), rotation.id)  # a new process resumes
    assert final.status == "done"
    assert len(deployments.forced) == 1
    assert deployments.forced[0][2] in final.step("ecs").result


@pytest.mark.parametrize(
    "password, problem",
    [
        (None, "still holds the old value"),
        ("SomeOtherPassword1234567890", "does not hold the new value"),
    ],
)
def test_a_secret_the_sync_did_not_update_fails_the_step(world, password, problem):
    other = f"govuk/{world.app}/other"
    value = {**world.app_secret(), **({"password": password} if password else {})}
    world.sm().create_secret(Name=other, SecretString=json.dumps(value))
    world.kube.add_external_secret("apps", f"{world.app}-other", secret_id=other)
    configure(world, external_secrets=[world.external_secret, f"{world.app}-other"])
    engine = engine_for(world)
    row = drive(engine, engine.start("redeploy", world.secret_id(), "staging", "alice").id)
    assert row.current.name == "sync" and row.current.status == "failed"
    assert row.current.error == (
        f"ExternalSecret apps/{world.app}-other synced, but Secret apps/{world.app}-other {problem}"
    )


def test_a_failed_sync_fails_with_the_operator_s_reason(world):
    configure(world, external_secrets=[world.external_secret])
    world.kube.sync_error = "could not get secret data from provider"
    engine = engine_for(world)
    row = drive(engine, engine.start("redeploy", world.secret_id(), "staging", "alice").id)
    assert row.current.name == "sync" and row.current.status == "failed"
    assert "could not get secret data from provider" in row.current.error


def test_a_secret_with_no_consumers_of_a_type_skips_those_steps(world):
    configure(world)
    engine = engine_for(world)
    final = drive(engine, engine.start("redeploy", world.secret_id(), "staging", "alice").id)
    assert final.status == "done"
    assert [s.status for s in final.steps] == ["done", "skipped", "skipped", "skipped"]
    assert final.step("ecs").result == "no ECS services are listed for this secret in rotor.yml"


def test_a_missing_ecs_service_fails_in_one_line(world):
    ecs_client(world).create_cluster(clusterName=f"{world.app}-cluster")
    configure(world, ecs_services=[{"cluster": f"{world.app}-cluster", "service": "gone"}])
    engine = engine_for(world)
    row = drive(engine, engine.start("redeploy", world.secret_id(), "staging", "alice").id)
    assert row.current.name == "ecs" and row.current.status == "failed"
    assert row.current.error == f"ECS service {world.app}-cluster/gone not found (MISSING)"
