"""`ral` command line: the parser, the one-line error guard and `main`. Each group of commands has its module
(inspect_compare: inspect, compare · causal_cmd: causal · train_eval: train, eval, levers), sharing common."""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# the command modules (their cmd_* functions stay importable from ral_core.cli)
from ral_core.cli.inspect_compare import add_compare, add_inspect, cmd_compare, cmd_inspect  # noqa: E402,F401
from ral_core.cli.causal_cmd import add_causal, cmd_causal  # noqa: E402,F401
from ral_core.cli.train_eval import add_eval, add_levers, add_train, cmd_eval, cmd_levers, cmd_train  # noqa: E402,F401

# subcommands in the order `ral --help` lists them
COMMANDS = (add_inspect, add_train, add_eval, add_levers, add_compare, add_causal)


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as one line (its default prints the usage block first); exit code 2 as before."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _check_args(a):
    """Cheap checks of any command's arguments, before a model or data set is loaded, so that a bad input is
    refused at once (a 1,000,000-character question used to run for minutes)."""
    import math

    from ral_core.errors import RALError
    from ral_core.limits import check_question_length

    if getattr(a, "question", None) is not None:
        check_question_length(a.question)
    if a.cmd == "train":  # the whole config, before torch and the trainer are imported (seconds)
        from ral_core.config import build_config
        build_config(a.config, a.overrides)
    if a.cmd == "levers":
        if not 1 <= a.n <= 1000:
            raise RALError(f"--n must be between 1 and 1000 (got {a.n})")
        if not (math.isfinite(a.strength) and 0 < a.strength <= 100):
            raise RALError(f"--strength must be a number in (0, 100] (got {a.strength})")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ral", description="RAL workbench: see, train and compare VLM attention")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in COMMANDS:
        add(sub)
    return p


def main(argv=None, adapter=None, timings: dict | None = None) -> int:
    """Run one command. For callers in Python (benchmarks): `adapter` is used instead of loading --model, and
    `timings` receives the seconds of the model work (`inspect_s`: inspect() without the figures)."""
    from ral_core import settings
    from ral_core.errors import RALError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed as one line): a code, in-process too
        return e.code if isinstance(e.code, int) else 2
    args.adapter, args.timings = adapter, timings
    try:
        _check_args(args)
        import torch
        torch.set_num_threads(settings.get("RAL_THREADS", min(4, os.cpu_count() or 1)))
        return args.func(args) or 0
    except RALError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 — last resort: one line, not a traceback
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (rerun with --debug for details)",
              file=sys.stderr)
        return 1
