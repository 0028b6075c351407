"""Carrying the old PostgreSQL user's rights over to the owner role and the new user.

A new user gets the owner role's rights, nothing else. Three things the old user has besides
would be lost with it (`DROP OWNED BY` revokes and drops them), so each is read and carried:

- Privileges granted to the old user itself (`direct_grants`), not through the owner role,
  and roles it is a member of besides the owner role (`roles_to_copy`). Both are copied to the
  owner role, so the new user (and every later one) inherits them.
- Default privileges defined for it (`ALTER DEFAULT PRIVILEGES FOR ROLE <old user>`,
  pg_default_acl): another role (reporting) would silently lose access to every table a later
  migration creates. They are re-created for the owner role and for the new user, who creates
  the objects of later migrations.
- Other roles' default privileges that name it (the admin's `ALTER DEFAULT PRIVILEGES ...
  GRANT SELECT ON TABLES TO <old user>`): the owner role is added to them.

Everything here reads first and changes only what is missing, so a step can run it again;
`check_kept` verifies it all right before `DROP OWNED`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import sql

from rotation.errors import StepFailed
from rotation.postgres_db import (
    Connection,
    _errors,
    _make_admin_act_for,
    _role,
    _rows,
    validate_role_name,
)
from rotation.postgres_rights import check_same, rights, shorten

log = logging.getLogger(__name__)

# -- privileges granted to the old user itself ---------------------------------------------

# The privilege names aclexplode reports, as GRANT spells them: only these reach SQL.
_PRIVILEGES = {
    p: sql.SQL(p)
    for p in (
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "TRUNCATE",
        "REFERENCES",
        "TRIGGER",
        "EXECUTE",
        "USAGE",
        "CREATE",
        "CONNECT",
        "TEMPORARY",
    )
}

_GRANTS_QUERY = """
    WITH who AS (SELECT oid AS r FROM pg_roles WHERE rolname = %(role)s)
    SELECT CASE c.relkind WHEN 'S' THEN 'sequence' ELSE 'table' END, c.oid, n.nspname::text,
           c.relname::text, '', a.privilege_type, a.is_grantable, '{}'::text[], '{}'::text[]
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a, who
    WHERE a.grantee = who.r AND c.relowner <> who.r AND n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
  UNION ALL
    SELECT 'column', c.oid, n.nspname::text, c.relname::text, t.attname::text,
           a.privilege_type, a.is_grantable, '{}', '{}'
    FROM pg_attribute t JOIN pg_class c ON c.oid = t.attrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(t.attacl) a, who
    WHERE a.grantee = who.r AND c.relowner <> who.r AND NOT t.attisdropped AND n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
  UNION ALL
    SELECT 'schema', n.oid, '', n.nspname::text, '', a.privilege_type, a.is_grantable, '{}', '{}'
    FROM pg_namespace n, aclexplode(n.nspacl) a, who
    WHERE a.grantee = who.r AND n.nspowner <> who.r AND n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
  UNION ALL
    SELECT 'routine', p.oid, n.nspname::text, p.proname::text, '', a.privilege_type,
           a.is_grantable,
           array(SELECT tn.nspname::text FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY u(t, i)
                 JOIN pg_type y ON y.oid = u.t JOIN pg_namespace tn ON tn.oid = y.typnamespace
                 ORDER BY u.i),
           array(SELECT y.typname::text FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY u(t, i)
                 JOIN pg_type y ON y.oid = u.t ORDER BY u.i)
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace, aclexplode(p.proacl) a, who
    WHERE a.grantee = who.r AND p.proowner <> who.r
      AND n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
  UNION ALL
    SELECT 'database', d.oid, '', d.datname::text, '', a.privilege_type, a.is_grantable,
           '{}', '{}'
    FROM pg_database d, aclexplode(d.datacl) a, who
    WHERE a.grantee = who.r AND d.datdba <> who.r AND d.datname = current_database()
    ORDER BY 1, 3, 4, 5, 6
