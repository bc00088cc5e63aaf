"""`dsk augment` parameters: the op pipeline, how many copies, and how to read the input.

    $ dsk augment --copies 2 --set 'ops=[{type: RandomSwap, params: {rate: 0.1}}]'
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator

from dsk.config import StageParams


class Params(StageParams):
    ops: Optional[Union[list[Any], str]] = Field(
        None,
        description="Op pipeline: a list of {type, params, p} (JSON/YAML), or a path to a JSON/YAML "
        "file holding one. Default: EDA at 0.1 (text), rotation+flip+noise (image), "
        "jitter+scaling+time warp (series). `python -m dsk.data.augment_ops` lists the ops.",
    )
    modality: Literal["auto", "text", "image", "series"] = Field(
        "auto", description="What the input holds; auto: text artifacts are text, PNG folders and "
        "[N,H,W,C] arrays are images, [N,T] arrays are series ([N,T,C] is ambiguous: say which)."
    )
    copies: int = Field(1, ge=1, le=100, description="Augmented variants per example (originals are kept too).")
    keep_originals: bool = Field(True, description="Write the original examples alongside the variants.")
    text_format: Literal["auto", "plain", "chat"] = Field(
        "auto", description="auto: JSON chat/instruction records augment only their user turns, other "
        "documents as plain text; chat: every document must be such a record; plain: never parse JSON."
    )
    synonyms: Optional[str] = Field(
        None, description="Synonym table (word<TAB>synonyms, .tsv or .tsv.gz). Default: the WordNet-derived table shipped with dsk."
    )
    batch_size: int = Field(256, ge=1, le=65536, description="Images/series per batch (MixUp/CutMix partners come from the same batch).")

    @field_validator("ops")
    @classmethod
    def _valid_ops(cls, value: Any) -> Any:
        # validate inline pipelines now, so a pipeline file fails before any stage runs;
        # a file path is validated when the stage reads it
        if isinstance(value, list):
            from dsk.data.augment_ops import parse_ops

            parse_ops(value, where="augment ops")
        return value
