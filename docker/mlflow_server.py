"""Start `mlflow server` with MLflow's basic-auth app: every request needs a login.

The `mlflow` service's entrypoint in docker/compose.yaml (tests/test_stack.py runs it too, with
sqlite stores). It writes the auth app's config file from the environment (its user database on
Postgres, beside the tracking database, so a restart keeps the users and never re-creates the
admin with its first password), then replaces itself with

    mlflow server --app-name basic-auth --serve-artifacts ...

The database URIs, with their passwords, go to MLflow through the environment and a file readable by
this user only, never the command line (`ps` shows that). Every secret must be set; a missing one
stops here, naming it.

    python docker/mlflow_server.py --host 0.0.0.0 --port 5000 --artifacts-destination s3://mlflow
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

# MLflow reads these itself: the first admin (created once, when the user database is empty) and the
# key that signs the UI's CSRF tokens.
REQUIRED = ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
POSTGRES = ("POSTGRES_USER", "POSTGRES_PASSWORD")
TRACKING_DATABASE = "mlflow"
AUTH_DATABASE = "mlflow_auth"  # created by postgres-init.sql
# READ: a user without a grant (the reviewer, the app) may read everything and change nothing; what a
# user creates (the pipeline: its experiment and registered models) it manages.
DEFAULT_PERMISSION = "READ"


class ConfigError(Exception):
    """A setting is missing; the message names it."""


def postgres_uri(env: dict[str, str], database: str) -> str:
    """`postgresql://user:password@host:port/database` from POSTGRES_*, user and password URL-quoted."""
    missing = [name for name in POSTGRES if not env.get(name)]
    if missing:
        raise ConfigError(f"set {' and '.join(missing)} (or pass the database URIs)")
    user, password = quote(env["POSTGRES_USER"], safe=""), quote(env["POSTGRES_PASSWORD"], safe="")
    host, port = env.get("POSTGRES_HOST", "postgres"), env.get("POSTGRES_PORT", "5432")
    return f"postgresql://{user}:{password}@{host}:{port}/{database}"


def auth_config(database_uri: str, admin_username: str) -> str:
    """The basic-auth app's ini file (mlflow/server/auth/basic_auth.ini, with our database)."""
    # MLflow reads it with configparser, whose interpolation treats "%" (URL-quoted passwords) specially.
    escaped = database_uri.replace("%", "%%")
    return (
        "[mlflow]\n"
        f"default_permission = {DEFAULT_PERMISSION}\n"
        f"database_uri = {escaped}\n"
        f"admin_username = {admin_username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
    )


def prepare(argv: list[str] | None = None, env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The `mlflow server` command and its environment; writes the auth config file.

    Raises:
        ConfigError: a required variable is unset.
    """
    env = dict(os.environ if env is None else env)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default="5000")
    parser.add_argument("--workers", default=None)
    parser.add_argument("--artifacts-destination", required=True)
    parser.add_argument("--allowed-hosts", default=None, help="Host headers accepted (MLflow's --allowed-hosts)")
    parser.add_argument("--backend-store-uri", default=None, help=f"default: Postgres database {TRACKING_DATABASE}")
    parser.add_argument("--auth-database-uri", default=None, help=f"default: Postgres database {AUTH_DATABASE}")
    parser.add_argument("--config-dir", default=None, help="where the auth config is written (default: a new temp dir)")
    args = parser.parse_args(argv)

    missing = [name for name in REQUIRED if not env.get(name)]
    if missing:
        raise ConfigError(f"set {', '.join(missing)}: the basic-auth app has no default for them")
    backend = args.backend_store_uri or postgres_uri(env, TRACKING_DATABASE)
    auth_db = args.auth_database_uri or postgres_uri(env, AUTH_DATABASE)
    config_dir = Path(args.config_dir or tempfile.mkdtemp(prefix="mlflow-auth-"))
    config_dir.mkdir(parents=True, exist_ok=True)
    config_file = config_dir / "basic_auth.ini"
    fd = os.open(config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(auth_config(auth_db, env["MLFLOW_AUTH_ADMIN_USERNAME"]))
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(config_file), MLFLOW_BACKEND_STORE_URI=backend)

    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow") or "mlflow"
    cmd = [mlflow, "server", "--app-name", "basic-auth", "--host", args.host, "--port", str(args.port),
           "--artifacts-destination", args.artifacts_destination, "--serve-artifacts"]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    if args.allowed_hosts:
        cmd += ["--allowed-hosts", args.allowed_hosts]
    return cmd, env


def main(argv: list[str] | None = None) -> int:
    try:
        cmd, env = prepare(argv)
    except ConfigError as e:
        print(f"mlflow_server: {e}", file=sys.stderr)
        return 2
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
