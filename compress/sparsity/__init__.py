"""Unstructured sparsity: magnitude, RB and const algorithms, importance criteria, allocation."""
