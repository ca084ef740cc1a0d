"""A stand-in for Aurora DSQL, for tests: Aurora DSQL's front door and its SQL surface.

`DsqlGateway` is the IAM gateway in DSQL mode (TLS, tokens checked as DbConnectAdmin for
`admin` and DbConnect for any other role) that also reads every message a client sends,
in the simple protocol (Query) and the extended one (Parse, with statement names tracked;
Bind of a named statement to a portal; Execute of that portal), and does what DSQL does:

- refuses with SQLSTATE 0A000 what DSQL lacks (`classify`): SAVEPOINT, advisory locks,
  LISTEN/UNLISTEN/NOTIFY, sequences and SERIAL/identity columns, triggers, foreign keys,
  temporary tables, TRUNCATE, VACUUM, ALTER SYSTEM, extensions, DO blocks and functions in
  languages other than SQL, LOCK, materialized views, types, tablespaces, databases,
  partitioned/inherited tables, plain `CREATE INDEX` (and ASC/DESC in `CREATE INDEX
  ASYNC`), the `regnamespace` cast; a second DDL in a transaction, and DDL mixed with DML;
- runs `CREATE INDEX ASYNC` as PostgreSQL's `CREATE INDEX`, answering with a `job_id` row
  as DSQL does;
- refuses schema `public` to every role but `admin` (42501): the schema a statement lands
  in is read from the connection's `search_path` (startup parameter or `SET`);
- injects optimistic-concurrency failures on writes at `conflict_rate`: SQLSTATE 40001 with
  DSQL's "(OC000)" message, and every `xx000_every`-th one the same text under XX000 (as
  AWS's Java connector has seen it); OC001 on a DDL that races another session's DDL, or at
  `schema_conflict_rate`;
- caps a connection's age (`max_connection_age`: DSQL closes connections after an hour)
  and the rate of new connections (`connection_rate` per second, 53400 beyond).

How a refusal or an injected failure reaches the client: the statement never runs. The
unit of client messages that carries it (everything up to Sync, or one Query) is replaced
by one simple Query that makes PostgreSQL itself raise the error (a `DO` block), so the
answer arrives in order with every other answer, and the server's transaction state
matches what DSQL's would be (a transaction with an error in it stays failed). asyncpg
prepares with Parse/Describe/Flush (no Sync): then the error is raised the same way, the
ReadyForQuery that PostgreSQL adds is held back, and messages are dropped until the
client's Sync, which PostgreSQL answers.

`refusals` and `injections` record every one (never a token); a test that runs the service
through this stand-in asserts `refusals == []`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import struct
import time
from collections import deque
from dataclasses import dataclass, field

from standins.aurora_gateway import AuroraGateway, _error_response, _Session

__all__ = ["DsqlGateway", "Refusal", "Injection", "classify", "OC000", "OC001"]

OC000 = "change conflicts with another transaction, please retry: (OC000)"
OC001 = "schema has been updated by another transaction, please retry: (OC001)"
UNSUPPORTED = "0A000"
NO_PUBLIC = "42501"
RATE_LIMITED = "53400"

MAX_MESSAGE = 1 << 26


@dataclass(frozen=True)
class Refusal:
    user: str
    sqlstate: str
    reason: str
    statement: str  # the first 200 characters


@dataclass(frozen=True)
class Injection:
    user: str
    sqlstate: str
    code: str  # "OC000" or "OC001"
    statement: str


# --------------------------------------------------------------------------
# Reading SQL: just enough to judge a statement as DSQL would
# --------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<comment>--[^\n]*|/\*.*?\*/)
  | (?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z0-9_]*)?\$.*?\$(?P=tag)?\$)
  | (?P<string>[EeBbXxUu]?'(?:[^']|'')*')
  | (?P<quoted>"(?:[^"]|"")*")
  | (?P<param>\$\d+)
  | (?P<word>[A-Za-z_][A-Za-z0-9_$]*)
  | (?P<number>\d+(?:\.\d*)?)
  | (?P<cast>::)
  | (?P<semicolon>;)
  | (?P<other>.)
""",
    re.S | re.X,
)

