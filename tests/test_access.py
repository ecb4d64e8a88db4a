"""tasks/core/access.py: the logins of the servers sftflow opens (loopback, `user:password`, the
exposure check shared by the app and the dashboard) and of the servers it calls: a tracking server's
401/403 and a Prefect API's 401 in `sftflow run` fail naming the variable to set, through a fake
server that refuses everything, as MLflow's basic-auth app and Prefect's auth string do."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.core.errors import StageError

ROOT = Path(__file__).resolve().parents[1]
LOGIN_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING")


@pytest.fixture
def refusing_server() -> Iterator[str]:
    """http://127.0.0.1:<port>: 401 to every request, with basic-auth's plain-text body (not JSON)."""

    class Refuse(http.server.BaseHTTPRequestHandler):
        def _refuse(self):
            self.rfile.read(int(self.headers.get("content-length") or 0))
            body = b"You are not authenticated. Please see the documentation for details."
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _refuse

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_logins(monkeypatch):
    for name in LOGIN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------- servers sftflow opens


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("LOCALHOST ", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("app.example.com", False),
])
def test_is_loopback(host, loopback):
    from tasks.core.access import is_loopback

    assert is_loopback(host) is loopback


def test_login_from_env_splits_at_the_first_colon(monkeypatch):
    from tasks.core.access import login_from_env

    monkeypatch.delenv("X_AUTH", raising=False)
    assert login_from_env("X_AUTH", "go on") is None
    monkeypatch.setenv("X_AUTH", "ann:s3cret:x")
    assert login_from_env("X_AUTH", "go on") == ("ann", "s3cret:x")
    for bad in ("no-colon", ":pw", "ann:"):
        monkeypatch.setenv("X_AUTH", bad)
        with pytest.raises(StageError, match="X_AUTH must look like user:password.*unset it to go on") as e:
            login_from_env("X_AUTH", "go on")
        assert bad not in str(e.value)  # the value is never echoed


def test_refuse_exposure_names_the_variable_and_the_setting():
    from tasks.core.access import credentials_match, refuse_exposure

    kwargs = {"variable": "X_AUTH", "action": "open it", "risk": "anyone could", "setting": "x.host"}
    refuse_exposure("127.0.0.1", None, **kwargs)
    refuse_exposure("0.0.0.0", ("a", "b"), **kwargs)
    with pytest.raises(StageError, match=r"refusing to open it on '0.0.0.0' without a login: anyone could\. "
                                         r"Set X_AUTH=user:password, or bind 127.0.0.1 \(x.host\)"):
        refuse_exposure("0.0.0.0", None, **kwargs)
    assert credentials_match(("a", "b"), "a", "b") and not credentials_match(("a", "b"), "a", "c")


def test_serve_and_review_share_the_one_implementation():
    """No copy left: both stages call tasks.core.access (helper-8's note)."""
    import inspect

    from tasks import review, serve
    from tasks.core import access

    for module in (serve, review):
        source = inspect.getsource(module)
        assert "ipaddress" not in source and "partition(\":\")" not in source, module.__name__
        assert "refuse_exposure(" in source and "login_from_env(" in source, module.__name__
    assert review.credentials_match is access.credentials_match


# ----------------------------------------------------------------------------- servers sftflow calls


def _mlflow_error(code: str, status: int):
    from mlflow.exceptions import MlflowException

    return MlflowException(f"API request to endpoint /api/2.0/mlflow/x failed with error code {status} != 200", error_code=code)


def test_tracking_access_names_the_login_variables(no_logins, monkeypatch):
    from tasks.core.access import tracking_access

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://ann:pw-in-uri@mlflow:5000")

    def refused(error) -> str:
        with pytest.raises(StageError) as e, tracking_access("doing x"):
            raise error
        assert e.value.__cause__ is error and "pw-in-uri" not in str(e.value)
        return str(e.value)

    text = refused(_mlflow_error("UNAUTHENTICATED", 401))
    assert text.startswith("doing x: the MLflow tracking server at http://ann@mlflow:5000 refused the request (API request")
    assert text.endswith("The tracking server asks for a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    assert refused(_mlflow_error("UNAUTHENTICATED", 401)).endswith("set MLFLOW_TRACKING_PASSWORD.")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    assert refused(_mlflow_error("UNAUTHENTICATED", 401)).endswith(
        "The tracking server rejected the login: check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.")
    assert "user (MLFLOW_TRACKING_USERNAME) may not do this" in refused(_mlflow_error("PERMISSION_DENIED", 403))
    # Anything else is not an access problem: it passes through untouched (and is retried as before).
    other = _mlflow_error("INTERNAL_ERROR", 500)
    with pytest.raises(type(other)) as e, tracking_access("doing x"):
        raise other
    assert e.value is other


