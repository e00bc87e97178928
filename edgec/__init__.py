"""edgec: a compiler that puts transformer models on edge hardware."""

__version__ = "0.1.0"
