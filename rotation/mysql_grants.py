"""MySQL / MariaDB names and grant text: validation, quoting, and `SHOW GRANTS` parsing.

Pure: no connection. `normalize_grants` turns the lines either server prints into one
canonical form, so two accounts' grants compare equal but for the grantee.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NoReturn

from rotation.errors import DatabaseError, InvalidIdentifier

GRANTEE = "<grantee>"
"""Stands for the account in normalized grants, so two users' grants compare equal but for it."""

_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_HOST = re.compile(r"[A-Za-z0-9_.%:/\-]+")
_SCHEMA = re.compile(r"[A-Za-z0-9_$\-]{1,64}")


# --- names ------------------------------------------------------------------------------------


def validate_account_name(name: str) -> str:
    """Return `name` if it is safe as a MySQL user name: letters, digits, _ - . only."""
    if not isinstance(name, str) or not _ACCOUNT_NAME.fullmatch(name):
        raise InvalidIdentifier(f"user name {name!r} may only contain letters, digits, _ - .")
    return name


def validate_host(host: str) -> str:
    """Return `host` if it is a plausible account host (`%`, `10.0.%`, `localhost`, `::1`)."""
    if not isinstance(host, str) or len(host) > 255 or not _HOST.fullmatch(host):
        raise InvalidIdentifier(
            f"account host {host!r} may only contain letters, digits, and _ . % : / -"
        )
    return host


def quote_identifier(name: str, *, server_emitted: bool = False) -> str:
    """Backtick-quote a schema, table or column name, doubling any backtick inside it.

    Names that come from people (rotor.yml, Slack) must be plain: letters, digits, _ $ -.
    Names the server printed itself (SHOW GRANTS, information_schema) are only re-quoted.
    """
    if server_emitted:
        if not name or "\x00" in name:
            raise InvalidIdentifier(f"identifier {name!r} is empty or contains NUL")
    elif not isinstance(name, str) or not _SCHEMA.fullmatch(name):
        raise InvalidIdentifier(
            f"identifier {name!r} may only contain letters, digits, _ $ - (at most 64)"
        )
    return "`" + name.replace("`", "``") + "`"


def quote_server_name(name: str) -> str:
    return quote_identifier(name, server_emitted=True)


def render_account(user: str, host: str | None) -> str:
    """`user`@`host` the way MySQL 8 prints it; a MariaDB role has no host part."""
    rendered = quote_server_name(user) if user else "''"
    if host is None:
        return rendered
    return rendered + "@" + (quote_server_name(host) if host else "''")


# --- grants -----------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<bq>`(?:[^`]|``)*`)
      | (?P<sq>'(?:[^'\\]|\\.|'')*')
      | (?P<dq>"(?:[^"\\]|\\.|"")*")
      | (?P<word>[A-Za-z0-9_$]+)
      | (?P<other>.)""",
    re.X | re.S,
)


@dataclass(frozen=True)
class _Token:
    kind: str  # bq, sq, dq, word, other
    text: str
    start: int
    end: int

    @property
    def value(self) -> str:
        """The name a quoted token stands for."""
        if self.kind == "bq":
            return self.text[1:-1].replace("``", "`")
        if self.kind in ("sq", "dq"):
            quote = self.text[0]
            inner = self.text[1:-1].replace(quote * 2, quote)
            return re.sub(r"\\(.)", r"\1", inner)
        return self.text

    def is_word(self, *words: str) -> bool:
        return self.kind == "word" and (not words or self.text.upper() in words)


def _tokenize(line: str) -> list[_Token]:
    return [
        _Token(m.lastgroup or "other", m.group(), m.start(), m.end())
        for m in _TOKEN.finditer(line)
        if m.lastgroup != "space"
    ]


def mask_identified(line: str) -> str:
    """Hide the quoted password hash in MariaDB's `IDENTIFIED BY PASSWORD '*...'` and kin."""
    out, last, inside, previous = [], 0, False, None
    for token in _tokenize(line):
        if token.is_word("IDENTIFIED"):
            inside = True
        elif token.is_word("REQUIRE") or (
            token.is_word("WITH") and not (previous and previous.is_word("IDENTIFIED"))
        ):
            inside = False  # MySQL's "IDENTIFIED WITH plugin" does not end the clause
        elif inside and token.kind in ("sq", "dq"):
            out.append(line[last : token.start] + "'[redacted]'")
            last = token.end
        previous = token
    return "".join(out) + line[last:]


