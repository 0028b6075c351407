"""PostgreSQL briefly gone: the store says so (/readyz), and work resumes by itself once the
server is back, through the same pool, without a restart."""

from __future__ import annotations

from urllib.parse import urlsplit

from rotation.engine import Engine
from rotation.store import Store
from tests.fakes.tcp_proxy import TcpProxy
from tests.slackbot import running_bot
from tests.test_engine import CATALOGUE, Clock, ScriptedKind, done
from tests.waiting import wait_for


def test_state_db_outage_is_reported_and_work_resumes_after(postgres_state):
    parts = urlsplit(postgres_state)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    url = parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}").geturl()
    clock = Clock()
    store = Store(url, clock=clock)
    kind = ScriptedKind({"a": done, "b": done})
    engine = Engine(store, CATALOGUE, {"mysql": kind}, clients=None, clock=clock)
    try:
        assert store.ping() is None
        rid = engine.start("mysql", "signon", "staging", "U1").id
        proxy.cut()
        assert "state DB unreachable" in (store.ping() or "")
        try:
            engine.tick()
        except Exception:
            pass
        assert kind.calls == []  # nothing ran without the state DB
        proxy.restore()
        wait_for(lambda: store.ping() is None, what="the store to reconnect", timeout=60)
        engine.tick()
        assert store.rotation(rid).status == "done" and kind.calls == ["a", "b"]
    finally:
        store.close()
        proxy.close()


def test_rotor_serve_reports_the_outage_on_readyz_and_carries_on_after(tmp_path,
                                                                      postgres_state):
    parts = urlsplit(postgres_state)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    url = parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}").geturl()
    try:
        with running_bot(tmp_path, state_url=url) as bot:
            proxy.cut()
            answer = bot.wait_for(lambda: bot.get("/readyz"), lambda a: a.status == 503,
                                  what="/readyz to report the state DB")
            assert "state DB unreachable" in answer.body
            proxy.restore()
            bot.wait_ready()
            assert bot.command("signon staging", user="U0ALICE").status == 200
            bot.wait_step("signon", "staging", "switch", "needs-approval")
    finally:
        proxy.close()
