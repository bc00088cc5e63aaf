"""Typed stage parameters: one pydantic schema per stage feeds `--help`, pipeline files and `--set`.

Every stage declares ``class Params(StageParams)`` whose field descriptions become the
command's ``--help``. Values arrive from (lowest to highest precedence) the schema's
defaults, a pipeline file or ``--config`` file, ``--set key=value`` and explicit options.

    $ dsk clean data/sample/tinyshakespeare.txt --set min_words=20
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, ClassVar, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from dsk.errors import DskError


class StageParams(BaseModel):
    """Base for every stage's parameter schema: unknown keys are errors, values are typed.

    The dump is the artifact id's params. A field added after artifacts were made goes into
    ``late_fields``: the dump leaves it out while it is at its default, so those ids stay valid.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
    late_fields: ClassVar[tuple[str, ...]] = ()

    def at_default(self, name: str) -> bool:
        return getattr(self, name) == type(self).model_fields[name].get_default(call_default_factory=True)

    def _drop_late_defaults(self, data: dict[str, Any]) -> dict[str, Any]:
        for name in self.late_fields:
            if self.at_default(name):
                data.pop(name, None)
        return data

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        return self._drop_late_defaults(handler(self))


def parse_scalar(text: str) -> Any:
    """Parse a command-line value as a YAML scalar/list (``3`` -> 3, ``[1,2]`` -> [1, 2]).

    YAML's safe loader never executes anything; it only builds plain data.
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_yaml_file(path: str | Path, *, what: str, hint: str = "", yaml_kind: str = "YAML") -> Any:
    """Parse a user's YAML file with the safe loader; a missing or broken file is one line naming it.

    ``what`` names the file for the message ("config file", "pipeline file"); ``hint`` is
    appended to the missing-file message to say what the file should contain.
    """
    path = Path(path)
    if not path.is_file():
        raise DskError(f"{what} {str(path)!r} does not exist" + (f"; {hint}" if hint else ""))
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DskError(f"{what} {str(path)!r} is not valid {yaml_kind}: {str(exc).splitlines()[0]}") from None


def parse_overrides(pairs: list[str], *, where: str = "--set") -> dict[str, Any]:
    """Turn ``["a=1", "b.c=x"]`` into ``{"a": 1, "b.c": "x"}`` (keys kept dotted)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise DskError(f"{where} expects key=value, got {pair!r}; for example --set lr=0.001")
        out[key.strip()] = parse_scalar(value)
    return out


def allowed_keys(schema: type[StageParams]) -> list[str]:
    return list(schema.model_fields)


def describe_type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(describe_type(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def build_params(
    schema: type[StageParams],
    values: Mapping[str, Any],
    *,
    where: str,
) -> StageParams:
    """Validate ``values`` against ``schema``; a problem is a one-line DskError naming the key."""
    unknown = [k for k in values if k not in schema.model_fields]
    if unknown:
        raise DskError(
            f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(allowed_keys(schema))}"
        )
    try:
        return schema(**dict(values))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err.get("loc", ()))
        key = ".".join(str(p) for p in loc) or "params"  # a model-level validator has no location
        field = schema.model_fields.get(str(loc[0])) if loc else None
        expected = describe_type(field.annotation) if field is not None else ""
        got = err.get("input")
        msg = err.get("msg", "invalid value")
        hint = f" (expected {expected})" if expected else ""
        raise DskError(f"{where}: {key}={got!r}: {msg}{hint}") from None


def params_help(schema: type[StageParams]) -> dict[str, str]:
    return {name: (f.description or "") for name, f in schema.model_fields.items()}


class TrainingFields:
    """Field definitions the training stages (`dsk pretrain`, `dsk finetune`) share, declared once.

    Each stage's schema still lists the fields itself (``grad_clip: float = TrainingFields.grad_clip``),
    so its ``--help`` keeps its own order; a field whose default differs between the stages
    (max_steps, warmup, weight decay ...) stays in that stage's schema.
    """

    grad_accum = Field(1, ge=1, description="Micro-batches per optimizer step (effective batch = batch_size * grad_accum).")
    min_lr_ratio = Field(0.1, ge=0, le=1, description="The cosine decays to lr * min_lr_ratio.")
    grad_clip = Field(1.0, ge=0, description="Clip the global gradient norm to this (0 = off).")
    precision = Field("fp32", description="fp32, bf16 autocast, or fp16 autocast with dynamic loss scaling.")
    device = Field("auto", description="Training device; auto picks cuda, then mps, then cpu.")
    log_every = Field(10, ge=1, description="Log training metrics every N steps.")
    checkpoint_every = Field(0, ge=0, description="Checkpoint every N steps (0 = off); used by --resume.")
    checkpoint_every_minutes = Field(10.0, ge=0, description="Checkpoint every N minutes (0 = off).")
    max_minutes = Field(0.0, ge=0, description="Stop cleanly after this many minutes of training (0 = no limit).")
    threads = Field(0, ge=0, description="torch CPU threads (0 = torch's default).")
