"""Pure checkpointing policy: the online rule of the forward sweep, the offline
(revolve) rule of the backward sweep, and `schedule`, which replays both."""

from .budget import (
    carry_bytes as carry_bytes,
    checkpoints_for_budget as checkpoints_for_budget,
    parse_memory_budget as parse_memory_budget,
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
    plain_advances as plain_advances,
    reverse_done as reverse_done,
    reverse_init as reverse_init,
    reverse_step as reverse_step,
)
from .suggest import suggest_checkpoints as suggest_checkpoints
