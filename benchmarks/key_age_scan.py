"""Key-age scan of 5,000 IAM users: the credential report against the naive per-user listing.

Both run in the same process against the same moto server (`tests.rig.moto_url()`), over HTTP,
through boto3 clients the way Rotor makes them (AWS_ENDPOINT_URL). The users and their keys
are created through the API; key ages and last uses are then set in moto's IAM backend (the
server runs in this process), since the API cannot back-date a key.

- report: `rotation.iam.key_age_report`: GenerateCredentialReport + GetCredentialReport.
- naive:  ListUsers (paginated), then ListAccessKeys per user and GetAccessKeyLastUsed per key.

Both must find the same overdue and due-soon keys. Prints figures; asserts only that.
Note: moto answers GetAccessKeyLastUsed by walking every key of every user, so on moto the
naive scan also grows with the square of the users; on AWS each call is flat but rate-limited.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
from moto.iam.models import AccessKeyLastUsed, iam_backends

from rotation import catalogue, iam
from rotation.clients import Clients
from tests.rig import AWS_ENV, moto_url

USERS = int(os.environ.get("ROTOR_BENCH_USERS", "5000"))
ACCOUNT = "123456789012"  # moto's default account: the one AWS_ENV's credentials reach
DAY = 86400.0
CONFIG = """
environments:
  bench: {aws_region: eu-west-1}
key_age: {max_key_age_days: 90, warn_days: 80}
"""


def seed(client: Any, now: float) -> None:
    def one(i: int) -> None:
        name = f"bench-{i:05d}"
        client.create_user(UserName=name)
        client.create_access_key(UserName=name)
        if i % 10 == 0:
            client.create_access_key(UserName=name)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(USERS)))
    backend = iam_backends[ACCOUNT]["aws"]
    for i, user in enumerate(backend.users.values()):
        for slot, key in enumerate(user.access_keys):
            age = (i * 7 + slot * 40) % 150
            key.create_date = datetime.fromtimestamp(now - age * DAY - 60, UTC).replace(tzinfo=None)
            if i % 3:
                key.last_used = AccessKeyLastUsed(
                    timestamp=datetime.fromtimestamp(now - (i % 5) * DAY, UTC),
                    service="s3",
                    region="eu-west-1",
                )


def naive_scan(client: Any, now: float) -> tuple[Counter[str], int]:
    """What a per-user script does: every user, every key, every key's last use."""
    found: Counter[str] = Counter()
    calls = 0
    for page in client.get_paginator("list_users").paginate():
        calls += 1
        for user in page["Users"]:
            keys = client.list_access_keys(UserName=user["UserName"])["AccessKeyMetadata"]
            calls += 1
            for key in keys:
                client.get_access_key_last_used(AccessKeyId=key["AccessKeyId"])
                calls += 1
                if key["Status"] != "Active":
                    continue
                age = now - key["CreateDate"].timestamp()
                if age > 90 * DAY:
                    found["overdue"] += 1
                elif age >= 80 * DAY:
                    found["due soon"] += 1
    return found, calls


def main() -> None:
    url = moto_url()
    os.environ.update({**AWS_ENV, "AWS_ENDPOINT_URL": url})
    now = time.time()
    client = boto3.client("iam", region_name="eu-west-1")
    started = time.perf_counter()
    seed(client, now)
    print(
        f"seeded {USERS:,} users ({USERS + USERS // 10:,} keys) on moto at {url} "
        f"in {time.perf_counter() - started:.1f}s"
    )

    cat = catalogue.parse(CONFIG)
    calls: list[str] = []
    clients = Clients(cat)
    clients.aws("bench", "iam").meta.events.register(
        "before-call.iam.*", lambda model, **_: calls.append(model.name)
    )
    started = time.perf_counter()
    report = iam.key_age_report(clients, cat, "bench", now)
    fast = time.perf_counter() - started
    fast_found = Counter(overdue=len(report.overdue), **{"due soon": len(report.due_soon)})

    started = time.perf_counter()
    slow_found, slow_calls = naive_scan(client, now)
    slow = time.perf_counter() - started

    assert fast_found == slow_found, (fast_found, slow_found)
    print(
        f"credential report: {fast:7.2f}s  {len(calls):>6,} API calls  "
        f"{report.users:,} users, {report.active_keys:,} active keys; "
        f"{fast_found['overdue']} overdue, {fast_found['due soon']} due soon"
    )
    print(f"naive listing:     {slow:7.2f}s  {slow_calls:>6,} API calls  (same findings)")
    print(f"the report is {slow / fast:.0f}x faster with {slow_calls // len(calls):,}x fewer calls")


if __name__ == "__main__":
    main()
