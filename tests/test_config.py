"""The SPEC's configuration table: defaults, inference from the endpoint, and refusals."""

from __future__ import annotations

import pytest

from db import ConfigError, Settings, on_vercel
from support import InProcess, clean_environment

AURORA = "mycluster.cluster-abc123xyz.eu-west-1.rds.amazonaws.com"
DSQL = "abcdefghijklmnopqrstuvwxyz.dsql.us-east-2.on.aws"


def test_database_url_means_password_auth():
    s = Settings.from_env({"DATABASE_URL": "postgresql://app:s3cret@db.local:6543/todos"})
    assert (s.auth, s.host, s.port, s.user, s.database, s.password) == (
        "password",
        "db.local",
        6543,
        "app",
        "todos",
        "s3cret",
    )
    assert s.sslmode is None and s.pool_min == 1 and s.pool_max == 10
    assert s.pool_lifetime() == float("inf")


def test_libpq_names_and_their_defaults():
    s = Settings.from_env({"PGHOST": "db.local", "PGPASSWORD": "pw"})
    assert (s.auth, s.port, s.user, s.database, s.password) == (
        "password",
        5432,
        "postgres",
        "postgres",
        "pw",
    )


def test_aurora_host_without_password_is_iam_with_region_and_tls():
    s = Settings.from_env({"PGHOST": AURORA, "PGUSER": "todo_app"})
    assert (s.auth, s.region, s.sslmode, s.token_ttl, s.password) == (
        "iam",
        "eu-west-1",
        "require",
        900,
        None,
    )
    assert s.ssl_context() == "require"
    assert s.pool_lifetime() == 900


def test_dsql_host_is_dsql_with_admin_and_its_region():
    s = Settings.from_env({"PGHOST": DSQL})
    assert (s.auth, s.user, s.region, s.schema) == ("dsql", "admin", "us-east-2", "public")
    role = Settings.from_env({"PGHOST": DSQL, "PGUSER": "todo_app", "DB_SCHEMA": "todo_app"})
    assert (role.user, role.schema) == ("todo_app", "todo_app")
    # A DSQL connection lives at most an hour: the pool is due well before 55 minutes.
    longest = Settings.from_env({"PGHOST": DSQL, "DB_TOKEN_TTL": "3600"})
    assert longest.token_ttl == 3600 and longest.pool_lifetime() * 0.95 <= 55 * 60


def test_dsql_verifies_its_certificate_against_the_system_trust_store():
    import ssl

    s = Settings.from_env({"PGHOST": DSQL})
    assert s.sslmode == "verify-full" and s.sslrootcert is None
    context = s.ssl_context()
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert context.cert_store_stats()["x509_ca"] > 0  # the system's roots, loaded
    # Aurora PostgreSQL's RDS CA is in no system store: require, unless a bundle is given.
    assert Settings.from_env({"PGHOST": AURORA}).sslmode == "require"
    assert Settings.from_env({"PGHOST": DSQL, "PGSSLMODE": "require"}).ssl_context() == "require"


def test_schema_is_the_search_path_of_every_connection():
    assert Settings.from_env({"PGHOST": DSQL}).connect_arguments()["server_settings"] == {
        "search_path": "public"
    }
    s = Settings.from_env({"DATABASE_URL": "postgresql://u@h/db", "DB_SCHEMA": "todo_app"})
    assert s.connect_arguments()["server_settings"]["search_path"] == "todo_app"


def test_postgresql_runs_prepared_statements_on_generic_plans_but_dsql_and_rds_proxy_keep_their_default():
    """Lists are written for generic plans; forcing them saves PostgreSQL planning on large
    tables. DSQL (unverified there) and RDS Proxy (no prepared statements) are left alone."""
    for env in ({"DATABASE_URL": "postgresql://u@h/db"}, {"PGHOST": AURORA}):
        assert Settings.from_env(env).connect_arguments()["server_settings"]["plan_cache_mode"] == (
            "force_generic_plan"
        )
    proxy = "app.proxy-abc123.eu-west-1.rds.amazonaws.com"
    for env in ({"PGHOST": DSQL}, {"PGHOST": proxy}):
        assert "plan_cache_mode" not in Settings.from_env(env).connect_arguments()["server_settings"]


