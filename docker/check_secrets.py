"""Refuse to start the stack while a secret is empty, too short, or still its docker/.env.example value.

The `check-secrets` init service in docker/compose.yaml runs it first; every other service waits for
it to exit 0. A secret is a variable of .env.example whose name ends in PASSWORD, SECRET_KEY,
AUTH_STRING or _AUTH; compose hands each to this service (`${NAME:?}`: an unset one already stops
compose). Values are never printed, only names.

    python docker/check_secrets.py [--example docker/.env.example]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

SECRET_NAME = re.compile(r"(PASSWORD|SECRET_KEY|AUTH_STRING|_AUTH)$")
PLACEHOLDER = re.compile(r"change-?me", re.IGNORECASE)
MIN_LENGTH = 12
# `user:password` values: the password part is what must be strong.
USER_PASSWORD = ("SFTFLOW_APP_AUTH", "SFTFLOW_REVIEW_AUTH", "PREFECT_API_AUTH_STRING")


def read_env_file(path: Path) -> dict[str, str]:
    """`NAME=value` lines of an env file (comments and blank lines skipped, no quoting rules)."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            out[name.strip()] = value.strip()
    return out


def secret_names(example: dict[str, str]) -> list[str]:
    """The secrets among the example's variables, in file order."""
    return [name for name in example if SECRET_NAME.search(name)]


def problems(example: dict[str, str], env: dict[str, str]) -> list[str]:
    """One line per secret that is not fit to use (names only, never values)."""
    found = []
    for name in secret_names(example):
        value = env.get(name, "")
        password = value.partition(":")[2] if name in USER_PASSWORD else value
        if not value:
            found.append(f"{name} is not set")
        elif value == example[name]:
            found.append(f"{name} is still its .env.example value")
        elif PLACEHOLDER.search(value):
            found.append(f"{name} still says change-me")
        elif name in USER_PASSWORD and ":" not in value:
            found.append(f"{name} must look like user:password")
        elif len(password) < MIN_LENGTH:
            found.append(f"{name} is shorter than {MIN_LENGTH} characters")
    return found


def main(argv: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--example", type=Path, default=Path(__file__).with_name(".env.example"))
    args = parser.parse_args(argv)
    example = read_env_file(args.example)
    found = problems(example, dict(os.environ if env is None else env))
    if found:
        print("check-secrets: refusing to start the stack:", file=sys.stderr)
        for line in found:
            print(f"  - {line}", file=sys.stderr)
        print("Set each in docker/.env (e.g. `openssl rand -hex 24`), then start again.", file=sys.stderr)
        return 1
    print(f"check-secrets: {len(secret_names(example))} secrets set")
    return 0


if __name__ == "__main__":
    sys.exit(main())
