"""Who may reach what: the logins of the servers sftflow opens and of the servers it calls.

- Servers sftflow opens (the Gradio app, the review dashboard) bind loopback unless a login is set:
  `is_loopback`, `refuse_exposure`, `login_from_env` (`user:password` from one variable) and
  `credentials_match`. `tasks/serve.py` and `tasks/review.py` call these with their own variable
  (`SFTFLOW_APP_AUTH`, `SFTFLOW_REVIEW_AUTH`) and setting (`serve.host`, `review.host`).
- Servers sftflow calls read their login from the environment, and a missing or wrong one fails
  naming the variable: `access_hint` for the MLflow tracking server (401: `MLFLOW_TRACKING_USERNAME` /
  `MLFLOW_TRACKING_PASSWORD`; 403: the user's rights), `tracking_access` to turn such a refusal into a
  `StageError`, and `prefect_access` / `prefect_access_error` for the Prefect API (`PREFECT_API_AUTH_STRING`).

Nothing here prints or keeps a secret value; `safe_uri` drops a password from a URI before it is shown.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import os
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

from tasks.core.errors import StageError

LOOPBACK_HOSTS = ("localhost", "::1")
# Where the MLflow tracking client reads its login; named in every "who are you" error.
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# Where the Prefect client reads the server's auth string (`user:password`) and the server's address.
PREFECT_AUTH_VARIABLE = "PREFECT_API_AUTH_STRING"
PREFECT_URL_VARIABLE = "PREFECT_API_URL"


# ----------------------------------------------------------------------------- servers sftflow opens


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to any interface
        return False


def refuse_exposure(host: str, auth: tuple[str, str] | None, *, variable: str, action: str, risk: str, setting: str) -> None:
    """Refuse to bind beyond this machine without a login.

    Args:
        host: the bind address.
        auth: the login, or None when there is none.
        variable: the variable that sets the login (`SFTFLOW_APP_AUTH`...), named in the message.
        action: what is refused, as in "refusing to <action> on <host>" ("serve", "open the review dashboard").
        risk: what anyone who reaches it could do.
        setting: the params key of the bind address (`serve.host`).

    Raises:
        StageError: naming `variable`, when `host` is not loopback and `auth` is None.
    """
    if auth is None and not is_loopback(host):
        raise StageError(
            f"refusing to {action} on {host!r} without a login: {risk}. Set {variable}=user:password, "
            f"or bind 127.0.0.1 ({setting}) behind a reverse proxy that authenticates"
        )


def login_from_env(variable: str, without: str) -> tuple[str, str] | None:
    """The login `user:password` in environment variable `variable` (split at the first colon), or None when unset.

    Args:
        variable: the variable's name.
        without: what happens when it is unset, for the error message ("serve without a login on 127.0.0.1").

    Raises:
        StageError: the variable is set but not `user:password` with both parts non-empty.
    """
    raw = os.environ.get(variable, "")
    if not raw:
        return None
    user, sep, password = raw.partition(":")
    if not sep or not user or not password:
        raise StageError(f"{variable} must look like user:password (both non-empty); unset it to {without}")
    return user, password


def credentials_match(expected: tuple[str, str], user: str, password: str) -> bool:
    """Compare a login in constant time (both parts are always compared)."""
    same_user = hmac.compare_digest(user.encode(), expected[0].encode())
    same_password = hmac.compare_digest(password.encode(), expected[1].encode())
    return same_user and same_password


# ----------------------------------------------------------------------------- servers sftflow calls


def safe_uri(uri: str) -> str:
    """The URI without a password in it (`http://user:secret@host` -> `http://user@host`)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def access_hint(error: Exception) -> str:
    """What to do when the tracking server refused a request: set the login (401) or get rights (403).

    Returns:
        A sentence starting with a space, naming the variables to set or check; "" for any other error.
    """
    code = getattr(error, "error_code", None)
    text = str(error)
    if code == "UNAUTHENTICATED" or "error code 401" in text:
        missing = [name for name in CREDENTIAL_VARIABLES if not os.environ.get(name)]
        if missing:
            return f" The tracking server asks for a login: set {' and '.join(missing)}."
        return f" The tracking server rejected the login: check {' and '.join(CREDENTIAL_VARIABLES)}."
    if code == "PERMISSION_DENIED" or "error code 403" in text:
        return (" The tracking server's user (MLFLOW_TRACKING_USERNAME) may not do this, or the model does not exist "
                "(the server does not tell a user without rights which).")
    return ""


def _first_line(error: Exception, limit: int = 300) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[:limit] + "…"


@contextlib.contextmanager
def tracking_access(what: str) -> Iterator[None]:
    """Turn the tracking server's 401/403 inside the block into a StageError naming the login variables.

    Any other error passes through unchanged (retries and their messages stay as they are).

    Args:
        what: what was being done, the message's start ("check-trigger: reading the champion").

    Raises:
        StageError: the server refused the request (`access_hint` says which variable to set or check).
    """
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        hint = access_hint(e)
        if not hint:
            raise
        from tasks.core.tracking import tracking_uri

        raise StageError(
            f"{what}: the MLflow tracking server at {safe_uri(tracking_uri())} refused the request ({_first_line(e)}).{hint}"
        ) from e


@contextlib.contextmanager
def prefect_access() -> Iterator[None]:
    """Turn the Prefect API's 401/403 inside the block into a StageError naming PREFECT_API_AUTH_STRING.

    Any other error passes through unchanged.
    """
    from prefect.exceptions import PrefectHTTPStatusError

    try:
        yield
    except PrefectHTTPStatusError as e:
        refused = prefect_access_error(e)
        if refused is None:
            raise
        raise refused from e


def prefect_access_error(error: BaseException) -> StageError | None:
    """A StageError naming PREFECT_API_AUTH_STRING when the Prefect API answered 401 or 403, else None."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if status not in (401, 403):
        return None
    url = os.environ.get(PREFECT_URL_VARIABLE) or "the Prefect API"
    if not os.environ.get(PREFECT_AUTH_VARIABLE):
        fix = (f"it asks for a login: set {PREFECT_AUTH_VARIABLE}=user:password (the server's "
               "PREFECT_SERVER_API_AUTH_STRING)")
    else:
        fix = (f"it rejected the login: check {PREFECT_AUTH_VARIABLE} (user:password, the server's "
               "PREFECT_SERVER_API_AUTH_STRING)")
    return StageError(f"the Prefect server at {safe_uri(url)} ({PREFECT_URL_VARIABLE}) answered {status}: {fix}")
