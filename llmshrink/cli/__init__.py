"""The `llmshrink` command line.

Subcommands live in their own modules and are imported only when run (or
when ``--help`` lists them), and those modules import torch/transformers
inside the command bodies, so ``llmshrink --help`` answers at once.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings

import click

from llmshrink import __version__
from llmshrink.errors import Interrupted, LlmshrinkError

# name -> "module:attr", in the order `--help` lists them.
COMMANDS: dict[str, str] = {
    "compress": "llmshrink.cli.compress:compress",
    "models": "llmshrink.cli.models:models",
    "data": "llmshrink.cli.data:data",
    "targets": "llmshrink.cli.targets:targets",
    "spec": "llmshrink.cli.spec:spec",
    "export": "llmshrink.cli.bundle:export",
    "run": "llmshrink.cli.bundle:run",
    "bench": "llmshrink.cli.bundle:bench",
    "build": "llmshrink.cli.bundle:build",
    "validate": "llmshrink.cli.bundle:validate",
    "eval": "llmshrink.cli.evaluate:evaluate",
    "report": "llmshrink.cli.report:report",
    "plan": "llmshrink.cli.plan:plan",
    "doctor": "llmshrink.cli.doctor:doctor",
}

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on demand from ``COMMANDS``-style maps."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self._lazy) + sorted(set(super().list_commands(ctx)) - set(self._lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self._lazy:
            module, _, attr = self._lazy[name].partition(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as e:
            from llmshrink.registry import suggest

            near = suggest(args[0], self.list_commands(ctx)) if args else []
            if near:
                e.message += f" Did you mean: {', '.join(near)}?"
            raise

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except LlmshrinkError as e:
            from llmshrink.cli import ui

            if debug:
                ui.show_traceback()
            ui.show_error(e)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            from llmshrink.cli import ui

            ui.show_error(Interrupted("Interrupted."))
            ctx.exit(Interrupted.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except OSError as e:  # the system refused: disk full, no permission, a read-only file system
            from llmshrink.cli import ui

            if debug:
                raise
            where = f": {e.filename}" if e.filename else ""
            ui.show_error(LlmshrinkError(f"{e.strerror or e}{where}.",
                                         "Free space or fix the permissions (or choose another output path), then "
                                         "run the command again; a compress run continues with --resume."))
            ctx.exit(1)
        except Exception as e:  # a bug: say so in one line; the traceback is for --debug
            from llmshrink.cli import ui

            if debug:
                raise
            ui.show_error(LlmshrinkError(f"internal error: {type(e).__name__}: {e}",
                                         "This is a bug in llmshrink. Run it again as `llmshrink --debug "
                                         f"{ctx.invoked_subcommand or 'COMMAND'} ...` for the traceback and "
                                         "report it."))
            ctx.exit(1)


def _quiet_libraries() -> None:
    # transformers and huggingface_hub draw their own tqdm bars and warnings;
    # llmshrink draws one set of progress bars, so silence theirs.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="llmshrink")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--debug", is_flag=True, help="Show the Python traceback of any error (for bug reports).")
def cli(verbose: int, debug: bool) -> None:
    """Compress a pretrained LLM for one deployment target.

    llmshrink searches architecture (width, depth) and per-layer precision
    jointly under a latency budget from the target's latency table, exports
    the result to ONNX / TensorRT, and measures it.

    \b
    Examples:
      llmshrink compress --target cpu --latency 3ms   # the whole job on the default model
      llmshrink doctor                        # what this machine can do
      llmshrink models list                   # built-in and cached models
      llmshrink models info smollm2-135m      # architecture of the default model
      llmshrink models info ./my-model --json
      llmshrink data show --calib-data corpus.txt
      llmshrink spec new --uniform int4 --out int4.json
      llmshrink export --spec int4.json --out bundles/int4
      llmshrink run bundles/int4 --prompt "What is the capital of France?"
      llmshrink bench bundles/int4 --workload decode:ctx=256

    Exit codes: 0 ok, 2 usage, 3 infeasible budget, 4 validation failed,
    5 missing hardware/runtime, 6 remote unreachable, 130 interrupted, 1 other.
    """
    _quiet_libraries()
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    _warnings_to_debug()


def _warnings_to_debug() -> None:
    """Python warnings (transformers' FutureWarnings and the like) are for developers: log them at debug
    (shown with -vv), never in the user's output. llmshrink itself reports through logging."""
    wlog = logging.getLogger("py.warnings")

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        wlog.debug("%s:%s: %s: %s", filename, lineno, category.__name__, message)

    warnings.showwarning = show


def main() -> None:
    """Entry point of the console script."""
    cli(prog_name="llmshrink")
