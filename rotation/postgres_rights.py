"""What the app's PostgreSQL user may do, and keeping exactly that across a rotation.

A rotation must leave the app with the rights it had: no fewer (the app breaks) and, as far
as Rotor can tell, no more. Three things carry rights that a new user does not get from the
owner role by itself, so this module reads and carries each of them:

- Effective rights per object (`rights`): what `has_*_privilege` and ownership say the user
  may do on the database, its schemas, tables, views, sequences, functions and types, read as
  the admin for any role. A lookup table the app may only SELECT stays read-only, and that
  is fine: the probe (`probe`) compares with what the old user could do instead of demanding
  INSERT/UPDATE/DELETE everywhere.
- Privileges granted to the old user itself (`direct_grants`), not through the owner role,
  and roles it is a member of besides the owner role (`roles_to_copy`). Both are copied to the
  owner role, so the new user (and every later one) inherits them.
- Default privileges (`ALTER DEFAULT PRIVILEGES FOR ROLE <old user>`, pg_default_acl). `DROP
  OWNED` drops them with the old user, so another role (reporting) would silently lose access
  to every table a later migration creates. They are re-created for the owner role and for
  the new user, who creates the objects of later migrations (`default_privileges`).

Everything here reads first and changes only what is missing, so a step can run it again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from rotation.errors import DatabaseError, StepFailed
from rotation.postgres_db import (
    Connection,
    Endpoint,
    _errors,
    _make_admin_act_for,
    _reason,
    _role,
    _rows,
    connect,
    validate_role_name,
)

log = logging.getLogger(__name__)

_PROBE_TIMEOUT = "5s"

# One letter per right, as in aclitem where PostgreSQL has one; the lower-case column letters
# stand for "on some columns" (a column grant without the table-wide privilege).
NAMES = {
    "r": "SELECT",
    "a": "INSERT",
    "w": "UPDATE",
    "d": "DELETE",
    "D": "TRUNCATE",
    "x": "REFERENCES",
    "t": "TRIGGER",
    "s": "SELECT on some columns",
    "i": "INSERT on some columns",
    "u": "UPDATE on some columns",
    "f": "REFERENCES on some columns",
    "X": "EXECUTE",
    "U": "USAGE",
    "C": "CREATE",
    "c": "CONNECT",
    "T": "TEMPORARY",
    "O": "owner's rights",
}

# The role's effective rights, one row per object: (object, letters). Extension members are
# kept (an app may read PostGIS's spatial_ref_sys); system schemas are not.
_RIGHTS_QUERY = """
    WITH who AS (SELECT oid AS r FROM pg_roles WHERE rolname = %(role)s)
    SELECT 'database ' || d.datname, concat(
             CASE WHEN has_database_privilege(who.r, d.oid, 'CONNECT') THEN 'c' END,
             CASE WHEN has_database_privilege(who.r, d.oid, 'CREATE') THEN 'C' END,
             CASE WHEN has_database_privilege(who.r, d.oid, 'TEMPORARY') THEN 'T' END,
             CASE WHEN pg_has_role(who.r, d.datdba, 'USAGE') THEN 'O' END)
    FROM pg_database d, who WHERE d.datname = current_database()
  UNION ALL
    SELECT 'schema ' || n.nspname, concat(
             CASE WHEN has_schema_privilege(who.r, n.oid, 'USAGE') THEN 'U' END,
             CASE WHEN has_schema_privilege(who.r, n.oid, 'CREATE') THEN 'C' END,
             CASE WHEN pg_has_role(who.r, n.nspowner, 'USAGE') THEN 'O' END)
    FROM pg_namespace n, who WHERE n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
  UNION ALL
    SELECT CASE c.relkind WHEN 'v' THEN 'view ' WHEN 'm' THEN 'materialized view '
                          WHEN 'f' THEN 'foreign table ' ELSE 'table ' END
           || n.nspname || '.' || c.relname, concat(
             CASE WHEN has_table_privilege(who.r, c.oid, 'SELECT') THEN 'r'
                  WHEN has_any_column_privilege(who.r, c.oid, 'SELECT') THEN 's' END,
             CASE WHEN has_table_privilege(who.r, c.oid, 'INSERT') THEN 'a'
                  WHEN has_any_column_privilege(who.r, c.oid, 'INSERT') THEN 'i' END,
             CASE WHEN has_table_privilege(who.r, c.oid, 'UPDATE') THEN 'w'
                  WHEN has_any_column_privilege(who.r, c.oid, 'UPDATE') THEN 'u' END,
             CASE WHEN has_table_privilege(who.r, c.oid, 'DELETE') THEN 'd' END,
             CASE WHEN has_table_privilege(who.r, c.oid, 'TRUNCATE') THEN 'D' END,
             CASE WHEN has_table_privilege(who.r, c.oid, 'REFERENCES') THEN 'x'
                  WHEN has_any_column_privilege(who.r, c.oid, 'REFERENCES') THEN 'f' END,
             CASE WHEN has_table_privilege(who.r, c.oid, 'TRIGGER') THEN 't' END,
             CASE WHEN pg_has_role(who.r, c.relowner, 'USAGE') THEN 'O' END)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, who
    WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
  UNION ALL
    SELECT 'sequence ' || n.nspname || '.' || c.relname, concat(
             CASE WHEN has_sequence_privilege(who.r, c.oid, 'USAGE') THEN 'U' END,
             CASE WHEN has_sequence_privilege(who.r, c.oid, 'SELECT') THEN 'r' END,
             CASE WHEN has_sequence_privilege(who.r, c.oid, 'UPDATE') THEN 'w' END,
             CASE WHEN pg_has_role(who.r, c.relowner, 'USAGE') THEN 'O' END)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, who
    WHERE c.relkind = 'S' AND n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
  UNION ALL
    SELECT CASE p.prokind WHEN 'p' THEN 'procedure ' ELSE 'function ' END || n.nspname || '.'
           || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')', concat(
             CASE WHEN has_function_privilege(who.r, p.oid, 'EXECUTE') THEN 'X' END,
             CASE WHEN pg_has_role(who.r, p.proowner, 'USAGE') THEN 'O' END)
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace, who
    WHERE n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
  UNION ALL
    SELECT 'type ' || n.nspname || '.' || t.typname, concat(
             CASE WHEN has_type_privilege(who.r, t.oid, 'USAGE') THEN 'U' END,
             CASE WHEN pg_has_role(who.r, t.typowner, 'USAGE') THEN 'O' END)
    FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace, who
    WHERE n.nspname !~ '^pg_' AND n.nspname <> 'information_schema' AND t.typtype <> 'm'
      AND (t.typrelid = 0 OR (SELECT c.relkind FROM pg_class c WHERE c.oid = t.typrelid) = 'c')
      AND NOT EXISTS (SELECT 1 FROM pg_type a WHERE a.typarray = t.oid)
