"""Deployment: atomic files, exports (sparse, pt2, ONNX, pruned), the sparse runtime."""
