"""Deployment: atomic files, exports (sparse, pt2, ONNX, OpenVINO, pruned), the sparse runtime."""