"""


def rights(conn: Connection, role: str) -> dict[str, str]:
    """Object -> the letters of what `role` may do on it (see NAMES), in this database."""
    with _errors(f"rights of {role}"):
        rows = _rows(conn, _RIGHTS_QUERY, {"role": validate_role_name(role)})
    return {str(obj): str(letters) for obj, letters in rows}


def _spell(letters: Iterable[str]) -> str:
    return ", ".join(NAMES[letter] for letter in sorted(letters, key=list(NAMES).index))


def compare(before: Mapping[str, str], after: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(what `after` lacks, what it has in addition), over the objects both know about.

    Objects made or dropped in between are left out: the comparison is of the same objects.
    """
    fewer, more = [], []
    for obj in sorted(before.keys() & after.keys()):
        lacking, extra = set(before[obj]) - set(after[obj]), set(after[obj]) - set(before[obj])
        if lacking:
            fewer.append(f"{obj} (no {_spell(lacking)})")
        if extra:
            more.append(f"{obj} (also {_spell(extra)})")
    return fewer, more


def shorten(items: Sequence[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_same(before: Mapping[str, str], after: Mapping[str, str], who: str, than: str) -> str:
    """Raise when `who` may do less than `than` could; say so when it may do more."""
    fewer, more = compare(before, after)
    if fewer:
        raise StepFailed(
            f"{who} has fewer rights than {than} had on {len(fewer)} of "
            f"{len(before.keys() & after.keys())} objects: {shorten(fewer)}"
        )
    same = f"same rights as {than} on {len(before.keys() & after.keys())} objects"
    if more:
        same += f"; more on {len(more)}: {shorten(more)}"
    return same


# -- the probe: log in and use the rights ---------------------------------------------------

_TABLES_QUERY = """
    SELECT n.nspname, c.relname,
           array(SELECT a.attname::text FROM pg_attribute a
                 WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                   AND a.attgenerated = '' ORDER BY a.attnum),
           (SELECT a.attname::text FROM pg_attribute a
            WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
              AND a.attgenerated = '' AND a.attidentity = '' ORDER BY a.attnum LIMIT 1)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p') AND n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
    ORDER BY 1, 2
"""


def probe(ep: Endpoint, expected: Mapping[str, str], than: str) -> str:
    """Runbook "test the new credentials": log in as ep.user, check it may do everything
    `than` could (`expected`, from `rights`), and use those rights on every table without
    changing data: zero-row writes in a transaction that is rolled back, and only the writes
    the user is meant to have (a read-only table stays read-only, which is not a failure).

    Statement-level triggers still fire for zero-row writes; their effects roll back too.
    """
    step = "probe"
    with connect(ep) as conn:
        mine = rights(conn, ep.user)
        try:
            same = check_same(expected, mine, ep.user, than)
        except StepFailed as exc:
            raise StepFailed(f"{step} as {ep.describe()}: {exc}") from None
        with _errors(f"{step} as {ep.describe()}"):
            tables = _rows(conn, _TABLES_QUERY)
        written = read = 0
        with conn.transaction(force_rollback=True):
            conn.execute(
                sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(_PROBE_TIMEOUT))
            )
            for schema, table, cols, update_col in tables:
                letters = mine.get(f"table {schema}.{table}", "")
                statements = _probe_statements(
                    sql.Identifier(schema, table), letters, cols, update_col
                )
                try:
                    for statement in statements:
                        conn.execute(statement)
                except psycopg.Error as exc:
                    raise DatabaseError(
                        f"{step}: {ep.user} failed on table {schema}.{table}: {_reason(exc)}"
                    ) from exc
                if "a" in letters or "w" in letters or "d" in letters:
                    written += 1
                elif "r" in letters:
                    read += 1
    summary = f"read/write OK on {written} tables"
    if read:
        summary += f", read-only on {read}"
    summary += f"; {same}"
    log.info("%s: %s as %s", step, summary, ep.describe())
    return summary


def _probe_statements(
    table: sql.Identifier, letters: str, cols: list[str], update_col: str | None
) -> list[sql.Composed]:
    """The zero-row statements `letters` allow: UPDATE and INSERT ... SELECT read columns, so
    they need SELECT as well."""
    statements = []
    if "r" in letters:
        statements.append(sql.SQL("SELECT 1 FROM {} LIMIT 1").format(table))
    if "r" in letters and "w" in letters and update_col:
        col = sql.Identifier(update_col)
        statements.append(sql.SQL("UPDATE {} SET {} = {} WHERE false").format(table, col, col))
    if "r" in letters and "a" in letters and cols:
        names = sql.SQL(", ").join(map(sql.Identifier, cols))
        statements.append(
            sql.SQL(
                "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {} WHERE false"
            ).format(table, names, names, table)
        )
    if "d" in letters:
        statements.append(sql.SQL("DELETE FROM {} WHERE false").format(table))
    return statements


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
_ACLDEFAULT_CODE = {"r": "r", "S": "s", "f": "f", "T": "T", "n": "n"}
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
    for key, entries in sorted(theirs.items()):
        schema, objtype = key
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


# -- the whole carry-over ------------------------------------------------------------------


def carry_over_plan(conn: Connection, old: str, owner_role: str, heirs: Sequence[str]) -> list[str]:
    """What `carry_over` would do, for an approval text: direct grants to the owner role,
    default privileges to every heir (the owner role, and the new user once it exists)."""
    plan = [f"GRANT {r} TO {owner_role}" for r in roles_to_copy(conn, old, owner_role)]
    plan += [f"GRANT {g.describe()} TO {owner_role}" for g in grants_to_copy(conn, old, owner_role)]
    for heir in heirs:
        plan += [c.describe() for c in default_privileges_to_copy(conn, old, heir)]
    return plan


def carry_over(conn: Connection, old: str, owner_role: str, heirs: Sequence[str]) -> list[str]:
    """Copy to the owner role the roles `old` is a member of and what it holds directly, and
    re-create `old`'s default privileges for every heir. Idempotent; raises when something
    could not be copied."""
    changes = copy_roles(conn, old, owner_role)
    changes += copy_grants(conn, old, owner_role)
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
    """Right before `DROP OWNED BY old`: every default privilege of `old` exists for each heir,
    and `new` may do everything `old` may. Raises StepFailed otherwise."""
    for heir in heirs:
        left = default_privileges_to_copy(conn, old, heir)
        if left:
            raise StepFailed(
                f"DROP OWNED BY {old} would drop default privileges {heir} lacks: "
                f"{shorten([c.describe() for c in left])}; retry to re-create them"
            )
    check_same(rights(conn, old), rights(conn, new), new, old)
