"""Approximate replacements of attention: cheaper forms that change what the model computes. Each
pass class has `approximate = True`; the compile measures their error on calibration data and refuses
them when they break the accuracy budget."""

from edgec.passes.replace.linear_attention import LinearAttentionPass
from edgec.passes.replace.sliding_window import SlidingWindowAttentionPass

PASSES = [SlidingWindowAttentionPass, LinearAttentionPass]