"""

# Whether a role holds one such privilege (directly, by membership or as the owner).
_HELD = {
    "table": "SELECT has_table_privilege(%(to)s::name, %(oid)s::oid, %(priv)s)",
    "sequence": "SELECT has_sequence_privilege(%(to)s::name, %(oid)s::oid, %(priv)s)",
    "column": "SELECT has_column_privilege(%(to)s::name, %(oid)s::oid, %(column)s, %(priv)s)",
    "schema": "SELECT has_schema_privilege(%(to)s::name, %(oid)s::oid, %(priv)s)",
    "routine": "SELECT has_function_privilege(%(to)s::name, %(oid)s::oid, %(priv)s)",
    "database": "SELECT has_database_privilege(%(to)s::name, %(oid)s::oid, %(priv)s)",
}


@dataclass(frozen=True)
class Grant:
    """One privilege granted to a role itself (not through a membership) on one object."""

    kind: str  # table, sequence, column, schema, routine, database
    oid: int
    schema: str
    name: str
    column: str
    privilege: str
    grantable: bool
    arg_schemas: tuple[str, ...] = ()
    arg_types: tuple[str, ...] = ()

    def describe(self) -> str:
        where = f"{self.schema}.{self.name}" if self.schema else self.name
        if self.kind == "column":
            what = f"{self.privilege} ({self.column}) ON TABLE {where}"
        elif self.kind == "routine":
            what = f"{self.privilege} ON ROUTINE {where}({', '.join(self.arg_types)})"
        else:
            what = f"{self.privilege} ON {self.kind.upper()} {where}"
        return what + (" WITH GRANT OPTION" if self.grantable else "")

    def statement(self, to: str) -> sql.Composed:
        privilege = _PRIVILEGES[self.privilege]
        if self.kind == "column":
            on = sql.SQL("{} ({}) ON TABLE {}").format(
                privilege, sql.Identifier(self.column), sql.Identifier(self.schema, self.name)
            )
        elif self.kind == "routine":
            args = sql.SQL(", ").join(
                sql.Identifier(s, t) for s, t in zip(self.arg_schemas, self.arg_types, strict=True)
            )
            on = sql.SQL("{} ON ROUTINE {}({})").format(
                privilege, sql.Identifier(self.schema, self.name), args
            )
        else:
            names = (self.schema, self.name) if self.schema else (self.name,)
            on = sql.SQL("{} ON {} {}").format(
                privilege, sql.SQL(self.kind.upper()), sql.Identifier(*names)
            )
        option = sql.SQL(" WITH GRANT OPTION" if self.grantable else "")
        return sql.SQL("GRANT {} TO {}{}").format(on, _role(to), option)


def direct_grants(conn: Connection, role: str) -> list[Grant]:
    """Privileges granted to `role` itself in this database, which a new user does not get.
    What it holds as the owner is left out: that goes with the ownership."""
    with _errors(f"direct grants of {role}"):
        rows = _rows(conn, _GRANTS_QUERY, {"role": validate_role_name(role)})
    return [
        Grant(kind, int(oid), schema, name, column, priv, bool(grantable), tuple(s), tuple(t))
        for kind, oid, schema, name, column, priv, grantable, s, t in rows
    ]


def _holds(conn: Connection, role: str, grant: Grant) -> bool:
    if not _rows(conn, "SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)):
        return False
    priv = grant.privilege + (" WITH GRANT OPTION" if grant.grantable else "")
    params = {"to": role, "oid": grant.oid, "column": grant.column, "priv": priv}
    return bool(_rows(conn, _HELD[grant.kind], params)[0][0])


def grants_to_copy(conn: Connection, role: str, to: str) -> list[Grant]:
    """What `role` holds directly and `to` does not hold yet."""
    return [g for g in direct_grants(conn, role) if not _holds(conn, to, g)]


def copy_grants(conn: Connection, role: str, to: str) -> list[str]:
    """Grant `to` every privilege `role` holds directly and `to` lacks; check each arrived
    (PostgreSQL only warns when the admin may not grant something)."""
    step = "copy_grants"
    changes: list[str] = []
    for grant in grants_to_copy(conn, role, to):
        with _errors(f"{step}: {grant.describe()} to {to}"):
            conn.execute(grant.statement(to))
        if not _holds(conn, to, grant):
            raise StepFailed(
                f"{step}: could not grant {grant.describe()} to {to}: the admin may not grant "
                f"it (the object's owner or a holder WITH GRANT OPTION can); grant it to {to} "
                "by hand, then retry"
            )
        changes.append(f"granted {grant.describe()} to {to} (held by {role} directly)")
        log.info("%s: granted %s to %s", step, grant.describe(), to)
    return changes


def roles_to_copy(conn: Connection, role: str, to: str) -> list[str]:
    """Roles `role` is a member of (other than `to`) that `to` is not a member of yet."""
    query = """
        SELECT g.rolname::text FROM pg_auth_members m
        JOIN pg_roles r ON r.oid = m.member JOIN pg_roles g ON g.oid = m.roleid
        WHERE r.rolname = %(role)s AND g.rolname <> %(to)s
          AND NOT EXISTS (SELECT 1 FROM pg_roles t
                          WHERE t.rolname = %(to)s AND pg_has_role(t.oid, g.oid, 'MEMBER'))
        ORDER BY 1
    """
    with _errors(f"memberships of {role}"):
        return [str(r[0]) for r in _rows(conn, query, {"role": role, "to": to})]


def copy_roles(conn: Connection, role: str, to: str) -> list[str]:
    """Grant `to` the roles `role` is a member of, so every user of `to` has their rights."""
    changes = []
    for granted in roles_to_copy(conn, role, to):
        with _errors(f"copy_roles: GRANT {granted} TO {to}"):
            conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(granted), _role(to)))
        changes.append(f"granted role {granted} to {to} ({role} is a member)")
        log.info("copy_roles: granted %s to %s", granted, to)
    return changes


# -- default privileges (ALTER DEFAULT PRIVILEGES FOR ROLE ...) ------------------------------

_OBJECTS = {"r": "TABLES", "S": "SEQUENCES", "f": "FUNCTIONS", "T": "TYPES", "n": "SCHEMAS"}
_OWNER, _PUBLIC = "@owner", ""

Entry = tuple[str, str, bool]  # (grantee: a role, _OWNER or _PUBLIC; privilege; grantable)
Key = tuple[str, str]  # (schema, or '' for every schema; object type letter)

_DEFAULTS_QUERY = """
    SELECT coalesce(n.nspname::text, ''), d.defaclobjtype::text,
           CASE WHEN a.grantee = 0 THEN '' WHEN a.grantee = d.defaclrole THEN '@owner'
                ELSE pg_get_userbyid(a.grantee)::text END,
           a.privilege_type, a.is_grantable
    FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace
         LEFT JOIN LATERAL aclexplode(d.defaclacl) a ON true
    WHERE d.defaclrole = (SELECT oid FROM pg_roles WHERE rolname = %s)
