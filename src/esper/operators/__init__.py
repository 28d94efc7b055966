"""Growth operators: how a seed's kernel changes the host (widen; deepen; residual kernels).

Widen (:mod:`esper.operators.widen`): *k* more units in a Linear/Conv layer and the matching
inputs of its consumer, blended in with α and merged into plain wider modules on fossilize.
"""

from esper.operators.widen import WidenGraft
from esper.operators.widen_init import WIDEN_INITS, GradMaxBatch
from esper.operators.widenings import Widenings

__all__ = ["WIDEN_INITS", "GradMaxBatch", "WidenGraft", "Widenings"]
