"""The state store refuses any row holding a registered secret, whatever its escaping: quotes,
backslashes and non-ASCII characters come out of JSON (and repr) spelled differently from the
value itself. A real SQLite store behind the engine, and a whole MySQL rotation whose app
password holds all three."""

from __future__ import annotations

import json
import secrets

import pytest

from bot.settings import Settings
from bot.wiring import build_engine
from rotation import redact
from rotation.engine import Context, Done, Engine, Outcome
from rotation.store import SecretInState, Store
from tests.rig import drive
from tests.test_engine import CATALOGUE, Clock, ScriptedKind

AWKWARD = ['quote"d', "back\\slash", "n\u00f6n-\u00e4scii", "all\"of\\th\u00e9m"]


def awkward(kind: str) -> str:
    value = f"{kind}-{secrets.token_hex(6)}"
    redact.register(value)
    return value


@pytest.mark.parametrize("shape", AWKWARD)
def test_a_step_that_puts_a_secret_in_its_data_fails_and_stores_nothing(tmp_path, shape):
    secret = awkward(shape)

    def leaky(ctx: Context) -> Outcome:
        ctx.data["oops"] = {"nested": [f"password={secret}"]}
        return Done("ok")

    store = Store(tmp_path / "state.db", clock=Clock())
    kind = ScriptedKind({"preflight": leaky})
    engine = Engine(store, CATALOGUE, {"mysql": kind}, clients=None, clock=store.clock)
    rid = engine.start("mysql", "signon", "staging", "alice").id
    row = engine.advance(rid)
    assert row.current.status == "failed" and "contains a secret value" in row.current.error
    assert "oops" not in row.data
    dump = "\n".join(store.db.iterdump())
    for spelling in (secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]):
        assert spelling not in dump


@pytest.mark.parametrize("shape", AWKWARD)
def test_every_kind_of_row_refuses_it(tmp_path, shape):
    secret = awkward(shape)
    store = Store(tmp_path / "state.db", clock=Clock())
    with pytest.raises(SecretInState):
        store.create_rotation("mysql", "signon", "staging", "alice", {"note": secret}, [])
    rid = store.create_rotation("mysql", "signon", "staging", "alice", {}, [("a", "A", False)])
    with pytest.raises(SecretInState), store.transaction():
        store.update_rotation(rid, data={"deep": {"er": [secret]}})
    with pytest.raises(SecretInState), store.transaction():
        store.update_rotation(rid, data={"json": json.dumps({"p": secret})})  # escaped twice
    with pytest.raises(SecretInState), store.transaction():
        store.audit(rid, "step", "rotor", detail=json.dumps({"p": secret}))
    with pytest.raises(SecretInState):
        store.set_kv("k", repr({"p": secret}))
    assert store.rotation(rid).data == {}


def test_a_mysql_rotation_with_an_awkward_password_keeps_it_out_of_the_state(world):
    """The app's password holds a quote, a backslash and non-ASCII characters."""
    password = f"pa\"ss\\w\u00f6rd-{secrets.token_hex(6)}"
    with world.box.root().cursor() as cur:
        cur.execute("ALTER USER %s@'%%' IDENTIFIED BY %s", (world.box.app_user, password))
    world.sm().put_secret_value(SecretId=world.secret_id(),
                                SecretString=json.dumps({**world.app_secret(),
                                                         "password": password}))
    engine: Engine = build_engine(Settings.load(), clock=world.clock)
    rid = engine.start("mysql", world.app, "staging", "alice").id
    row = drive(engine, rid)
    assert row.status == "done", [(s.name, s.status, s.error) for s in row.steps]
    dump = "\n".join(engine.store.db.iterdump())
    for spelling in (password, json.dumps(password)[1:-1],
                     json.dumps(password, ensure_ascii=False)[1:-1], repr(password)[1:-1]):
        assert spelling not in dump
    assert redact.redact(json.dumps({"p": password})) == json.dumps({"p": redact.MASK})


def test_redaction_finds_every_secret_however_many_and_however_they_overlap():
    token = secrets.token_hex(6)
    many = [f"many-{i}-{token}" for i in range(2000)]  # what a long-lived process has seen
    redact.register(*many)
    assert redact.contains_secret(f"log line with {many[1500]} in it")
    assert not redact.contains_secret(f"log line with many-2000-{token} in it")
    assert redact.redact(f"a {many[7]} b") == f"a {redact.MASK} b"

    short = f"short-{token}"
    assert not redact.contains_secret(f"x {short} y")
    redact.register(short, f"{short}-and-longer")  # registered after a check: seen at once
    assert redact.contains_secret(f"x {short} y")
    assert redact.redact(f"a {short}-and-longer b {short} c") == \
        f"a {redact.MASK} b {redact.MASK} c"  # the longest spelling masked first
    quoted = f'quote"d-{token}'
    redact.register(quoted)
    assert redact.redact(json.dumps({"password": quoted})) == f'{{"password": "{redact.MASK}"}}'
