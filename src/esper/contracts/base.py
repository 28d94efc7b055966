"""Base class of every contract: frozen, strict about unknown fields, versioned."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 1
"""Version of the contract schemas defined in this package."""


class Contract(BaseModel):
    """A frozen Pydantic model that crosses a component boundary.

    Unknown fields are rejected (``extra="forbid"``) so a producer and a consumer that disagree on
    a schema fail loudly instead of silently dropping data; ``schema_version`` lets a consumer
    recognise a message written by a newer producer.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
