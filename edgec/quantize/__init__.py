"""Static quantization support: calibration statistics of a float model and the ranges they give."""

from edgec.quantize.calibrate import DTYPES, METHODS, Calibration, TensorStats, calibrate

__all__ = ["DTYPES", "METHODS", "Calibration", "TensorStats", "calibrate"]
