"""Sparse drop-in replacements for ``nn.Linear`` and 1x1 ``nn.Conv2d``, run with sparse kernels.

The weight is stored as CSR (or BSR with square blocks) and multiplied with
``torch.sparse.mm``/``torch.sparse.addmm``, so only its non-zeros are read. Whether that is faster
than the dense layer depends on the sparsity, the layer size, the batch and the CPU:
:func:`compress.deploy.sparse_runtime.to_sparse_runtime` times both and converts only where it wins.

Example:
    >>> import torch
    >>> from torch import nn
    >>> dense = nn.Linear(8, 4)
    >>> with torch.no_grad():
    ...     dense.weight[:, ::2] = 0
    >>> sparse = SparseLinear(dense)
    >>> x = torch.randn(3, 8)
    >>> sparse, torch.allclose(sparse(x), dense(x), atol=1e-6)
    (SparseLinear(layout=csr, stored=0.500), True)
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

__all__ = ["SparseConv1x1", "SparseLinear", "SparseMatmul"]


class SparseMatmul(nn.Module):
    """Holds ``W`` as CSR or BSR component buffers and computes ``W @ cols + bias``.

    The components are kept as ordinary dense buffers, not as one sparse tensor, because sparse
    compressed tensors cannot be deep-copied and plain buffers make ``state_dict`` loadable with
    ``torch.load(weights_only=True)``. Assembling the sparse view in ``forward`` costs a few
    microseconds and copies no data.
    """

    crow_indices: Tensor
    col_indices: Tensor
    values: Tensor
    bias: Tensor | None

    def __init__(self, weight2d: Tensor, bias: Tensor | None, blocksize: int | None) -> None:
        super().__init__()
        weight2d = weight2d.detach()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            if blocksize is None:
                sparse = weight2d.to_sparse_csr()
            else:
                sparse = weight2d.to_sparse_bsr((blocksize, blocksize))
        self.weight_shape = tuple(weight2d.shape)
        self.blocksize = blocksize
        # Threads of the sparse kernel; 0: the process setting. One thread can beat two when
        # the kernel is short and the other core is busy (see docs/sparse_runtime.md).
        self.threads = 0
        # int32 indices: MKL's LP64 kernels take int32, so int64 indices would be converted on
        # every call (measured ~2x slower at batch 1) and would cost 4 more bytes per non-zero.
        index_dtype = torch.int32 if sparse.values().numel() < 2**31 else torch.int64
        self.register_buffer("crow_indices", sparse.crow_indices().to(index_dtype))
        self.register_buffer("col_indices", sparse.col_indices().to(index_dtype))
        self.register_buffer("values", sparse.values().clone())
        # Shaped [out, 1] once here so forward broadcasts it over the columns without a copy.
        self.register_buffer("bias", None if bias is None else bias.detach().clone()[:, None])

    @property
    def layout(self) -> str:
        return "csr" if self.blocksize is None else f"bsr{self.blocksize}x{self.blocksize}"

    def sparse_weight(self) -> Tensor:
        layout = torch.sparse_csr if self.blocksize is None else torch.sparse_bsr
        # The indices were produced by torch itself; re-checking them every call costs time.
        return torch.sparse_compressed_tensor(
            self.crow_indices,
            self.col_indices,
            self.values,
            self.weight_shape,
            layout=layout,
            check_invariants=False,
        )

    def matmul(self, cols: Tensor) -> Tensor:
        """``W @ cols (+ bias)`` for ``cols`` of shape [in, n]; returns [out, n]."""
        weight = self.sparse_weight()
        before = torch.get_num_threads()
        if not self.threads or self.threads == before:
            return self._product(weight, cols)
        torch.set_num_threads(self.threads)  # well under a microsecond each way
        try:
            return self._product(weight, cols)
        finally:
            torch.set_num_threads(before)

    def _product(self, weight: Tensor, cols: Tensor) -> Tensor:
        if self.bias is None:
            return torch.sparse.mm(weight, cols)
        return torch.sparse.addmm(self.bias, weight, cols)

    def extra_repr(self) -> str:
        density = self.values.numel() / max(1, math.prod(self.weight_shape))
        threads = f", threads={self.threads}" if self.threads else ""
        return f"layout={self.layout}, stored={density:.3f}{threads}"


class SparseLinear(SparseMatmul):
    """Drop-in replacement for ``nn.Linear`` holding a sparse weight; accepts [..., in_features].

    Computes ``(W @ x.T).T`` because MKL's sparse-times-dense kernel is the fast one; a dense
    times sparse product measured 50-70x slower on this CPU.
    """

    def __init__(self, linear: nn.Linear, blocksize: int | None = None) -> None:
        super().__init__(linear.weight, linear.bias, blocksize)
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        out = self.matmul(x.reshape(-1, self.in_features).t())
        # Contiguous like nn.Linear's output, so callers that .view() the result keep working.
        return out.t().contiguous().view(*lead, self.out_features)


class SparseConv1x1(SparseMatmul):
    """Drop-in replacement for a 1x1, stride-1, unpadded, ungrouped ``nn.Conv2d``.

    A 1x1 convolution is ``W[out, in] @ X[in, n*h*w]``; for batch 1 the input already has that
    layout, so no copy is made.
    """

    def __init__(self, conv: nn.Conv2d, blocksize: int | None = None) -> None:
        super().__init__(conv.weight.flatten(1), conv.bias, blocksize)
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        n, c, h, w = x.shape
        out = self.matmul(x.transpose(0, 1).reshape(c, n * h * w))
        out = out.view(self.out_channels, n, h, w).transpose(0, 1).contiguous()
        return out.squeeze(0) if unbatched else out
