"""Pure checkpointing policy: the online rule of the forward sweep, the offline
(revolve) rule of the backward sweep, `schedule`, which counts and replays both, and
the planning arithmetic (budgets in bytes, default counts, the bounded kind's nesting).

Nothing here imports the rest of loopax (a test checks): pytrees and buffers are the
front ends' business (`loopax._planning` measures carries)."""

from .bounded import bounded_plan as bounded_plan
from .budget import (
    checkpoints_for_bytes as checkpoints_for_bytes,
    default_checkpoints as default_checkpoints,
    format_bytes as format_bytes,
    parse_memory_budget as parse_memory_budget,
)
from .counts import (
    Counts as Counts,
    online_positions as online_positions,
    revolve_positions as revolve_positions,
    schedule_counts as schedule_counts,
)
from .offline import (
    beta as beta,
    revolve_cost as revolve_cost,
    revolve_forward_slots as revolve_forward_slots,
    revolve_split as revolve_split,
)
from .online import (
    OnlineState as OnlineState,
    forward_slots as forward_slots,
    online_init as online_init,
    online_step as online_step,
)
from .replay import Schedule as Schedule, schedule as schedule
from .reverse import (
    ReverseAction as ReverseAction,
    ReverseState as ReverseState,
    Segment as Segment,
    eager_reverse as eager_reverse,
    plain_advances as plain_advances,
    reverse_done as reverse_done,
    reverse_init as reverse_init,
    reverse_step as reverse_step,
)
from .suggest import suggest_checkpoints as suggest_checkpoints
