"""loopax: differentiable while loops for JAX."""

import importlib.metadata

from ._buffer import Buffer as Buffer, buffer_at_set as buffer_at_set
from ._fori_loop import fori_loop as fori_loop
from ._scan import scan as scan
from ._schedule import Schedule as Schedule, schedule as schedule
from ._while_loop import while_loop as while_loop


__version__ = importlib.metadata.version("loopax")
