"""The Kubernetes API calls the test suite made (demo/kube_api.py logs them to the file
named by $ROTOR_TEST_KUBE_LOG), checked against what `rotor rbac` generates."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rotation import catalogue as catalogue_module
from rotation import rbac
from rotation.errors import ConfigError


def read(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def as_call(entry: dict[str, Any]) -> rbac.Call | None:
    if "resource" not in entry:
        return None
    return rbac.Call(entry["verb"], entry["group"], entry["resource"], entry["namespace"],
                     entry["name"])


def kinds(uses: Iterable[rbac.Use] = rbac.USES) -> set[tuple[str, str, str]]:
    """(verb, group, resource) for every verb the generator can grant."""
    return {(verb, use.group, use.resource) for use in uses for verb in use.verbs}


def refused(entries: list[dict[str, Any]],
            uses: Iterable[rbac.Use] = rbac.USES) -> list[str]:
    """Calls the generated RBAC would refuse. A call made for a rig's catalogue is checked
    against that catalogue's Roles, names and namespaces included; any other call (tests of
    rotation/kube.py on their own) against the kinds of call the generator grants."""
    uses = tuple(uses)
    granted_kinds = kinds(uses)
    roles: dict[str, list[dict[str, Any]] | None] = {}
    problems = []
    for entry in entries:
        call = as_call(entry)
        if call is None:
            problems.append(f"{entry['verb']} {entry['path']}: not a namespaced API path")
            continue
        where = entry.get("catalogue")
        if where and where not in roles:
            try:
                roles[where] = rbac.manifests(catalogue_module.load(where), uses=uses)
            except ConfigError:
                roles[where] = None  # the test wrote a broken catalogue on purpose
        objects = roles.get(where) if where else None
        if objects is not None:
            if not rbac.allows(objects, call):
                problems.append(f"{_show(call)} (catalogue {where})")
        elif (call.verb, call.group, call.resource) not in granted_kinds:
            problems.append(_show(call))
    return sorted(set(problems))


def unused(entries: list[dict[str, Any]], uses: Iterable[rbac.Use] = rbac.USES) -> list[str]:
    """Kinds of call the generator grants that no call made."""
    made = {(c.verb, c.group, c.resource) for c in map(as_call, entries) if c is not None}
    return sorted(f"{verb} {resource}{'.' + group if group else ''}"
                  for verb, group, resource in kinds(uses) - made)


def _show(call: rbac.Call) -> str:
    resource = f"{call.resource}.{call.group}" if call.group else call.resource
    return f"{call.verb} {resource} {call.namespace}/{call.name or '*'}"
