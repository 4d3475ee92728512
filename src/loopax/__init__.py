"""loopax: differentiable while loops for JAX."""

from importlib.metadata import version as _version

from ._buffer import Buffer as Buffer, buffer_at_set as buffer_at_set
from ._check_buffers import BufferContractError as BufferContractError
from ._fori_loop import fori_loop as fori_loop
from ._planning import (
    Schedule as Schedule,
    checkpoints_for_budget as checkpoints_for_budget,
    schedule as schedule,
    suggest_checkpoints as suggest_checkpoints,
)
from ._scan import scan as scan
from ._while_loop import while_loop as while_loop


__version__ = _version("loopax")
