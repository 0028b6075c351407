"""What the app's PostgreSQL user may do, and checking a new user may do exactly that.

A rotation must leave the app with the rights it had: no fewer (the app breaks) and, as far
as Rotor can tell, no more. `rights` reads a role's effective rights per object (what
`has_*_privilege` and ownership say it may do on the database, its schemas, tables, views,
sequences, functions and types), as the admin for any role. `probe` logs in as a user and
compares with what the old user could do instead of demanding INSERT/UPDATE/DELETE
everywhere: a lookup table the app may only SELECT stays read-only, and that is fine.

What carries rights a new user does not get from the owner role by itself (direct grants,
other memberships, default privileges) is `rotation.postgres_grants`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import psycopg
from psycopg import sql

from rotation.errors import DatabaseError, StepFailed
from rotation.postgres_db import (
    Connection,
    Endpoint,
    _errors,
    _reason,
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
