"""Operators: the ways a model grows beyond residual kernels (DEEPEN: new blocks in the host)."""

from esper.operators.deepen import DEEPEN_GROUP, BlockGrowth, InsertedBlock
from esper.operators.growing_block import GrowingBlock
from esper.operators.new_blocks import OUTPUT_PROJECTIONS

__all__ = ["DEEPEN_GROUP", "OUTPUT_PROJECTIONS", "BlockGrowth", "GrowingBlock", "InsertedBlock"]
