"""Cleanup passes: what every real export needs before anything else (folding, dead code, no-ops)."""

from edgec.passes.cleanup.eliminate_common_subexpressions import EliminateCommonSubexpressionsPass
from edgec.passes.cleanup.fold_constants import FoldConstantsPass
from edgec.passes.cleanup.remove_dead_code import RemoveDeadCodePass
from edgec.passes.cleanup.remove_identity import RemoveIdentityPass
from edgec.passes.cleanup.remove_redundant_casts import RemoveRedundantCastsPass
from edgec.passes.cleanup.remove_redundant_reshapes import RemoveRedundantReshapesPass
from edgec.passes.cleanup.remove_redundant_transposes import RemoveRedundantTransposesPass
from edgec.passes.cleanup.simplify_shapes import SimplifyShapesPass

PASSES = [
    FoldConstantsPass,
    SimplifyShapesPass,
    RemoveIdentityPass,
    RemoveRedundantCastsPass,
    RemoveRedundantReshapesPass,
    RemoveRedundantTransposesPass,
    EliminateCommonSubexpressionsPass,
    RemoveDeadCodePass,
]
