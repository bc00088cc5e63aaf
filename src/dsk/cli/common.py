"""Builds a stage's Typer command from its typed params schema, so every option has --help.

Each field of a stage's ``Params`` becomes ``--field-name`` with the field's description as
its help; every stage also gets ``INPUT``/``--from``, ``--seed``, ``--force``, ``--set``,
``--config``, ``--quiet`` and ``--json``. The command only parses options and calls
``dsk.<stage>.run(...)``.

    $ dsk featurize --help
"""

from __future__ import annotations

import enum
import importlib
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer
import yaml

from dsk import console, tracking
from dsk.config import StageParams, build_params, load_yaml_file, parse_overrides
from dsk.errors import DskError, NotImplementedStage
from dsk.registry import spec

COMMON = {"source", "from_", "seed", "force", "set_", "config", "quiet", "json_", "mlflow"}


def load_stage(stage: str) -> types.ModuleType:
    st = spec(stage)
    if not st.implemented:
        raise NotImplementedStage(stage)
    return importlib.import_module(st.module)


def stage_params_schema(stage: str) -> type[StageParams]:
    st = spec(stage)
    if not st.implemented:
        return StageParams
    return importlib.import_module(st.module).Params


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _cli_type(name: str, annotation: Any) -> tuple[Any, Callable[[Any], Any]]:
    """Map a schema annotation to a Typer option type and a converter back to the raw value."""
    ann = _unwrap_optional(annotation)
    if typing.get_origin(ann) is typing.Literal:
        choices = typing.get_args(ann)
        choice_enum = enum.Enum(f"{name}_choices", {str(c): str(c) for c in choices})  # type: ignore[misc]
        by_str = {str(c): c for c in choices}
        return choice_enum, lambda v: by_str[v.value]
    if ann in (bool, int, float, str):
        return ann, lambda v: v
    if ann is Path:
        return str, lambda v: v
    # lists, dicts and nested values arrive as YAML text: --ops '[{"type": "Jitter"}]'
    return str, lambda v: yaml.safe_load(v) if isinstance(v, str) else v


def load_config_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    data = load_yaml_file(path, what="config file") or {}
    if not isinstance(data, dict):
        raise DskError(f"config file {str(path)!r} must be a mapping of param: value")
    return data


def resolve_params(
    stage: str,
    schema: type[StageParams],
    *,
    config: Path | None = None,
    overrides: list[str] = (),  # type: ignore[assignment]
    explicit: dict[str, Any] | None = None,
) -> StageParams:
    values: dict[str, Any] = {}
    values.update(load_config_file(config))
    values.update(parse_overrides(list(overrides)))
    values.update(explicit or {})
    return build_params(schema, values, where=f"dsk {stage}")


def report_result(result: Any, *, json_output: bool) -> None:
    summary = result.summary()
    if json_output:
        console.print_json(summary)
        return
    status = "[cyan]cache hit[/cyan]" if result.cached else "[green]done[/green]"
    km = result.key_metric
    metric = f"  {km[0]}={_fmt(km[1])}" if km else ""
    console.info(
        f"{status} {summary['stage']} [bold]{summary['id']}[/bold] ({summary['kind'] or '-'}) "
        f"in {summary['seconds']:.2f}s{metric}\n  → {summary['path']}"
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def stage_command(stage: str, *, extra: Callable[[], list[inspect.Parameter]] | None = None) -> Callable[..., None]:
    """A Typer command function for ``stage`` whose options mirror its params schema."""
    st = spec(stage)
    schema = stage_params_schema(stage)
    converters: dict[str, Callable[[Any], Any]] = {}
    parameters: list[inspect.Parameter] = []

    def add(name: str, annotation: Any, default: Any) -> None:
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))

    input_help = "Input: a path (raw data), an artifact id, a tag, or stage:latest." if st.accepts_raw else (
        "Input artifact: id, id prefix, tag or path. Default: the latest "
        + " / ".join(st.upstream) + " artifact." if st.upstream else "Input."
    )
    add("source", Optional[str], typer.Argument(None, help=input_help, show_default=False, metavar="INPUT"))
    add("from_", Optional[str], typer.Option(None, "--from", help="Same as INPUT: artifact id, tag or path.", show_default=False))
    for name, field in schema.model_fields.items():
        cli_type, conv = _cli_type(name, field.annotation)
        converters[name] = conv
        default_text = field.default if not callable(field.default) else None
        help_text = f"{field.description or ''} [default: {default_text!r}]".strip()
        flag = "--" + name.replace("_", "-")
        decls = [f"{flag}/--no-{name.replace('_', '-')}"] if cli_type is bool else [flag]
        add(name, Optional[cli_type], typer.Option(None, *decls, help=help_text, show_default=False))
    for p in (extra() if extra else []):
        parameters.append(p)
    add("seed", int, typer.Option(0, "--seed", help="Random seed (part of the cache key)."))
    add("force", bool, typer.Option(False, "--force", help="Rerun even if an identical artifact exists."))
    add("set_", list[str], typer.Option([], "--set", help="Override a param: --set key=value (repeatable).", show_default=False))
    add("config", Optional[Path], typer.Option(None, "--config", help="YAML file of param: value.", show_default=False))
    add("quiet", bool, typer.Option(False, "--quiet", "-q", help="Print only warnings and errors."))
    add("json_", bool, typer.Option(False, "--json", help="Print a machine-readable JSON summary on stdout."))
    add("mlflow", bool, typer.Option(False, "--mlflow", help="Also log params, metrics and the artifact id to MLflow (./mlruns or $MLFLOW_TRACKING_URI)."))

    def command(**kwargs: Any) -> None:
        console.set_mode(quiet=kwargs["quiet"], json_output=kwargs["json_"])
        if kwargs["mlflow"]:
            tracking.enable_mlflow()
        module = load_stage(stage)
        explicit = {
            name: converters[name](kwargs[name])
            for name in schema.model_fields
            if kwargs.get(name) is not None
        }
        params = resolve_params(stage, schema, config=kwargs["config"], overrides=kwargs["set_"], explicit=explicit)
        if kwargs["source"] and kwargs["from_"]:
            raise DskError("give the input either as INPUT or as --from, not both")
        stage_kwargs = {k: v for k, v in kwargs.items() if k not in COMMON and k not in schema.model_fields}
        result = module.run(
            source=kwargs["source"] or kwargs["from_"],
            params=params,
            seed=kwargs["seed"],
            force=kwargs["force"],
            **stage_kwargs,
        )
        if isinstance(result, dict):  # a step with no artifact (serve --smoke-test) returns what it checked
            if kwargs["json_"]:
                console.print_json(result)
        elif result is not None:
            report_result(result, json_output=kwargs["json_"])

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__name__ = stage
    command.__doc__ = st.summary + ("" if st.implemented else "  (not implemented yet)")
    return command
