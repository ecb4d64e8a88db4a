"""Create (or re-key) the MLflow users of the stack, as the admin, over the basic-auth REST API.

The `mlflow-users` init service in docker/compose.yaml runs it once the server is healthy
(tests/test_stack.py runs it too). Two users besides the admin, neither an admin:

- the pipeline (`MLFLOW_PIPELINE_USERNAME`/`_PASSWORD`): the worker's login; it creates the experiment
  and the registered models, so it manages them (registers versions, moves `champion`);
- the reviewer (`MLFLOW_REVIEWER_USERNAME`/`_PASSWORD`): the app's and people's read-only login; it
  has the server's default permission, READ, and can move no alias.

Run again with new passwords in docker/.env, it sets them. The admin logs in with
`MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD`. No password is ever printed.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

ROLES = ("PIPELINE", "REVIEWER")
ADMIN = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


class Refused(Exception):
    """The server answered with an error; the message says which request."""


def _request(url: str, method: str, auth: tuple[str, str], body: dict | None = None) -> tuple[int, dict]:
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as e:
        return e.code, {}


def wait_for(base: str, timeout: float = 120.0) -> None:
    """Wait until the server's (unauthenticated) health endpoint answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise Refused(f"{base}/health did not answer within {timeout:.0f} s") from None
            time.sleep(1)


def ensure_user(base: str, admin: tuple[str, str], username: str, password: str) -> str:
    """Create `username` with `password`, or set its password when it exists; returns what was done."""
    api = f"{base}/api/2.0/mlflow/users"
    status, _ = _request(f"{api}/get?{urllib.parse.urlencode({'username': username})}", "GET", admin)
    if status == 401:
        raise Refused(f"the server rejected the admin login ({ADMIN[0]}/{ADMIN[1]})")
    if status == 200:
        status, _ = _request(f"{api}/update-password", "PATCH", admin, {"username": username, "password": password})
        done = "password set"
    else:
        status, _ = _request(f"{api}/create", "POST", admin, {"username": username, "password": password})
        done = "created"
    if status != 200:
        raise Refused(f"{done.split()[0]} user {username!r}: HTTP {status}")
    # Never an admin, even if someone made it one by hand: these logins live in services' environments.
    status, _ = _request(f"{api}/update-admin", "PATCH", admin, {"username": username, "is_admin": False})
    if status != 200:
        raise Refused(f"update-admin of user {username!r}: HTTP {status}")
    return done


def main(env: dict[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    wanted = [*ADMIN, "MLFLOW_TRACKING_URI"] + [f"MLFLOW_{r}_{k}" for r in ROLES for k in ("USERNAME", "PASSWORD")]
    missing = [name for name in wanted if not env.get(name)]
    if missing:
        print(f"mlflow_users: set {', '.join(missing)}", file=sys.stderr)
        return 2
    base = env["MLFLOW_TRACKING_URI"].rstrip("/")
    admin = (env[ADMIN[0]], env[ADMIN[1]])
    try:
        wait_for(base)
        for role in ROLES:
            username = env[f"MLFLOW_{role}_USERNAME"]
            done = ensure_user(base, admin, username, env[f"MLFLOW_{role}_PASSWORD"])
            print(f"mlflow_users: {role.lower()} user {username!r} {done}")
    except Refused as e:
        print(f"mlflow_users: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
