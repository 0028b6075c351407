"""`rotor demo --once`: the whole demo world, headless, through one rotation (CI runs it)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request

from tests import servers
from tests.rig import REPO


def test_rotor_demo_once_rotates_with_two_approvers_and_no_failed_login(tmp_path):
    """With ROTOR_DEMO_MYSQL_URL, a MySQL app joins the world; it is gone afterwards."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ROTOR_", "SLACK_"))}
    result = subprocess.run([sys.executable, "-m", "bot.cli", "demo", "--once"],
                            env={**env, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path),
                                 "ROTOR_DEMO_MYSQL_URL": servers.MYSQL_URL}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    assert "» Alice types `/rotate demo-app staging`" in out
    assert "» Bob presses Approve on convert" in out
    assert "» Carol presses Approve on retire" in out
    assert "✔ done" in out and "*9/9 done*" in out  # the root checklist, updated in place
    assert ("`retire` done: `staging: dropped role demo-app; AWSPREVIOUS of "
            "govuk/demo-app/postgres no longer names demo-app`") in out  # a thread reply
    assert "#govuk-2ndline:" in out and "about to run `retire`" in out
    counter = next(line for line in out.splitlines() if line.startswith("logins: "))
    assert " 0 failed" in counter and "demo-app-user-" in counter
    assert "rotordemo" in counter  # the MySQL app's pods logged in too
    assert "rotation #1 done; the app never failed to log in" in out
    assert list(tmp_path.glob("rotor-demo-*")) == []  # the world removed itself
    host, port, user, password = servers._mysql_root()
    conn = servers.pymysql.connect(host=host, port=port, user=user, password=password,
                                   ssl_disabled=True, connect_timeout=5)
    with conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM mysql.user WHERE User LIKE 'rotordemo%%'")
        assert cur.fetchone()[0] == 0
    conn.close()


def test_rotor_demo_serves_the_page_until_stopped_then_removes_its_world(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ROTOR_", "SLACK_"))}
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "demo"], cwd=tmp_path,
                            env={**env, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path),
                                 "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:  # bounded by the test's timeout
            found = re.search(r"Open (http://127\.0\.0\.1:\d+/)", line)
            if found:
                url = found.group(1)
                break
        assert url, "rotor demo never printed its page's address"
        with urllib.request.urlopen(url, timeout=10) as page:
            assert "Rotor demo" in page.read().decode()
        with urllib.request.urlopen(url + "ui/state?user=U0ALICE", timeout=10) as state:
            assert '"hint": "/rotate demo-app staging"' in state.read().decode()
        assert list(tmp_path.glob("rotor-demo-*")), "the world lives under TMPDIR"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
    assert proc.returncode == 0
    assert list(tmp_path.glob("rotor-demo-*")) == []
