"""The building blocks of every params section: a frozen pydantic model that rejects unknown
keys, and the value types the sections share."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

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


def _side_or_rectangle(v):
    """`128` is the square (128, 128); `[320, 256]` is (width, height)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) != 2:
        raise ValueError(f"expected one side or [width, height], found {list(v)}")
    return v


# a model input, px: one side (a square) or [width, height]; read as (width, height)
InputSize = Annotated[tuple[Side, Side], BeforeValidator(_side_or_rectangle)]


def stride_problem(key: str, size: tuple[int, int], stride: int, family: str) -> str | None:
    """Why the input `size` (width, height) at params key `key` does not fit a model family
    whose input sides must be multiples of `stride`; None when it fits."""
    w, h = size
    if not (w % stride or h % stride):
        return None
    near = [max(stride, round(d / stride) * stride) for d in (w, h)]
    example = near[0] if near[0] == near[1] else near
    return (
        f"{key}: [{w}, {h}] (width, height) is not a multiple of {stride}, the stride of model "
        f"family {family!r}; use multiples of {stride}, e.g. {example}"
    )


Rate = Annotated[float, Field(ge=0, le=1)]
