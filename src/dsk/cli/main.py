"""The `dsk` entry point: one command table, in lifecycle order, and one-line errors.

    $ dsk --help
    $ DSK_DEBUG=1 dsk show nosuchid     # the traceback behind an error
"""

from __future__ import annotations

import os
import sys

import typer

try:  # recent typer vendors click as typer._click; older releases use click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click import ClickException  # type: ignore[no-redef,assignment]

from dsk import __version__
from dsk.cli import artifacts, chat, evaluate, generate, report, run, train, tune
from dsk.cli import augment, clean, export, featurize, finetune, pretrain, quantize, serve
from dsk.errors import DskError

STAGES_PANEL = "Lifecycle stages"
PIPELINE_PANEL = "Pipelines and evaluation"
ARTIFACT_PANEL = "Artifacts"

# (name, function, panel, extra settings) — the one command table, in the order --help shows.
COMMANDS = [
    ("clean", clean.command, STAGES_PANEL, {}),
    ("augment", augment.command, STAGES_PANEL, {}),
    ("featurize", featurize.command, STAGES_PANEL, {}),
    ("pretrain", pretrain.command, STAGES_PANEL, {}),
    ("finetune", finetune.command, STAGES_PANEL, {}),
    ("quantize", quantize.command, STAGES_PANEL, {}),
    ("export", export.command, STAGES_PANEL, {}),
    ("serve", serve.command, STAGES_PANEL, {}),
    ("chat", chat.chat, STAGES_PANEL, {}),
    ("generate", generate.generate, STAGES_PANEL, {}),
    ("train", train.train, STAGES_PANEL,
     {"context_settings": {"allow_extra_args": True, "ignore_unknown_options": True}}),
    ("run", run.run, PIPELINE_PANEL, {}),
    ("eval", evaluate.command, PIPELINE_PANEL, {}),
    ("report", report.command, PIPELINE_PANEL, {}),
    ("tune", tune.tune, PIPELINE_PANEL, {}),
    ("ls", artifacts.ls, ARTIFACT_PANEL, {}),
    ("show", artifacts.show, ARTIFACT_PANEL, {}),
    ("lineage", artifacts.lineage, ARTIFACT_PANEL, {}),
    ("verify", artifacts.verify, ARTIFACT_PANEL, {}),
    ("tag", artifacts.tag, ARTIFACT_PANEL, {}),
    ("gc", artifacts.gc, ARTIFACT_PANEL, {}),
]

app = typer.Typer(
    name="dsk",
    help="dsk: raw data → clean → augment → featurize → pretrain → finetune → quantize → export → serve, "
    "as versioned, cached artifacts in ./.dsk (or $DSK_HOME).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
for _name, _fn, _panel, _settings in COMMANDS:
    app.command(_name, rich_help_panel=_panel, **_settings)(_fn)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dsk {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; turn user errors into one line on stderr and exit code 2."""
    debug = bool(os.environ.get("DSK_DEBUG"))
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="dsk", standalone_mode=False)
    except DskError as exc:
        if debug:
            raise
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except ClickException as exc:
        exc.show()
        return 2
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as exc:  # a bug in dsk, not a user error: say so in one line
        if debug:
            raise
        sys.stderr.write(
            f"internal error: {exc.__class__.__name__}: {exc} (set DSK_DEBUG=1 for the traceback)\n"
        )
        return 1
    # in non-standalone mode click returns the code of a typer.Exit instead of raising it
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
