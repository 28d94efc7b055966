"""The ``growth.operators`` section of a run config: which growth operators Tamiyo may use.

Residual kernels (the blueprint catalog) are the default; widen and deepen
(:mod:`esper.operators`) are opt-in, with the sizes a decision may choose from.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    """A config section: unknown keys are errors; values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OperatorsSection(Section):
    """Which growth operators Tamiyo may use in a run, and their sizes (``growth.operators``).

    The default is today's behaviour: residual kernels only. ``widen: [0.25, 0.5, 1.0]`` lets a
    decision widen a Linear/Conv layer by 25/50/100 % of its units (at least one unit);
    ``deepen: [fresh, copy]`` lets it insert a fresh block after a layer or a copy of one.
    """

    residual: bool = True
    """Germinate residual kernels from the blueprint catalog (the default operator)."""
    widen: list[float] = Field(default_factory=list, max_length=8)
    """Widen sizes, as fractions of the layer's width (each in (0, 4]); ``[]``: no widen."""
    widen_init: Literal["random", "gradmax"] = "random"
    """How a widen's new units start: random fan-in with zero fan-out, or GradMax."""
    deepen: list[Literal["fresh", "copy"]] = Field(default_factory=list, max_length=2)
    """Deepen initialisations Tamiyo may choose; ``[]``: no deepen."""
    blend_steps: int = Field(default=30, ge=0)
    """Steps over which a widen's or a new block's α ramps from 0 to 1."""

    @field_validator("widen")
    @classmethod
    def _widen_sizes(cls, value: list[float]) -> list[float]:
        for size in value:
            if not 0 < size <= 4:
                raise ValueError(
                    f"widen size {size!r} is not a fraction of the layer's width in (0, 4]; "
                    "e.g. growth.operators.widen=[0.25,0.5,1.0]"
                )
        if len(set(value)) != len(value):
            raise ValueError(f"widen sizes {value} repeat a size; list each once")
        return sorted(value)

    @field_validator("deepen")
    @classmethod
    def _deepen_inits(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"deepen inits {value} repeat an init; list each once")
        return value

    @model_validator(mode="after")
    def _some_operator(self) -> OperatorsSection:
        if not self.residual and not self.widen and not self.deepen:
            raise ValueError(
                "no operator is enabled: set growth.operators.residual=true, widen=[0.5] or "
                "deepen=[fresh] (or growth.enabled=false)"
            )
        return self

    @property
    def grows_structure(self) -> bool:
        """Whether widen or deepen is enabled."""
        return bool(self.widen or self.deepen)
