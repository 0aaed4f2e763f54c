"""Lightning callbacks that drive a compress controller."""

from callbacks.compression import CompressionCallback

__all__ = ["CompressionCallback"]