def test_access_hint_keeps_its_old_home_for_existing_callers():
    from tasks.core import access, loading

    assert loading.access_hint is access.access_hint and loading.CREDENTIAL_VARIABLES == access.CREDENTIAL_VARIABLES


def test_check_trigger_on_a_401_names_the_mlflow_login_variables(refusing_server, no_logins, monkeypatch, tiny_params):
    """The flow's first call to the tracking server, through the real MLflow client against a server that says 401."""
    from flows.io_tasks import check_trigger

    monkeypatch.setenv("MLFLOW_TRACKING_URI", refusing_server)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(StageError) as e:
        check_trigger.fn(tiny_params, False)  # the task's function: Prefect's retries are not under test here
    text = str(e.value)
    assert text.startswith(f"check-trigger (reading the champion's data and params hashes): the MLflow tracking server at "
                           f"{refusing_server} refused the request")
    assert "error code 401" in text and "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in text
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(StageError, match="rejected the login: check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") as e:
        check_trigger.fn(tiny_params, False)
    assert "not-the-password" not in str(e.value)


def test_register_and_promote_on_a_401_name_the_login_variables(no_logins, monkeypatch, tiny_params):
    import tasks.promote
    import tasks.register
    from flows import io_tasks

    def refuse(*args, **kwargs):
        raise _mlflow_error("UNAUTHENTICATED", 401)

    monkeypatch.setattr(io_tasks, "_mlflow_run", lambda run_id: contextlib.nullcontext())
    monkeypatch.setattr(tasks.register, "run", refuse)
    monkeypatch.setattr(tasks.promote, "run", refuse)
    with pytest.raises(StageError, match=r"^register: .*set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        io_tasks.register.fn(tiny_params, "run-1", None)
    with pytest.raises(StageError, match=r"^promote: .*set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        io_tasks.promote.fn(tiny_params, "run-1")


def test_the_io_tasks_keep_their_retries():
    from flows import io_tasks

    for task in (io_tasks.check_trigger, io_tasks.log_to_mlflow, io_tasks.register, io_tasks.promote):
        assert task.retries == io_tasks.IO_RETRIES and task.retry_condition_fn is None


def test_prefect_access_names_the_auth_string(monkeypatch):
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    from tasks.core.access import prefect_access

    def status_error(code: int) -> PrefectHTTPStatusError:
        request = httpx.Request("GET", "http://prefect:4200/api/admin/version")
        response = httpx.Response(code, request=request)
        return PrefectHTTPStatusError.from_httpx_error(httpx.HTTPStatusError("refused", request=request, response=response))

    monkeypatch.setenv("PREFECT_API_URL", "http://prefect:4200/api")
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    with pytest.raises(StageError, match=r"the Prefect server at http://prefect:4200/api \(PREFECT_API_URL\) answered 401: "
                                         r"it asks for a login: set PREFECT_API_AUTH_STRING=user:password"):
        with prefect_access():
            raise status_error(401)
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "ops:wrong-one")
    with pytest.raises(StageError, match="rejected the login: check PREFECT_API_AUTH_STRING") as e:
        with prefect_access():
            raise status_error(401)
    assert "wrong-one" not in str(e.value)
    other = status_error(500)
    with pytest.raises(PrefectHTTPStatusError), prefect_access():
        raise other


def test_sftflow_run_against_a_prefect_server_that_refuses_the_auth_string(refusing_server, tmp_path):
    """The real `sftflow run`: Prefect's client asks the server first, gets 401, and no stage runs."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n", encoding="utf-8")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=f"{refusing_server}/api",
               PREFECT_API_AUTH_STRING="ops:not-the-auth-string", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    sftflow = Path(sys.executable).parent / "sftflow"
    out = subprocess.run([str(sftflow), "run", "-p", str(tmp_path / "params.yaml")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert (f"sftflow run: the Prefect server at {refusing_server}/api (PREFECT_API_URL) answered 401: it rejected the "
            "login: check PREFECT_API_AUTH_STRING") in out.stderr
    assert "Traceback" not in out.stderr and "not-the-auth-string" not in out.stdout + out.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing ran