"""

# PostgreSQL's built-in defaults, which a role-wide (not per-schema) entry replaces.
_BUILT_IN_QUERY = """
    SELECT t.objtype, CASE WHEN a.grantee = 0 THEN '' ELSE '@owner' END,
           a.privilege_type, a.is_grantable
    FROM (VALUES ('r', 'r'), ('S', 's'), ('f', 'f'), ('T', 'T'), ('n', 'n')) t(objtype, code),
         aclexplode(acldefault(t.code::"char", 10::oid)) a
"""


@dataclass(frozen=True)
class DefaultChange:
    """One ALTER DEFAULT PRIVILEGES statement that gives `role` what another role had."""

    role: str
    key: Key
    grant: bool  # GRANT, or REVOKE (a built-in default the other role had revoked)
    entry: Entry

    def describe(self) -> str:
        schema, objtype = self.key
        grantee, priv, grantable = self.entry
        who = {_OWNER: self.role, _PUBLIC: "PUBLIC"}.get(grantee, grantee)
        where = f" IN SCHEMA {schema}" if schema else ""
        if self.grant:
            option = " WITH GRANT OPTION" if grantable else ""
            what = f"GRANT {priv} ON {_OBJECTS[objtype]} TO {who}{option}"
        else:
            what = f"REVOKE {priv} ON {_OBJECTS[objtype]} FROM {who}"
        return f"FOR ROLE {self.role}{where} {what}"

    def statement(self) -> sql.Composed:
        schema, objtype = self.key
        grantee, priv, grantable = self.entry
        who = {_OWNER: _role(self.role), _PUBLIC: sql.SQL("PUBLIC")}.get(
            grantee, sql.Identifier(grantee)
        )
        where = sql.SQL(" IN SCHEMA {}").format(sql.Identifier(schema)) if schema else sql.SQL("")
        objects = sql.SQL(_OBJECTS[objtype])
        if self.grant:
            action = sql.SQL("GRANT {} ON {} TO {}{}").format(
                _PRIVILEGES[priv], objects, who, sql.SQL(" WITH GRANT OPTION" if grantable else "")
            )
        else:
            action = sql.SQL("REVOKE {} ON {} FROM {}").format(_PRIVILEGES[priv], objects, who)
        return sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {}{} {}").format(
            _role(self.role), where, action
        )


def _defaults(conn: Connection, role: str) -> dict[Key, set[Entry]]:
    out: dict[Key, set[Entry]] = {}
    for schema, objtype, grantee, priv, grantable in _rows(conn, _DEFAULTS_QUERY, (role,)):
        entries = out.setdefault((schema, objtype), set())
        if priv is not None:  # an entry whose every privilege was revoked has no rows
            entries.add((grantee, priv, bool(grantable)))
    return out


def default_privileges(conn: Connection, role: str) -> list[str]:
    """What `ALTER DEFAULT PRIVILEGES FOR ROLE role` set, as statements for the preflight."""
    with _errors(f"default privileges of {role}"):
        return [c.describe() for c in _default_changes(conn, role, role, everything=True)]


def _default_changes(
    conn: Connection, role: str, to: str, *, everything: bool = False
) -> list[DefaultChange]:
    """The statements that give `to` every default privilege `role` defined (all of them when
    `everything`, else only those `to` lacks), as `to`'s own."""
    built_in: dict[str, set[Entry]] = {}
    for objtype, grantee, priv, grantable in _rows(conn, _BUILT_IN_QUERY):
        built_in.setdefault(objtype, set()).add((grantee, priv, bool(grantable)))
    theirs = _defaults(conn, validate_role_name(role))
    mine = {} if everything else _defaults(conn, validate_role_name(to))
    changes = []
    for key, granted in sorted(theirs.items()):
        schema, objtype = key
        # A grant to `to` itself is its own right as the owner once it is `to`'s.
        entries = {(_OWNER if g == to else g, p, o) for g, p, o in granted}
        # Without an entry of its own, `to` has the built-in defaults role-wide, none per schema.
        have = mine.get(key, built_in[objtype] if not schema else set())
        if everything:
            have = set() if schema else set(built_in[objtype])
        for grantee, priv, grantable in sorted(entries):
            if not any(g == grantee and p == priv and (o or not grantable) for g, p, o in have):
                changes.append(DefaultChange(to, key, True, (grantee, priv, grantable)))
        if not schema:  # role-wide: built-in defaults `role` revoked are revoked for `to` too
            kept = {(g, p) for g, p, _ in entries}
            for grantee, priv, grantable in sorted(built_in[objtype]):
                if (grantee, priv) not in kept and any(
                    g == grantee and p == priv for g, p, _ in have
                ):
                    changes.append(DefaultChange(to, key, False, (grantee, priv, grantable)))
    return changes


