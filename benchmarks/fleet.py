"""A fleet rotated at once: 1, 20 and 50 MySQL apps through the real pool of workers.

    python benchmarks/fleet.py               # the time runs, the hung-database run, SM calls
    python benchmarks/fleet.py 1 20          # only these fleet sizes
    python benchmarks/fleet.py --rollout 30  # each Deployment takes 30 s to roll out

Each app has its own sandbox user and database on the local MariaDB, its own secret in moto,
its own ExternalSecret and Deployment in the fake Kubernetes API; approvals are granted the
moment they open (by another person, as staging needs none). The rotations run on
`EnginePool` (ROTOR_WORKERS engines, each with its own store connection), as in
`rotor serve`. All apps share one MariaDB, so the time runs lift ROTOR_PER_HOST to the fleet
size (a real fleet has an instance per app); one run keeps the default of 2 to show what the
limit costs. Prints figures; asserts nothing.

By default every fake answers at once, so a rotation is all CPU (the engine, moto and the
fake Kubernetes API share this one interpreter) and the fleet's time measures overhead.
`--rollout S` makes each Deployment take S seconds to roll out and re-checks waits on the
catalogue's default backoff, as in production, where a rotation is mostly waiting.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import botocore.client

from bot.settings import Settings
from bot.wiring import build_engine
from bot.worker import EnginePool
from rotation import readcache
from rotation.catalogue import Waits
from rotation.engine import Engine
from rotation.errors import InvalidTransition
from tests import servers
from tests.fakes.silent import SilentServer
from tests.rig import AWS_ENV, ENVIRONMENTS, Rig, rig

SIZES = (1, 20, 50)
ONE_RUNS = 3  # one-app runs; their median is "one rotation"
LIMIT = 300.0  # seconds a run may take before it is reported as unfinished


class Fleet:
    """N apps in one rig: the rig's own app plus N-1 more on the same moto and Kubernetes."""

    def __init__(self, world: Rig) -> None:
        self.world = world
        self.apps: list[str] = [world.app]
        self.boxes: list[Any] = []

    def slow_rollouts(self, seconds: float) -> None:
        """Every Deployment takes `seconds` to roll out; waits re-check on the defaults."""
        for app in self.apps:
            self.world.kube.configure_deployment("apps", app, rollout_delay=seconds)
        self.world.waits.update(first_check=Waits().first_check, max_check=Waits().max_check,
                                rollout=max(Waits().rollout, 4 * seconds))

    def add(self, hung_port: int | None = None) -> str:
        """One more app; with `hung_port`, its secret names a host that never answers."""
        world = self.world
        box = servers.mysql_sandbox()
        self.boxes.append(box)
        app = box.prefix
        secret = {"engine": "mysql", "host": box.host, "port": box.port, "dbname": box.database,
                  "username": box.app_user, "password": box.app_password}
        if hung_port is not None:
            secret.update(host="127.0.0.1", port=hung_port)
        sm = world.sm()
        sm.create_secret(Name=f"govuk/{app}/mysql", SecretString=json.dumps(secret))
        for env in ENVIRONMENTS:
            sm.create_secret(Name=f"{app}-{env}-rds-admin-passwords",
                             SecretString=json.dumps({app: box.admin_password}))
        world.kube.add_external_secret("apps", f"{app}-mysql", secret_id=f"govuk/{app}/mysql",
                                       url_scheme="mysql2")
        world.kube.add_deployment("apps", app, replicas=2, reloads_on=[f"{app}-mysql"])
        self.apps.append(app)
        return app

    def write_config(self) -> None:
        self.world.write_config()  # the rig's own, with its waits
        config = json.loads(self.world.config_path.read_text())
        template = config["apps"][self.world.app]
        for app, box in zip(self.apps[1:], self.boxes, strict=True):
            config["apps"][app] = {
                **template, "admin_user": box.admin_user,
                "environments": {env: {"admin_secret": f"{app}-{env}-rds-admin-passwords"}
                                 for env in ENVIRONMENTS}}
        self.world.config_path.write_text(json.dumps(config, indent=2))

    def drop(self) -> None:
        for box in self.boxes:
            servers.drop_mysql_sandbox(box)


@contextmanager
def fleet(n: int, tmp: Path, *, hung: bool = False,
          rollout: float = 0.0) -> Iterator[tuple[Fleet, str | None]]:
    with rig("mysql", tmp) as world, SilentServer() as silent:
        apps = Fleet(world)
        hung_app = None
        try:
            for _ in range(n - 1):
                apps.add()
            if hung:
                hung_app = apps.add(hung_port=silent.port)
            if rollout:
                apps.slow_rollouts(rollout)
            apps.write_config()
            os.environ.update({k: v for k, v in world.env().items()
                               if k.startswith(("AWS_", "ROTOR_", "KUBECONFIG"))})
            yield apps, hung_app
        finally:
            apps.drop()


def _watch(person: Engine, ids: dict[int, str], changed: queue.Queue[int | None],
           ended: dict[str, float], status: dict[str, str], started: float) -> None:
    """Bob approves every gate the moment it opens, and each app's end is noted: both from
    the engines' change events (as Slack clicks and the reporter would), not by polling the
    state DB, which would take the interpreter from the workers being measured."""
    while (rotation_id := changed.get()) is not None:
        if rotation_id not in ids or ids[rotation_id] in ended:
            continue
        row = person.store.rotation(rotation_id)
        step = row.current
        if row.status != "active" or (step is not None and step.status == "failed"):
            ended[ids[rotation_id]] = time.perf_counter() - started
            status[ids[rotation_id]] = row.status if row.status != "active" else "failed"
        elif step is not None and step.status == "needs-approval":
            try:
                person.approve(rotation_id, step.name, "bob")
            except InvalidTransition:
                pass


