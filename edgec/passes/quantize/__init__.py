"""Quantization passes: static full-integer QDQ from calibration ranges, and SmoothQuant scale migration."""

from edgec.passes.quantize.insert_qdq import InsertQdqPass
from edgec.passes.quantize.smooth_quant import SmoothQuantPass

PASSES = [InsertQdqPass, SmoothQuantPass]