DDL = {"CREATE", "ALTER", "DROP", "GRANT", "REVOKE", "COMMENT"}
DML = {"INSERT", "UPDATE", "DELETE", "MERGE", "COPY"}
READ = {"SELECT", "WITH", "VALUES", "TABLE", "SHOW", "EXPLAIN"}
BEGIN = {"BEGIN", "START"}
END = {"COMMIT", "END", "ROLLBACK", "ABORT"}
REFUSED_WORDS = {
    "SAVEPOINT": "SAVEPOINT is not supported",
    "RELEASE": "SAVEPOINT is not supported",
    "LISTEN": "LISTEN is not supported",
    "UNLISTEN": "UNLISTEN is not supported",
    "NOTIFY": "NOTIFY is not supported",
    "TRUNCATE": "TRUNCATE is not supported",
    "DO": "DO blocks (PL/pgSQL) are not supported",
    "LOCK": "LOCK is not supported",
    "VACUUM": "VACUUM is not supported",
}
# CREATE <object> DSQL does not have (AWS: "Unsupported PostgreSQL features in Aurora DSQL").
REFUSED_OBJECTS = {
    "SEQUENCE": "sequences are not supported",
    "EXTENSION": "extensions are not supported",
    "MATERIALIZED": "materialized views are not supported",
    "TABLESPACE": "tablespaces are not supported",
    "TYPE": "CREATE TYPE is not supported",
    "DATABASE": "CREATE DATABASE is not supported",
}
REFUSED_FUNCTION = re.compile(
    r"^(pg_(try_)?advisory_\w+|pg_advisory_unlock_all|nextval|currval|setval|lastval|pg_notify)$", re.I
)
SERIAL_TYPES = {"SERIAL", "SERIAL2", "SERIAL4", "SERIAL8", "SMALLSERIAL", "BIGSERIAL"}


@dataclass
class Statement:
    """One SQL statement, as this stand-in judged it."""

    text: str
    kind: str  # "read", "dml", "ddl", "begin", "end", "set", "other"
    refusal: tuple[str, str] | None = None  # (sqlstate, message)
    index_async: bool = False  # CREATE INDEX ASYNC: rewritten, answered with a job id
    search_path: str | None = None  # SET search_path: the new value


def _tokens(sql: str) -> list[tuple[str, str]]:
    """(kind, text) pairs; words upper-cased, quoted identifiers unquoted; no blanks or comments."""
    out = []
    for match in _TOKEN.finditer(sql):
        group = match.lastgroup
        assert group is not None  # every alternative of _TOKEN is a named group
        kind = group if group != "tag" else "dollar"
        if kind in ("space", "comment"):
            continue
        text = match.group(kind)
        if kind == "word":
            text = text.upper()
        elif kind == "quoted":
            kind, text = "ident", text[1:-1].replace('""', '"')
        out.append((kind, text))
    return out


def split_statements(sql: str) -> list[str]:
    """The statements of a simple Query, split at top-level semicolons."""
    parts, start = [], 0
    for match in _TOKEN.finditer(sql):
        if match.lastgroup == "semicolon":
            parts.append(sql[start : match.start()])
            start = match.end()
    parts.append(sql[start:])
    return [p for p in parts if _tokens(p)]


def _schema_of_search_path(search_path: str | None) -> str:
    """The schema unqualified names resolve to. `"$user"` is skipped: DSQL's roles have
    no schema of their own unless one was made, and a stand-in must not be kinder."""
    for item in (search_path or "public").split(","):
        name = item.strip().strip('"')
        if name and name != "$user":
            return name.lower() if not item.strip().startswith('"') else name
    return "public"


