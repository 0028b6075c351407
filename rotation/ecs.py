"""ECS services: force a new deployment, then follow that one deployment until it completes.

The Secrets Manager runbook ends with `aws ecs update-service --force-new-deployment`: new
tasks read the secret afresh when they start. Rotor follows the deployment that call made, by
its id. `rolloutState` COMPLETED is success; FAILED, or another deployment becoming PRIMARY
(the circuit breaker rolled back, or someone deployed over it), is failure. The
`services_stable` waiter is not enough on its own: after a circuit-breaker rollback the
service is stable again, on tasks that may still hold the old secret.
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from rotation.errors import AwsError, StepFailed


def _where(cluster: str, service: str) -> str:
    return f"ECS service {cluster}/{service}"


def _failed(where: str, action: str, exc: ClientError) -> AwsError:
    error = exc.response.get("Error", {})
    detail = " ".join(str(error.get(k) or "") for k in ("Code", "Message")).strip()
    return AwsError(f"{where}: could not {action} ({detail or 'error'})")


def describe(ecs: Any, cluster: str, service: str) -> dict[str, Any]:
    """The service as `describe_services` shows it; AwsError when it is missing."""
    try:
        response = ecs.describe_services(cluster=cluster, services=[service])
    except ClientError as exc:
        raise _failed(_where(cluster, service), "describe it", exc) from None
    found = [s for s in response.get("services", []) if s.get("status") != "INACTIVE"]
    if not found:
        reason = next((f.get("reason") for f in response.get("failures", [])), None)
        raise AwsError(f"{_where(cluster, service)} not found ({reason or 'MISSING'})")
    return dict(found[0])


def primary_id(service: dict[str, Any]) -> str | None:
    """The id of the service's PRIMARY deployment (the one ECS is moving towards)."""
    return next(
        (d["id"] for d in service.get("deployments", []) if d.get("status") == "PRIMARY"), None
    )


def check_redeployable(service: dict[str, Any], cluster: str, name: str) -> None:
    """Only the ECS deployment controller reports rolloutState; refuse the others up front."""
    controller = (service.get("deploymentController") or {}).get("type", "ECS")
    if controller != "ECS":
        raise StepFailed(
            f"{_where(cluster, name)} uses the {controller} deployment controller; "
            "Rotor can only follow ECS rolling deployments: redeploy it by hand"
        )


def force_new_deployment(ecs: Any, cluster: str, service: str) -> str:
    """`aws ecs update-service --force-new-deployment`; returns the new deployment's id."""
    try:
        response = ecs.update_service(cluster=cluster, service=service, forceNewDeployment=True)
    except ClientError as exc:
        raise _failed(_where(cluster, service), "force a new deployment", exc) from None
    deployment = primary_id(response.get("service", {}))
    if deployment is None:
        raise AwsError(f"{_where(cluster, service)}: update_service returned no PRIMARY deployment")
    return deployment


def deployment_completed(ecs: Any, cluster: str, service: str, deployment_id: str) -> bool:
    """True once `deployment_id` completed; False while it is in progress.

    Raises StepFailed when it failed, or when it is no longer the service's PRIMARY
    deployment: the circuit breaker rolled it back, or another deployment replaced it.
    """
    where = _where(cluster, service)
    deployments = describe(ecs, cluster, service).get("deployments", [])
    ours = next((d for d in deployments if d.get("id") == deployment_id), None)
    primary = next((d for d in deployments if d.get("status") == "PRIMARY"), None)
    if ours is not None and ours.get("rolloutState") == "FAILED":
        reason = ours.get("rolloutStateReason") or "rolloutState FAILED"
        raise StepFailed(f"{where}: deployment {deployment_id} failed: {reason}")
    if primary is None or primary.get("id") != deployment_id:
        now = f"{primary['id']} is" if primary else "no deployment is"
        raise StepFailed(
            f"{where}: deployment {deployment_id} is no longer PRIMARY ({now}): "
            "the circuit breaker rolled it back or another deployment replaced "
            "it, so its tasks may still hold the old secret"
        )
    return primary.get("rolloutState") == "COMPLETED"
