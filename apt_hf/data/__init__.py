"""Dataset builders for the examples, benchmarks and recipes."""

from .multidigits import MultiDigits, make_multidigits

__all__ = ["MultiDigits", "make_multidigits"]