def classify(sql: str, *, user: str, search_path: str | None) -> Statement:
    """Judge one statement as Aurora DSQL would."""
    tokens = _tokens(sql)
    words = [text for kind, text in tokens if kind == "word"]
    first = words[0] if words else ""
    statement = Statement(sql, "other")

    def refuse(message: str, sqlstate: str = UNSUPPORTED) -> Statement:
        statement.refusal = (sqlstate, message)
        return statement

    if first in DDL:
        statement.kind = "ddl"
    elif first in DML:
        statement.kind = "dml"
    elif first in READ:
        statement.kind = "read"
    elif first in BEGIN:
        statement.kind = "begin"
    elif first in END:
        statement.kind = "end"
        if first == "ROLLBACK" and "TO" in words[:3]:
            return refuse("SAVEPOINT is not supported")
    elif first in ("SET", "RESET"):
        statement.kind = "set"
        if "SEARCH_PATH" in words[1:3] and first == "SET":
            at = [text for _, text in tokens].index("SEARCH_PATH")
            value = [
                text.lower() if kind == "word" else text.strip("'") if kind == "string" else text
                for kind, text in tokens[at + 1 :]
                if text not in ("TO", "=", ",")
            ]
            statement.search_path = ", ".join(value)
        elif "SEARCH_PATH" in words[1:2] and first == "RESET":
            statement.search_path = "public"

    if first in REFUSED_WORDS:
        return refuse(REFUSED_WORDS[first])
    for i, (kind, text) in enumerate(tokens):
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "word" and following == "(" and REFUSED_FUNCTION.match(text):
            return refuse(f"function {text.lower()} is not supported")
        if kind == "cast" and following.upper() == "REGNAMESPACE":
            return refuse("type regnamespace is not supported")
        if kind == "word" and text == "AS" and following.upper() == "REGNAMESPACE":
            return refuse("type regnamespace is not supported")
    if first == "SELECT" and "INTO" in words and {"TEMP", "TEMPORARY"} & set(words):
        return refuse("temporary tables are not supported")

    if first in ("CREATE", "ALTER"):
        head = [w for w in words[1:4] if w not in ("OR", "REPLACE", "GLOBAL", "LOCAL")]
        if head[:1] and head[0] in ("TEMP", "TEMPORARY"):
            return refuse("temporary tables are not supported")
        if first == "ALTER" and head[:1] == ["SYSTEM"]:
            return refuse("ALTER SYSTEM is not supported")
        if first == "CREATE" and head[:1] and head[0] in REFUSED_OBJECTS:
            return refuse(REFUSED_OBJECTS[head[0]])
        if "SEQUENCE" in head[:1]:
            return refuse("sequences are not supported")
        if "TRIGGER" in words[1:4]:
            return refuse("triggers are not supported")
        if head[:1] == ["FUNCTION"] and "LANGUAGE" in words:
            language = words[words.index("LANGUAGE") + 1 : words.index("LANGUAGE") + 2]
            if language != ["SQL"] and [t for k, t in tokens if k == "string"][-1:] != ["'sql'"]:
                return refuse("functions in languages other than SQL are not supported")
        if head[:1] == ["TABLE"] and (
            {"INHERITS", "PARTITION", "EXCLUDE"} & set(words) or "AS" in words[3:6]
        ):
            return refuse("CREATE TABLE with INHERITS, PARTITION BY, EXCLUDE or AS is not supported")
        if set(words) & SERIAL_TYPES:
            return refuse("SERIAL (sequences) is not supported")
        if "IDENTITY" in words and "GENERATED" in words:
            return refuse("identity columns (sequences) are not supported")
        if "REFERENCES" in words or ("FOREIGN" in words and "KEY" in words):
            return refuse("foreign keys are not supported")
        if "INDEX" in words[1:3]:
            at = words.index("INDEX")
            if words[at + 1 : at + 2] != ["ASYNC"]:
                return refuse("CREATE INDEX is not supported; use CREATE INDEX ASYNC")
            columns = sql[sql.index("(") + 1 :] if "(" in sql else ""
            if {"ASC", "DESC"} & {text for kind, text in _tokens(columns) if kind == "word"}:
                return refuse("ASC and DESC are not supported in CREATE INDEX ASYNC")
            statement.index_async = True

    if user != "admin" and _touches_public(tokens, first, search_path):
        return refuse("permission denied for schema public", NO_PUBLIC)
    return statement