def default_privileges_to_copy(conn: Connection, role: str, to: str) -> list[DefaultChange]:
    with _errors(f"default privileges of {role} for {to}"):
        return _default_changes(conn, role, to)


def copy_default_privileges(conn: Connection, role: str, to: str) -> list[str]:
    """Re-create for `to` the default privileges defined for `role`, then check they are all
    there. The admin must act for `to` to change its default privileges."""
    step = "copy_default_privileges"
    todo = default_privileges_to_copy(conn, role, to)
    if not todo:
        return []
    changes: list[str] = []
    with _errors(step), conn.transaction():
        changes += _make_admin_act_for(conn, to)
        for change in todo:
            conn.execute(change.statement())
            changes.append(f"default privileges: {change.describe()} (as {role} had)")
    left = default_privileges_to_copy(conn, role, to)
    if left:
        raise StepFailed(
            f"{step}: {to} still lacks {role}'s default privileges: "
            f"{shorten([c.describe() for c in left])}"
        )
    for line in changes:
        log.info("%s: %s", step, line)
    return changes


_DEFAULTS_FOR_QUERY = """
    SELECT pg_get_userbyid(d.defaclrole)::text, coalesce(n.nspname::text, ''),
           d.defaclobjtype::text, a.privilege_type, a.is_grantable
    FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace,
         aclexplode(d.defaclacl) a
    WHERE a.grantee = (SELECT oid FROM pg_roles WHERE rolname = %s) AND a.grantee <> d.defaclrole
"""