def run(apps: list[str], *, workers: int, per_host: int,
        skip: str | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """Start a rotation of every app at once; seconds from the start to each one's end."""
    os.environ.update({"ROTOR_WORKERS": str(workers), "ROTOR_PER_HOST": str(per_host)})
    settings = Settings.load()
    person = build_engine(settings)
    engines = [build_engine(settings, clients=person.clients) for _ in range(settings.workers)]
    pool = EnginePool(engines, idle=0.5)
    changed: queue.Queue[int | None] = queue.Queue()

    def on_change(rotation_id: int) -> None:  # as in rotor serve: any change wakes the pool
        pool.wake(rotation_id)
        changed.put(rotation_id)

    for engine in [person, *engines]:
        engine.on_change = on_change
    ended: dict[str, float] = {}
    status: dict[str, str] = {}
    started = time.perf_counter()
    ids = {person.start("mysql", app, "staging", "alice").id: app for app in apps}
    watcher = threading.Thread(target=_watch, daemon=True,
                               args=(person, ids, changed, ended, status, started))
    watcher.start()
    for rotation_id in ids:  # gates opened before the watcher started
        changed.put(rotation_id)
    pool.start()
    try:
        while time.perf_counter() - started < LIMIT:
            if all(app in ended for app in ids.values() if app != skip):
                break
            time.sleep(0.05)
    finally:
        changed.put(None)
        watcher.join(5)
        if skip is None:
            pool.stop()
    if skip is not None:  # the hung worker stays on its bounded read; leave it to end alone
        threading.Thread(target=pool.stop, daemon=True).start()
    return ended, status


def _total(ended: dict[str, float], skip: str | None = None) -> float:
    times = [t for app, t in ended.items() if app != skip]
    return max(times) if times else float("nan")


@contextmanager
def counting() -> Iterator[Counter[str]]:
    """Count Secrets Manager calls by operation."""
    calls: Counter[str] = Counter()
    real = botocore.client.BaseClient._make_api_call

    def counted(self: Any, operation: str, params: Any) -> Any:
        if self.meta.service_model.service_name == "secretsmanager":
            calls[operation] += 1
        return real(self, operation, params)

    botocore.client.BaseClient._make_api_call = counted  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        botocore.client.BaseClient._make_api_call = real  # type: ignore[method-assign]


def secrets_calls(tmp: Path) -> None:
    for label, cached in (("before (no per-advance cache)", False), ("after", True)):
        with tempfile.TemporaryDirectory(dir=tmp) as where, fleet(1, Path(where)) as (apps, _):
            real = readcache.read
            if not cached:
                readcache.read = lambda key, load, copy=lambda v: v: load()  # type: ignore[assignment]
            try:
                with counting() as calls:
                    ended, status = run(apps.apps, workers=1, per_host=2)
            finally:
                readcache.read = real  # type: ignore[assignment]
            reads = calls["GetSecretValue"]
            print(f"Secrets Manager calls per MySQL rotation, {label}: {sum(calls.values())} "
                  f"({reads} GetSecretValue; {dict(calls)}) [{status}]")


def main() -> None:
    os.environ.update(AWS_ENV)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sizes", nargs="*", type=int, default=SIZES)
    parser.add_argument("--rollout", type=float, default=0.0, metavar="SECONDS",
                        help="each Deployment's rollout takes this long (default: at once)")
    args = parser.parse_args()
    sizes, rollout = tuple(args.sizes), args.rollout
    workers = int(os.environ.get("ROTOR_WORKERS") or 4)
    print(f"Rollouts: {f'{rollout:g} s each, waits on the default backoff' if rollout else 'at once'}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if not rollout:
            secrets_calls(tmp)
        one = None
        totals: dict[int, float] = {}
        for n in sizes:
            runs = ONE_RUNS if n == 1 else 1  # the baseline: a median, the machine is shared
            results = []
            for _ in range(runs):
                with tempfile.TemporaryDirectory(dir=tmp) as where, \
                        fleet(n, Path(where), rollout=rollout) as (f, _):
                    results.append(run(f.apps, workers=workers, per_host=n))
            results.sort(key=lambda r: _total(r[0]))
            ended, status = results[len(results) // 2]
            total = _total(ended)
            totals[n] = total
            one = one or (total if n == 1 else None)
            bad = {s: c for s, c in Counter(status.values()).items() if s != "done"}
            ratio = f"{total / one:.1f}x one rotation" if one else ""
            print(f"{n:3} apps, {workers} workers: total {total:6.2f} s  {ratio}"
                  f"{'  NOT DONE: ' + str(bad) if bad or len(ended) < n else ''}")
        big = max(sizes)
        if big > 1:
            with tempfile.TemporaryDirectory(dir=tmp) as where, \
                    fleet(big - 1, Path(where), hung=True, rollout=rollout) as (f, hung_app):
                ended, status = run(f.apps, workers=workers, per_host=big, skip=hung_app)
            others = _total(ended, skip=hung_app)
            base = totals.get(big)
            against = f" = {others / base:.2f}x their time without it" if base else ""
            print(f"{big - 1} apps + 1 hung database, {workers} workers: the others in "
                  f"{others:6.2f} s{against}; hung app {status.get(hung_app or '', 'still hung')}")
            mid = min((n for n in sizes if n > 1), default=big)
            with tempfile.TemporaryDirectory(dir=tmp) as where, \
                    fleet(mid, Path(where), rollout=rollout) as (f, _):
                ended, status = run(f.apps, workers=workers, per_host=2)
            print(f"{mid:3} apps on one host, ROTOR_PER_HOST=2 (the default): total "
                  f"{_total(ended):6.2f} s")


if __name__ == "__main__":
    main()
