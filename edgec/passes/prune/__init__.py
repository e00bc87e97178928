"""Structured pruning: passes that remove whole attention heads and FFN neurons from the recognised
blocks, leaving smaller dense matrices that run faster on every backend. Each pass has
`approximate = True`: the compile measures the error on data the refit did not see (--inputs, or
calibration samples held out from it) and refuses what breaks the accuracy budget."""

from edgec.passes.prune.remove_attention_heads import RemoveAttentionHeadsPass
from edgec.passes.prune.remove_ffn_neurons import RemoveFfnNeuronsPass

PASSES = [RemoveAttentionHeadsPass, RemoveFfnNeuronsPass]