@dataclass(frozen=True)
class Grant:
    """One grant in canonical form: `head` + grantee + `tail`."""

    kind: Literal["privilege", "revoke", "role", "default_role"]
    head: str  # up to the grantee, e.g. "GRANT SELECT ON `db`.* TO "
    tail: str = ""  # after it, e.g. " WITH GRANT OPTION"
    role: tuple[str, str | None] | None = None  # (name, host) of a granted role

    @property
    def canonical(self) -> str:
        return f"{self.head}{GRANTEE}{self.tail}"

    def statement(self) -> str:
        """The grant as a statement taking the grantee as two `%s` parameters."""
        return self.head.replace("%", "%%") + "%s@%s" + self.tail.replace("%", "%%")

    def describe(self, user: str, host: str) -> str:
        return f"{self.head}{render_account(user, host)}{self.tail}"


class _GrantParser:
    """Reads one line of SHOW GRANTS (MySQL 5.x/8, MariaDB 10.x) into canonical grants."""

    def __init__(self, line: str, user: str, host: str) -> None:
        self.line, self.user, self.host = line, user, host
        self.tokens = _tokenize(line)
        self.pos = 0

    def error(self, why: str) -> NoReturn:
        raise DatabaseError(f"cannot read SHOW GRANTS line {mask_identified(self.line)!r}: {why}")

    def peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> _Token:
        token = self.peek()
        if token is None:
            self.error("it ends too early")
        self.pos += 1
        return token

    def at(self, text: str) -> bool:
        token = self.peek()
        return token is not None and token.kind == "other" and token.text == text

    def at_word(self, *words: str) -> bool:
        token = self.peek()
        return token is not None and token.is_word(*words)

    def expect_word(self, *words: str) -> str:
        token = self.take()
        if not token.is_word(*words):
            self.error(f"expected {' or '.join(words)}, found {token.text!r}")
        return token.text.upper()

    def name(self) -> str:
        token = self.take()
        if token.kind not in ("bq", "sq", "dq", "word"):
            self.error(f"expected a name, found {token.text!r}")
        return token.value

    def account(self) -> tuple[str, str | None]:
        user = self.name()
        if self.at("@"):
            self.take()
            return user, self.name()
        return user, None

    def accounts(self) -> list[tuple[str, str | None]]:
        found = [self.account()]
        while self.at(","):
            self.take()
            found.append(self.account())
        return found

    def grantee(self) -> None:
        user, host = self.account()
        if user != self.user or host is None or host.lower() != self.host.lower():
            self.error(f"it is for {user}@{host}, not {self.user}@{self.host}")
        if self.at(","):
            self.error("it names more than one grantee")

    def has_top_level_on(self) -> bool:
        depth = 0
        for token in self.tokens[self.pos :]:
            if token.kind == "other" and token.text in "()":
                depth += 1 if token.text == "(" else -1
            elif depth == 0 and token.is_word("TO"):
                return False
            elif depth == 0 and token.is_word("ON"):
                return True
        return False

    def privileges(self) -> str:
        items: set[tuple[str, tuple[str, ...]]] = set()
        while True:
            words = []
            while self.at_word() and not self.at_word("ON"):
                words.append(self.take().text.upper())
            if not words:
                self.error("expected a privilege")
            columns: tuple[str, ...] = ()
            if self.at("("):
                self.take()
                names = [self.name()]
                while self.at(","):
                    self.take()
                    names.append(self.name())
                if not self.at(")"):
                    self.error("a column list is not closed")
                self.take()
                columns = tuple(sorted(set(names)))
            name = " ".join(words)
            items.add(("ALL PRIVILEGES" if name == "ALL" else name, columns))
            if not self.at(","):
                break
            self.take()
        self.expect_word("ON")
        return ", ".join(
            name + (f" ({', '.join(quote_server_name(c) for c in cols)})" if cols else "")
            for name, cols in sorted(items)
        )

    def level(self, privileges: str) -> str:
        if privileges == "PROXY":
            return render_account(*self.account())
        prefix = ""
        if self.at_word("FUNCTION", "PROCEDURE", "PACKAGE", "TABLE"):
            kind = self.take().text.upper()
            if kind == "PACKAGE" and self.at_word("BODY"):
                kind += " " + self.take().text.upper()
            prefix = "" if kind == "TABLE" else kind + " "
        parts = []
        while True:
            if self.at("*"):
                self.take()
                parts.append("*")
            else:
                parts.append(quote_server_name(self.name()))
            if not self.at("."):
                break
            self.take()
        if len(parts) > 2:
            self.error("the privilege level has too many parts")
        return prefix + ".".join(parts)

    def options(self) -> tuple[bool, bool]:
        """Skip the account's own clauses; return (WITH GRANT OPTION, WITH ADMIN OPTION)."""
        grant_option = admin_option = False
        while self.peek() is not None:
            keyword = self.expect_word("IDENTIFIED", "REQUIRE", "WITH")
            if keyword == "IDENTIFIED":
                if self.at_word("WITH"):  # MySQL: IDENTIFIED WITH plugin [AS 'hash']
                    self.take()
                while self.peek() is not None and not self.at_word("REQUIRE", "WITH"):
                    self.take()
            elif keyword == "REQUIRE":
                while self.peek() is not None and not self.at_word("WITH"):
                    self.take()
            else:
                while self.peek() is not None:
                    option = self.expect_word()
                    if option in ("GRANT", "ADMIN"):
                        self.expect_word("OPTION")
                        grant_option |= option == "GRANT"
                        admin_option |= option == "ADMIN"
                    elif option.startswith("MAX_"):  # resource limits belong to the account
                        while self.peek_is_number() or self.at("."):
                            self.take()
                    else:
                        self.error(f"unknown option {option}")
        return grant_option, admin_option

    def peek_is_number(self) -> bool:
        token = self.peek()
        return token is not None and token.text.isdigit()

    def parse(self) -> list[Grant]:
        first = self.expect_word("GRANT", "REVOKE", "SET")
        if first == "SET":
            self.expect_word("DEFAULT")
            self.expect_word("ROLE")
            defaults = sorted(render_account(*r) for r in self.accounts())
            to = self.expect_word("FOR", "TO")
            self.grantee()
            if self.peek() is not None:
                self.error("unexpected text after the grantee")
            return [Grant("default_role", f"SET DEFAULT ROLE {', '.join(defaults)} {to} ")]
        if first == "REVOKE":
            privileges = self.privileges()
            level = self.level(privileges)
            self.expect_word("FROM")
            self.grantee()
            if self.peek() is not None:
                self.error("unexpected text after the grantee")
            return [Grant("revoke", f"REVOKE {privileges} ON {level} FROM ")]
        if not self.has_top_level_on():
            roles = self.accounts()
            self.expect_word("TO")
            self.grantee()
            _, admin_option = self.options()
            tail = " WITH ADMIN OPTION" if admin_option else ""
            return [
                Grant("role", f"GRANT {render_account(*role)} TO ", tail, role) for role in roles
            ]
        privileges = self.privileges()
        level = self.level(privileges)
        self.expect_word("TO")
        self.grantee()
        grant_option, _ = self.options()
        return [
            Grant(
                "privilege",
                f"GRANT {privileges} ON {level} TO ",
                " WITH GRANT OPTION" if grant_option else "",
            )
        ]


def parse_grants(lines: Sequence[str], user: str, host: str) -> list[Grant]:
    seen: dict[str, Grant] = {}
    for line in lines:
        for grant in _GrantParser(line, user, host).parse():
            seen.setdefault(grant.canonical, grant)
    return list(seen.values())


def normalize_grants(lines: Sequence[str], user: str, host: str) -> frozenset[str]:
    """SHOW GRANTS output in a canonical form, with the grantee replaced by `GRANTEE`.

    Two users' sets are equal exactly when they hold the same grants. Privilege and column
    lists are sorted, names re-quoted with backticks, and what belongs to the account rather
    than its grants (IDENTIFIED ..., REQUIRE ..., WITH MAX_...) is dropped; WITH GRANT OPTION
    and WITH ADMIN OPTION stay.
    """
    return frozenset(grant.canonical for grant in parse_grants(lines, user, host))
