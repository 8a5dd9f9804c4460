"""The one rule for text that reaches a terminal, a URL or a document, as the metadata schema states it.

The schema's `text` definition refuses C0 and C1 controls (so escape sequences), bidi
marks, overrides and isolates, and lone surrogates (the stand-ins for bytes that were
not UTF-8). Loading it needs only json: the commands that check a name early (upload's
object names, every message rendered) do not pay for jsonschema.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from importlib import resources
from typing import Any, cast


@functools.cache
def metadata_schema() -> Mapping[str, Any]:
    """The published JSON Schema (parsed once; do not modify it)."""
    text = resources.files("imagetool").joinpath("schemas/metadata.schema.json").read_text()
    return cast(dict[str, Any], json.loads(text))


@functools.cache
def unsafe() -> re.Pattern[str]:
    """The characters the schema's `text` refuses."""
    return re.compile(metadata_schema()["$defs"]["text"]["not"]["pattern"])


def unsafe_character(text: str) -> str | None:
    """The first character of `text` that must not reach a terminal raw, if any."""
    found = unsafe().search(text)
    return found.group() if found else None