def test_explicit_settings_win(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not read until a connection is made")
    s = Settings.from_env(
        {
            "PGHOST": "10.0.0.5",
            "DB_AUTH": "iam",
            "AWS_REGION": "ap-south-1",
            "AWS_ROLE_ARN": "arn:aws:iam::1:role/r",
            "DB_TOKEN_TTL": "600",
            "PGSSLROOTCERT": str(ca),
            "DB_POOL_MIN": "2",
            "DB_POOL_MAX": "4",
        }
    )
    assert (s.auth, s.region, s.role_arn, s.token_ttl, s.sslmode) == (
        "iam",
        "ap-south-1",
        "arn:aws:iam::1:role/r",
        600,
        "verify-full",
    )
    assert (s.pool_min, s.pool_max) == (2, 4)
    assert Settings.from_env({"PGHOST": AURORA, "PGSSLMODE": "disable"}).sslmode == "disable"


def test_pool_defaults_elsewhere_and_on_vercel():
    local = Settings.from_env({"DATABASE_URL": "postgresql://u@h/db"})
    assert (local.pool_min, local.pool_max, local.idle_timeout) == (1, 10, 300)
    assert (local.connect_timeout, local.statement_cache) == (3, 100)
    # On Vercel a suspended instance must hold nothing open: no floor, a short idle life.
    vercel = Settings.from_env({"DATABASE_URL": "postgresql://u@h/db", "VERCEL": "1"})
    assert (vercel.pool_min, vercel.pool_max, vercel.idle_timeout) == (0, 10, 5)
    assert connect_timeout_of(Settings.from_env({"PGHOST": AURORA, "DB_CONNECT_TIMEOUT": "20"})) == 20
    chosen = Settings.from_env(
        {"DATABASE_URL": "postgresql://u@h/db", "VERCEL": "1", "DB_POOL_MIN": "2", "DB_IDLE_TIMEOUT": "30"}
    )
    assert (chosen.pool_min, chosen.idle_timeout) == (2, 30)


def test_the_service_runs_on_vercel_when_the_runtime_sets_vercel():
    assert on_vercel({"VERCEL": "1"})
    assert not on_vercel({}) and not on_vercel({"VERCEL": ""})


def test_dead_connections_are_found_within_about_two_seconds_unless_configured_otherwise():
    s = Settings.from_env({"PGHOST": AURORA})
    assert (s.keepalive_idle, s.keepalive_interval, s.keepalive_count, s.tcp_user_timeout) == (1, 1, 2, 1.5)
    chosen = Settings.from_env(
        {
            "PGHOST": AURORA,
            "DB_TCP_KEEPALIVE_IDLE": "0",
            "DB_TCP_KEEPALIVE_INTERVAL": "5",
            "DB_TCP_KEEPALIVE_COUNT": "9",
            "DB_TCP_USER_TIMEOUT": "30",
        }
    )
    assert (chosen.keepalive_idle, chosen.keepalive_interval, chosen.keepalive_count) == (0, 5, 9)
    assert chosen.tcp_user_timeout == 30.0
    assert Settings.from_env({"PGHOST": AURORA, "DB_TCP_USER_TIMEOUT": "0.75"}).tcp_user_timeout == 0.75


def connect_timeout_of(settings: Settings) -> float:
    return settings.connect_arguments()["timeout"]


def test_rds_proxy_gets_no_named_statements():
    proxy = "todo.proxy-abc123xyz.eu-west-1.rds.amazonaws.com"
    s = Settings.from_env({"PGHOST": proxy})
    assert (s.auth, s.region, s.statement_cache) == ("iam", "eu-west-1", 0)
    assert s.connect_arguments()["statement_cache_size"] == 0
    assert Settings.from_env({"PGHOST": AURORA}).connect_arguments()["statement_cache_size"] == 100
    assert Settings.from_env({"PGHOST": proxy, "DB_STATEMENT_CACHE": "50"}).statement_cache == 50


@pytest.mark.parametrize(
    "env, variable",
    [
        ({}, "DATABASE_URL"),
        ({"PGHOST": AURORA, "DB_AUTH": "kerberos"}, "DB_AUTH"),
        ({"DATABASE_URL": "postgresql://u@/db", "DB_AUTH": "iam"}, "PGHOST"),
        ({"PGHOST": "10.0.0.5", "DB_AUTH": "iam"}, "AWS_REGION"),
        ({"PGHOST": AURORA, "DB_TOKEN_TTL": "901"}, "DB_TOKEN_TTL"),
        ({"PGHOST": AURORA, "DB_TOKEN_TTL": "0"}, "DB_TOKEN_TTL"),
        ({"PGHOST": AURORA, "DB_TOKEN_TTL": "soon"}, "DB_TOKEN_TTL"),
        ({"PGHOST": DSQL, "DB_TOKEN_TTL": "3601"}, "DB_TOKEN_TTL"),
        ({"PGHOST": DSQL, "DB_SCHEMA": "Todo-App"}, "DB_SCHEMA"),
        ({"PGHOST": DSQL, "DB_SCHEMA": 'x"; DROP'}, "DB_SCHEMA"),
        ({"PGHOST": AURORA, "DB_POOL_MIN": "5", "DB_POOL_MAX": "2"}, "DB_POOL_MAX"),
        ({"PGHOST": AURORA, "DB_POOL_MIN": "-1"}, "DB_POOL_MIN"),
        ({"PGHOST": AURORA, "DB_IDLE_TIMEOUT": "0"}, "DB_IDLE_TIMEOUT"),
        ({"PGHOST": AURORA, "DB_CONNECT_TIMEOUT": "fast"}, "DB_CONNECT_TIMEOUT"),
        ({"PGHOST": AURORA, "DB_STATEMENT_CACHE": "-5"}, "DB_STATEMENT_CACHE"),
        ({"PGHOST": AURORA, "DB_TCP_KEEPALIVE_IDLE": "-1"}, "DB_TCP_KEEPALIVE_IDLE"),
        ({"PGHOST": AURORA, "DB_TCP_KEEPALIVE_INTERVAL": "0"}, "DB_TCP_KEEPALIVE_INTERVAL"),
        ({"PGHOST": AURORA, "DB_TCP_KEEPALIVE_COUNT": "128"}, "DB_TCP_KEEPALIVE_COUNT"),
        ({"PGHOST": AURORA, "DB_TCP_USER_TIMEOUT": "2s"}, "DB_TCP_USER_TIMEOUT"),
        ({"PGHOST": AURORA, "DB_TCP_USER_TIMEOUT": "nan"}, "DB_TCP_USER_TIMEOUT"),
        ({"PGHOST": AURORA, "DB_TCP_USER_TIMEOUT": "-0.5"}, "DB_TCP_USER_TIMEOUT"),
        ({"PGHOST": AURORA, "PGSSLMODE": "maybe"}, "PGSSLMODE"),
        ({"PGHOST": AURORA, "PGSSLROOTCERT": "/no/such/ca.pem"}, "PGSSLROOTCERT"),
        ({"PGHOST": "db", "PGPORT": "five"}, "PGPORT"),
        ({"DATABASE_URL": "mysql://u@h/db"}, "DATABASE_URL"),
    ],
)
def test_configuration_that_cannot_work_names_the_variable(env, variable):
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(env)
    assert raised.value.variable == variable and variable in str(raised.value)


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"PGHOST": AURORA, "DB_AUTH": "kerberos"}, "DB_AUTH"),
        (
            {"DATABASE_URL": "postgresql://u@db.local/todos", "CORS_ORIGINS": "http://localhost:3000/"},
            "CORS_ORIGINS",
        ),
    ],
)
def test_a_configuration_error_is_a_503_naming_the_variable_and_logged_as_a_configuration_error(
    env, variable
):
    """Not as the database being unavailable: the line says which variable to fix, and no
    secret the service holds."""
    secret = "config-secret-8d1e"
    with InProcess(clean_environment(**env, PGPASSWORD=secret, LOG_LEVEL="info")) as client:
        response = client.get("/todos")
        entries = [entry for entry in client.logs() if entry["message"] != "request"]
        text = client.logs_text()
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    assert response.json()["detail"].startswith(f"configuration error: {variable}: ")
    assert [(e["level"], e["message"], e["variable"]) for e in entries] == [
        ("error", "configuration error", variable)
    ]
    assert entries[0]["error"].startswith(f"{variable}: ") and secret not in text