def default_grants_to_copy(conn: Connection, role: str, to: str) -> list[DefaultChange]:
    """Other roles' default privileges that grant `role` rights on what they create (the
    admin's `ALTER DEFAULT PRIVILEGES ... GRANT SELECT ON TABLES TO app`), which `to` lacks.
    DROP OWNED BY `role` removes `role` from them."""
    with _errors(f"default privileges granted to {role}"):
        theirs = _rows(conn, _DEFAULTS_FOR_QUERY, (role,))
        mine = _rows(conn, _DEFAULTS_FOR_QUERY, (to,))
    changes = []
    for creator, schema, objtype, priv, grantable in sorted(theirs):
        if creator == to or any(
            (c, s, t, p) == (creator, schema, objtype, priv) and (o or not grantable)
            for c, s, t, p, o in mine
        ):
            continue
        changes.append(DefaultChange(creator, (schema, objtype), True, (to, priv, grantable)))
    return changes


def copy_default_grants(conn: Connection, role: str, to: str) -> list[str]:
    """Add `to` wherever another role's default privileges grant `role` something. Only a
    member of that role may change its default privileges: the admin does not make itself one;
    it says what to run instead."""
    step = "copy_default_grants"
    changes: list[str] = []
    for change in default_grants_to_copy(conn, role, to):
        with _errors(step):
            allowed = _rows(
                conn, "SELECT pg_has_role(current_user, %s::name, 'MEMBER')", (change.role,)
            )[0][0]
        if not allowed:
            raise StepFailed(
                f"{step}: the admin is not {change.role}, so it cannot run ALTER DEFAULT "
                f"PRIVILEGES {change.describe()}; run that as {change.role}, then retry"
            )
        with _errors(f"{step}: {change.describe()}"):
            conn.execute(change.statement())
        changes.append(f"default privileges: {change.describe()} (as {role} had)")
        log.info("%s: %s", step, change.describe())
    return changes


# -- the whole carry-over ------------------------------------------------------------------


def carry_over_plan(conn: Connection, old: str, owner_role: str, heirs: Sequence[str]) -> list[str]:
    """What `carry_over` would do, for an approval text: direct grants to the owner role,
    default privileges to every heir (the owner role, and the new user once it exists)."""
    plan = [f"GRANT {r} TO {owner_role}" for r in roles_to_copy(conn, old, owner_role)]
    plan += [f"GRANT {g.describe()} TO {owner_role}" for g in grants_to_copy(conn, old, owner_role)]
    plan += [c.describe() for c in default_grants_to_copy(conn, old, owner_role)]
    for heir in heirs:
        plan += [c.describe() for c in default_privileges_to_copy(conn, old, heir)]
    return plan


def carry_over(conn: Connection, old: str, owner_role: str, heirs: Sequence[str]) -> list[str]:
    """Copy to the owner role the roles `old` is a member of and what it holds directly, and
    re-create `old`'s default privileges for every heir. Idempotent; raises when something
    could not be copied."""
    changes = copy_roles(conn, old, owner_role)
    changes += copy_grants(conn, old, owner_role)
    changes += copy_default_grants(conn, old, owner_role)
    for heir in heirs:
        changes += copy_default_privileges(conn, old, heir)
    return changes


def retire_preview(conn: Connection, old: str, owner_role: str, heirs: Sequence[str]) -> str:
    """For the retire approval: the default privileges DROP OWNED drops with the old user, and
    what is copied first so the app and other roles keep them ('' when nothing)."""
    defaults = default_privileges(conn, old)
    todo = carry_over_plan(conn, old, owner_role, heirs)
    text = ""
    if defaults:
        text += (
            f". DROP OWNED drops the default privileges defined for {old} "
            f"({shorten(defaults)}); {' and '.join(heirs)} keep them"
        )
    if todo:
        text += f". First copied: {shorten(todo, 10)}"
    if defaults or todo:
        text += "; checked again right before DROP OWNED"
    return text


def check_kept(conn: Connection, old: str, new: str, heirs: Sequence[str]) -> None:
    """Right before `DROP OWNED BY old`: every default privilege of `old` exists for each heir
    (the owner role first), the owner role is in every other role's default privileges that
    name `old`, and `new` may do everything `old` may. Raises StepFailed otherwise."""
    for heir in heirs:
        left = default_privileges_to_copy(conn, old, heir)
        if heir == heirs[0]:  # the owner role
            left += default_grants_to_copy(conn, old, heir)
        if left:
            raise StepFailed(
                f"DROP OWNED BY {old} would drop default privileges {heir} lacks: "
                f"{shorten([c.describe() for c in left])}; retry to re-create them"
            )
    check_same(rights(conn, old), rights(conn, new), new, old)