def _touches_public(tokens: list[tuple[str, str]], first: str, search_path: str | None) -> bool:
    """Does the statement name a relation in schema public (explicitly or by search_path)?"""
    default = _schema_of_search_path(search_path)
    texts = [text for _, text in tokens]
    if first in ("INSERT", "UPDATE", "DELETE", "MERGE", "COPY"):
        keyword = {"INSERT": "INTO", "MERGE": "INTO", "DELETE": "FROM"}.get(first)
        at = texts.index(keyword) + 1 if keyword in texts else 1
        return _schema_at(tokens, at, default) == "public"
    if first == "CREATE" and ("TABLE" in texts[1:3] or "INDEX" in texts[1:4]):
        at = texts.index("ON") + 1 if "INDEX" in texts[1:4] and "ON" in texts else texts.index("TABLE") + 1
        while at < len(texts) and texts[at] in ("IF", "NOT", "EXISTS", "ONLY"):
            at += 1
        return _schema_at(tokens, at, default) == "public"
    if first in READ:
        for i, text in enumerate(texts):
            if text in ("FROM", "JOIN") and i + 1 < len(tokens) and tokens[i + 1][0] in ("word", "ident"):
                name = tokens[i + 1][1].lower()
                qualified = i + 2 < len(texts) and texts[i + 2] == "."
                if not qualified and (name.startswith("pg_") or name == "information_schema"):
                    continue
                if qualified and name in ("pg_catalog", "information_schema"):
                    continue
                if _schema_at(tokens, i + 1, default) == "public":
                    return True
    return False


def _schema_at(tokens: list[tuple[str, str]], at: int, default: str) -> str:
    if at + 2 < len(tokens) and tokens[at + 1][1] == "." and tokens[at][0] in ("word", "ident"):
        return tokens[at][1].lower() if tokens[at][0] == "word" else tokens[at][1]
    return default


# --------------------------------------------------------------------------
# The wire: messages, and what the stand-in sends instead
# --------------------------------------------------------------------------


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def _cstring(data: bytes, at: int) -> tuple[str, int]:
    end = data.index(b"\0", at)
    return data[at:end].decode(), end + 1


def _raise_query(sqlstate: str, message: str) -> bytes:
    """A simple Query that makes PostgreSQL raise `message` under `sqlstate`, and nothing else."""
    quoted = message.replace("'", "''")
    sql = (
        f"DO $dsql_stand_in$ BEGIN RAISE EXCEPTION USING ERRCODE = '{sqlstate}', "
        f"MESSAGE = '{quoted}'; END $dsql_stand_in$"
    )
    return _message(b"Q", sql.encode() + b"\0")


def _job_id_rows() -> tuple[bytes, bytes]:
    """RowDescription and DataRow of DSQL's answer to CREATE INDEX ASYNC."""
    column = b"job_id\0" + struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0)  # text
    description = _message(b"T", struct.pack("!h", 1) + column)
    job = "".join(random.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(26)).encode()
    return description, _message(b"D", struct.pack("!hi", 1, len(job)) + job)


@dataclass(eq=False)
class _Segment:
    """What the server will answer for one client unit, up to its ReadyForQuery."""

    index_async: str | None = None  # "simple" or "extended": answer with a job id
    drop_ready: int = 0  # ReadyForQuery messages to hold back (a refused Flush unit)


@dataclass(eq=False)
class _Conversation:
    """Per-connection protocol state, on top of the base gateway's _Session."""

    user: str
    search_path: str | None
    statements: dict[str, Statement] = field(default_factory=dict)
    portals: dict[str, Statement | None] = field(default_factory=dict)
    in_block: bool = False  # inside BEGIN … COMMIT
    kinds: set[str] = field(default_factory=set)  # "ddl"/"dml" so far in this transaction
    skip_to_sync: bool = False
    holds_ddl: bool = False  # a DDL ran in the open transaction: others' DDL conflicts (OC001)
    segments: deque[_Segment] = field(default_factory=deque)
    open_segment: _Segment | None = None
    busy: bool = False


