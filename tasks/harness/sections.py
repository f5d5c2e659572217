"""The building blocks of every params section: a frozen pydantic model that rejects unknown
keys, and the value types the sections share."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]

# Characters a shell gives a meaning to (dvc.yaml interpolates path params into `cmd` lines),
# control characters, and a leading `-` (it would read as an option).
_SHELL_META = set("$`'\"\\;&|<>(){}[]*?!#~\n\r\t\0")


def _safe_path(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a path, not empty")
    bad = sorted({c for c in value if c in _SHELL_META or ord(c) < 32})
    if bad:
        raise ValueError(
            f"{value!r} is not a plain path: remove {' '.join(repr(c) for c in bad)} "
            "(shell metacharacters are refused)"
        )
    if value.startswith("-"):
        raise ValueError(f"{value!r} is not a plain path: it starts with '-'")
    return value


SafePath = Annotated[str, AfterValidator(_safe_path)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Side = Annotated[int, Field(ge=32, le=1024)]  # one side of the model input, px
Rate = Annotated[float, Field(ge=0, le=1)]
