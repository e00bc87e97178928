"""Quantization passes: static full-integer QDQ from calibration ranges, SmoothQuant scale migration, and
the approximations quantization hides."""

from edgec.passes.quantize.approximate_gelu import ApproximateGeluPass
from edgec.passes.quantize.insert_qdq import InsertQdqPass
from edgec.passes.quantize.smooth_quant import SmoothQuantPass

PASSES = [InsertQdqPass, SmoothQuantPass, ApproximateGeluPass]
