"""`sftflow`: the one command-line parser. Each subcommand builds configs and calls a plain function.

    sftflow <stage> [-p params.yaml] [-S section.key=value ...]
    sftflow run     [-S ...] [--force]          the whole `retrain` Prefect flow
    sftflow deploy  --cron "0 3 * * 1"          a scheduled Prefect deployment of `retrain`
    sftflow promote [--version N]               gate a version (or force one) to `champion`
    sftflow rollback                            champion back to the previous champion
    sftflow lineage VERSION                     data → params → code → metrics of a model version
    sftflow export  --ollama VERSION            a version's GGUF file and an Ollama Modelfile
    sftflow serve   [--host H] [--port P]       the Gradio app for the champion
    sftflow review  [--host H] [--port P]       the reviewer's Streamlit dashboard over the registry
    sftflow params  [--markdown]                every params key: type, default, description
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from tasks.core.config import DEFAULT_PARAMS_FILE, ParamsError, load_params
from tasks.core.errors import SftflowError
from tasks.core.params_doc import REGENERATE, markdown, stage_epilog, text_table
from tasks.core.stages import STAGES, Stage, stage

# Stages that run as `sftflow <stage>` with nothing but params (promote, serve and review take more flags).
PLAIN_STAGES = tuple(s for s in STAGES if s.name not in {"promote", "serve", "review"})


def _add_params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--params", type=Path, default=DEFAULT_PARAMS_FILE, help="params file (default: params.yaml)")
    p.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a parameter for this run, like `dvc exp run -S` (repeatable)",
    )


class _SubParser(argparse.ArgumentParser):
    """A subcommand's parser; a stage's epilog (every key it reads) is built only when help is printed.

    Building the twelve epilogs walks every params field and costs ~0.1 s, which every `dvc repro`
    stage would pay at start-up for a help text it never prints.
    """

    stage_spec: Stage | None = None
    _epilog: str | None = None

    @property  # type: ignore[override]
    def epilog(self) -> str | None:
        if self._epilog is None and self.stage_spec is not None:
            self._epilog = stage_epilog(self.stage_spec)
        return self._epilog

    @epilog.setter
    def epilog(self, value: str | None) -> None:
        self._epilog = value


def _stage_parser(sub: Any, spec: Stage, **kwargs: Any) -> argparse.ArgumentParser:
    """The subparser of a stage: its help line, and the params it reads (with descriptions) as the epilog."""
    p = sub.add_parser(spec.name, help=spec.help, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    p.stage_spec = spec
    return p


def make_parser() -> argparse.ArgumentParser:
    """Build the argument parser (no side effects)."""
    parser = argparse.ArgumentParser(prog="sftflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_SubParser)

    for spec in PLAIN_STAGES:
        _add_params_args(_stage_parser(sub, spec, description=spec.help))

    p = sub.add_parser(
        "run",
        help="run the whole retrain flow (Prefect)",
        description="run the whole retrain flow (Prefect). DVC stages read params.yaml, so -S overrides are "
        "validated and then written into params.yaml (comments kept), as `dvc exp run -S` does; they stay there. "
        "The run stops early with 'nothing changed' when the champion was trained on the same data and params "
        "(--force skips that check); DVC skips every stage that is up to date.",
    )
    _add_params_args(p)
    p.add_argument("--force", action="store_true", help="retrain even when the data hash matches the champion's")

    p = sub.add_parser("deploy", help="create a scheduled Prefect deployment of retrain")
    _add_params_args(p)
    p.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * 1"')
    p.add_argument("--name", default="retrain-scheduled", help="deployment name")
    p.add_argument("--serve", action="store_true", help="keep serving the deployment (flow.serve) after creating it")

    p = _stage_parser(sub, stage("promote"))
    _add_params_args(p)
    p.add_argument("--version", type=int, default=None, help="force this version to champion (tagged manual)")

    p = sub.add_parser("rollback", help="move champion back to the previous champion")
    _add_params_args(p)

    p = sub.add_parser("lineage", help="print data → validation → splits → params → code → metrics → aliases")
    _add_params_args(p)
    p.add_argument("version", help="model version number (or an alias such as champion)")

    p = sub.add_parser(
        "export",
        help="write a registered version's GGUF variant and an Ollama Modelfile",
        description="write a registered version's GGUF variant (checked against its registered file hashes) and an "
        "Ollama Modelfile that prompts, stops and decodes as the variant was scored; then `ollama create NAME -f "
        "OUT/Modelfile`.",
    )
    _add_params_args(p)
    p.add_argument("--ollama", required=True, metavar="VERSION", help="model version number or alias (e.g. champion)")
    p.add_argument("--variant", default=None, choices=("gguf-f16", "gguf-q8_0", "gguf-q4_k_m"),
                   help="which GGUF variant (default: the fastest registered one)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <paths.artifacts>/export/<register.model_name>-<VERSION>)")

    p = _stage_parser(sub, stage("serve"))
    _add_params_args(p)
    p.add_argument("--host", default=None, help="bind address (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: serve.port)")

    p = _stage_parser(sub, stage("review"))
    _add_params_args(p)
    p.add_argument("--host", default=None, help="bind address (default: review.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: review.port)")

    p = sub.add_parser(
        "params",
        help="list every params key: section.key, type, default and description",
        description="list every params key with its type, default and description (from tasks/core/config.py). "
        f"docs/params.md holds the --markdown output: regenerate it with `{REGENERATE}`.",
    )
    p.add_argument("--markdown", action="store_true", help="print the markdown of docs/params.md instead of a table")
    return parser


def _print_result(result: Any) -> None:
    if result is None:
        return
    if isinstance(result, str):
        print(result)
    else:
        print(json.dumps(result, ensure_ascii=False, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sftflow` console script."""
    args = make_parser().parse_args(argv)
    rank = os.environ.get("RANK")  # set in the torchrun ranks `tasks.core.launch` starts
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if rank in (None, "0") else logging.WARNING,
        format="%(asctime)s " + (f"rank{rank} " if rank else "") + "%(levelname)s %(name)s: %(message)s",
    )
    if args.command == "params":
        # A terminal gets the table wrapped to its width; a pipe gets one line per key (for grep).
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
        sys.stdout.write(markdown() if args.markdown else text_table(width))
        return 0
    try:
        if args.command == "run":
            from flows.retrain import main as run_flow

            return run_flow(params_path=args.params, overrides=args.overrides, force=args.force)
        if args.command == "deploy":
            from flows.deploy import deploy

            from tasks.core.access import prefect_access

            with prefect_access():  # a 401 names PREFECT_API_AUTH_STRING
                _print_result(deploy(params_path=args.params, cron=args.cron, name=args.name, overrides=args.overrides, serve=args.serve))
            return 0

        params = load_params(args.params, args.overrides)
        if args.command in {s.name for s in PLAIN_STAGES}:
            module = importlib.import_module(f"tasks.{args.command}")
            _print_result(module.run(params))
        elif args.command == "promote":
            from tasks.promote import run as promote

            _print_result(promote(params, version=args.version))
        elif args.command == "rollback":
            from tasks.promote import rollback

            _print_result(rollback(params))
        elif args.command == "lineage":
            from tasks.register import lineage

            _print_result(lineage(params, args.version))
        elif args.command == "export":
            from tasks.register import export_ollama

            out = args.out or params.layout.artifacts / "export" / f"{params.register.model_name}-{args.ollama}"
            _print_result(export_ollama(params, args.ollama, out, variant=args.variant))
        elif args.command == "serve":
            from tasks.serve import run as serve

            serve(params, host=args.host, port=args.port)
        elif args.command == "review":
            from tasks.review import run as review

            review(params, host=args.host, port=args.port)
        return 0
    except ParamsError as e:
        print(f"sftflow: {e}", file=sys.stderr)
        return 2
    except SftflowError as e:
        print(f"sftflow {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