class DsqlGateway(AuroraGateway):
    """Aurora DSQL in front of a real PostgreSQL; see the module docstring.

    `admin` is served by `admin_upstream_user` (a superuser upstream); every other role
    connects upstream as itself, so PostgreSQL enforces its grants too.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        max_token_age: float = 3600.0,
        admin_upstream_user: str = "postgres",
        conflict_rate: float = 0.0,
        xx000_every: int = 2,
        schema_conflict_rate: float = 0.0,
        max_connection_age: float = 3600.0,
        connection_rate: float = 100.0,
        connection_burst: float = 100.0,
        seed: int | None = None,
        **options,
    ) -> None:
        super().__init__(upstream_host, upstream_port, max_token_age=max_token_age, mode="dsql", **options)
        self.admin_upstream_user = admin_upstream_user
        self.conflict_rate = conflict_rate
        self.xx000_every = xx000_every
        self.schema_conflict_rate = schema_conflict_rate
        self.max_connection_age = max_connection_age
        self.connection_rate = connection_rate
        self.connection_burst = connection_burst
        self.refusals: list[Refusal] = []
        self.injections: list[Injection] = []
        self.index_jobs = 0
        self.aged_out = 0
        self.statements_seen = 0
        self._random = random.Random(seed)
        self._ddl_in_flight = 0
        self._bucket = connection_burst
        self._bucket_at = time.monotonic()

    # ---- connections

    def _admit(self, user: str) -> tuple[str, str, str] | None:
        now = time.monotonic()
        self._bucket = min(
            self.connection_burst, self._bucket + (now - self._bucket_at) * self.connection_rate
        )
        self._bucket_at = now
        if self._bucket < 1:
            return (
                "connection rate exceeded",
                RATE_LIMITED,
                f"too many connections: the rate of {self.connection_rate:g} new connections "
                "per second is exceeded",
            )
        self._bucket -= 1
        return None

    def _upstream_params(self, params: dict[str, str]) -> dict[str, str]:
        params = super()._upstream_params(params)
        if params.get("user") == "admin":
            params["user"] = self.admin_upstream_user
        return params

    # ---- client → server

    async def _client_pump(
        self, session: _Session, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter
    ) -> None:
        talk = _Conversation(
            user=session.params.get("user", ""), search_path=session.params.get("search_path")
        )
        session.talk = talk  # type: ignore[attr-defined]
        age_cap = asyncio.ensure_future(self._cap_age(session, talk))
        unit: list[tuple[bytes, bytes]] = []
        try:
            while True:
                head = await reader.readexactly(5)
                (length,) = struct.unpack("!I", head[1:])
                if length < 4 or length > MAX_MESSAGE:
                    return
                kind, body = head[:1], await reader.readexactly(length - 4)
                if kind == b"X":
                    upstream.write(head + body)
                    await upstream.drain()
                    return
                if talk.skip_to_sync:
                    if kind == b"S":
                        talk.skip_to_sync = False
                        self._open(talk)
                        upstream.write(head + body)
                        await upstream.drain()
                    continue
                unit.append((kind, body))
                if kind in (b"S", b"Q", b"H"):
                    upstream.write(self._judge(talk, unit))
                    await upstream.drain()
                    unit = []
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            age_cap.cancel()
            self._release_ddl(talk)  # a transaction cut short holds nothing
            talk.segments.clear()

    def _open(self, talk: _Conversation) -> _Segment:
        """The segment the next answers belong to (until a ReadyForQuery ends it)."""
        if talk.open_segment is None:
            talk.open_segment = _Segment()
            talk.segments.append(talk.open_segment)
        return talk.open_segment

    def _judge(self, talk: _Conversation, unit: list[tuple[bytes, bytes]]) -> bytes:
        """The bytes to send upstream for one unit: as is, rewritten, or an error instead."""
        talk.busy = True
        segment = self._open(talk)
        ends_segment = unit[-1][0] in (b"S", b"Q")
        executed: list[Statement] = []
        out: list[bytes] = []
        failure: tuple[str, str, str, Statement] | None = None  # (sqlstate, message, code, stmt)
        parsed: list[tuple[str, Statement]] = []
        bound: list[tuple[str, Statement | None]] = []
        for kind, body in unit:
            if kind == b"Q":
                sql = body.rstrip(b"\0").decode()
                statements = [
                    classify(s, user=talk.user, search_path=talk.search_path) for s in split_statements(sql)
                ]
                self.statements_seen += len(statements)
                for statement in statements:
                    if statement.refusal and failure is None:
                        failure = (*statement.refusal, "", statement)
                executed += statements
                if any(s.index_async for s in statements):
                    segment.index_async = "simple"
                    body = _without_async(sql).encode() + b"\0"
            elif kind == b"P":
                name, at = _cstring(body, 0)
                sql, rest = _cstring(body, at)
                statement = classify(sql, user=talk.user, search_path=talk.search_path)
                self.statements_seen += 1
                if statement.refusal and failure is None:
                    failure = (*statement.refusal, "", statement)
                parsed.append((name, statement))
                if statement.index_async:
                    segment.index_async = "extended"
                    body = name.encode() + b"\0" + _without_async(sql).encode() + b"\0" + body[rest:]
            elif kind == b"B":
                portal, at = _cstring(body, 0)
                name, _ = _cstring(body, at)
                known = dict(parsed).get(name) or talk.statements.get(name)
                bound.append((portal, known))
                if known is not None and known.index_async:
                    segment.index_async = "extended"
            elif kind == b"E":
                portal, _ = _cstring(body, 0)
                to_execute = dict(bound).get(portal) or talk.portals.get(portal)
                if to_execute is not None:
                    executed.append(to_execute)
            elif kind == b"C" and body[:1] == b"S":
                talk.statements.pop(_cstring(body, 1)[0], None)
            out.append(_message(kind, body))

        if failure is None:
            failure = self._transaction_rules(talk, executed)
        if failure is None:
            failure = self._conflict(talk, executed)
        if failure is not None:
            sqlstate, message, code, statement = failure
            if code:
                self.injections.append(Injection(talk.user, sqlstate, code, statement.text[:200]))
            else:
                self.refusals.append(Refusal(talk.user, sqlstate, message, statement.text[:200]))
            if not ends_segment:
                # Parse/Describe/Flush: PostgreSQL's ReadyForQuery is not for this client;
                # its own Sync, which the error makes it send, ends the segment instead.
                segment.drop_ready += 1
                talk.skip_to_sync = True
            else:
                talk.open_segment = None
            if talk.in_block:
                talk.kinds.add("failed")
            return _raise_query(sqlstate, message)

        for name, statement in parsed:
            talk.statements[name] = statement
        for portal, bound_statement in bound:
            talk.portals[portal] = bound_statement
        self._account(talk, executed, ends_segment, segment)
        if ends_segment:
            talk.open_segment = None
        return b"".join(out)

    def _transaction_rules(
        self, talk: _Conversation, executed: list[Statement]
    ) -> tuple[str, str, str, Statement] | None:
        """One DDL per transaction, never with DML: judged over what this unit executes."""
        kinds = set(talk.kinds)
        for statement in executed:
            if statement.kind in ("begin", "end"):
                kinds = set()
            elif statement.kind in ("ddl", "dml"):
                if statement.kind == "ddl" and "ddl" in kinds:
                    return (
                        UNSUPPORTED,
                        "only one DDL statement is supported in a transaction",
                        "",
                        statement,
                    )
                if ("dml" if statement.kind == "ddl" else "ddl") in kinds:
                    return (
                        UNSUPPORTED,
                        "DDL and DML are not supported in the same transaction",
                        "",
                        statement,
                    )
                kinds.add(statement.kind)
        return None

    def _conflict(
        self, talk: _Conversation, executed: list[Statement]
    ) -> tuple[str, str, str, Statement] | None:
        """An optimistic-concurrency failure to inject instead of running this unit, if any."""
        for statement in executed:
            if statement.kind == "ddl":
                others = self._ddl_in_flight - (1 if talk.holds_ddl else 0)
                if others > 0 or self._random.random() < self.schema_conflict_rate:
                    return ("40001", OC001, "OC001", statement)
            elif statement.kind == "dml" and self._random.random() < self.conflict_rate:
                injected = sum(1 for i in self.injections if i.code == "OC000") + 1
                sqlstate = "XX000" if self.xx000_every and injected % self.xx000_every == 0 else "40001"
                return (sqlstate, OC000, "OC000", statement)
        return None

    def _account(
        self, talk: _Conversation, executed: list[Statement], ends_segment: bool, segment: _Segment
    ) -> None:
        for statement in executed:
            if statement.kind == "begin":
                talk.in_block, talk.kinds = True, set()
            elif statement.kind == "end":
                talk.in_block, talk.kinds = False, set()
            elif statement.kind in ("ddl", "dml"):
                talk.kinds.add(statement.kind)
                if statement.kind == "ddl" and not talk.holds_ddl:
                    talk.holds_ddl = True
                    self._ddl_in_flight += 1
            if statement.search_path is not None:
                talk.search_path = statement.search_path
            if statement.index_async:
                self.index_jobs += 1
        if ends_segment and not talk.in_block:
            talk.kinds = set()

    # ---- server → client

    async def _server_pump(
        self, session: _Session, upstream: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        talk: _Conversation | None = None
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while True:
                head = await upstream.readexactly(5)
                (length,) = struct.unpack("!I", head[1:])
                body = await upstream.readexactly(length - 4)
                talk = talk or getattr(session, "talk", None)
                segment = talk.segments[0] if talk is not None and talk.segments else None
                kind = head[:1]
                if segment is None:
                    writer.write(head + body)
                elif kind == b"Z":
                    assert talk is not None  # a segment belongs to a conversation
                    if segment.drop_ready:
                        segment.drop_ready -= 1
                        continue
                    talk.segments.popleft()
                    talk.busy = bool(talk.segments) or talk.open_segment is not None
                    if body[:1] == b"I":  # no transaction open: whatever it did is over
                        talk.in_block, talk.kinds = False, set()
                        self._release_ddl(talk)
                    writer.write(head + body)
                elif segment.index_async and kind == b"n":
                    writer.write(_job_id_rows()[0])
                elif segment.index_async and kind == b"C" and body.startswith(b"CREATE INDEX"):
                    description, row = _job_id_rows()
                    if segment.index_async == "simple":
                        writer.write(description)
                    writer.write(row + _message(b"C", b"SELECT 1\0"))
                else:
                    writer.write(head + body)
                await writer.drain()

    def _release_ddl(self, talk: _Conversation) -> None:
        if talk.holds_ddl:
            talk.holds_ddl = False
            self._ddl_in_flight -= 1

    async def _cap_age(self, session: _Session, talk: _Conversation) -> None:
        """Close the connection once it is `max_connection_age` old, as DSQL does."""
        await asyncio.sleep(max(0.0, session.opened_at + self.max_connection_age - time.monotonic()))
        self.aged_out += 1
        if not talk.busy:
            session.client.write(
                _error_response(
                    "08006", f"connection exceeded its maximum age of {self.max_connection_age:g} seconds"
                )
            )
            with contextlib.suppress(ConnectionError, OSError):
                await session.client.drain()
            for writer in session.writers():
                writer.close()
        else:
            session.abort()


def _without_async(sql: str) -> str:
    return re.sub(r"(?i)(\bINDEX\s+)ASYNC\b\s*", r"\1", sql, count=1)
