"""Type aliases shared across loopax."""

from typing import Literal


Kind = Literal["lax", "checkpointed", "bounded"]
KINDS: tuple[Kind, ...] = ("lax", "checkpointed", "bounded")
