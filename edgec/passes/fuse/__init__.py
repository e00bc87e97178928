"""Fusion and lowering passes: subgraphs recognised by the structure analyses become the single ops
(or the clean forms) a runtime runs best. Which of them run is chosen per backend, by its lowering
pipeline, never baked into the IR."""

from edgec.passes.fuse.expand_dequantize import ExpandDequantizePass
from edgec.passes.fuse.fuse_bias_gelu import FuseBiasGeluPass
from edgec.passes.fuse.fuse_gelu import FuseGeluPass
from edgec.passes.fuse.fuse_integer_matmul import FuseIntegerMatmulPass
from edgec.passes.fuse.fuse_layer_norm import FuseLayerNormPass
from edgec.passes.fuse.fuse_skip_norm import FuseSkipNormPass
from edgec.passes.fuse.lower_attention import LowerAttentionPass
from edgec.passes.fuse.pack_qkv import PackQkvPass
from edgec.passes.fuse.residual_sum import ResidualSumPass

PASSES = [FuseLayerNormPass, FuseGeluPass, LowerAttentionPass, PackQkvPass, FuseSkipNormPass, FuseBiasGeluPass,
          FuseIntegerMatmulPass, ExpandDequantizePass, ResidualSumPass]
