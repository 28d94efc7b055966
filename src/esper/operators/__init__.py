"""Growth operators: how the host grows beyond residual kernels (widen; deepen).

Widen (:mod:`esper.operators.widen`): *k* more units in a Linear/Conv layer and the matching
inputs of its consumer, blended in with α and merged into plain wider modules on fossilize.
Deepen (:mod:`esper.operators.deepen`): new blocks in the host, blended in from α = 0.
"""

from esper.operators.deepen import DEEPEN_GROUP, BlockGrowth, InsertedBlock
from esper.operators.growing_block import GrowingBlock
from esper.operators.new_blocks import OUTPUT_PROJECTIONS
from esper.operators.widen import WidenGraft
from esper.operators.widen_init import WIDEN_INITS, GradMaxBatch
from esper.operators.widenings import Widenings

__all__ = [
    "DEEPEN_GROUP",
    "OUTPUT_PROJECTIONS",
    "WIDEN_INITS",
    "BlockGrowth",
    "GradMaxBatch",
    "GrowingBlock",
    "InsertedBlock",
    "WidenGraft",
    "Widenings",
]
