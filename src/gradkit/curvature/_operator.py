"""``LinearOperator``: a symmetric ``n x n`` matrix we can only multiply by.

Every algorithm in :mod:`gradkit.curvature` (Lanczos, power iteration, Hutchinson, Hutch++,
stochastic Lanczos quadrature, conjugate gradient) is written once against this type. A
subclass implements ``_matmat(V)`` for a block ``V`` of shape ``(n, k)``; the base class
handles vectors, dtype/device conversion, the matvec counter, dense materialisation and the
diagonal "sandwich" ``D A D``.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LinearOperator:
    """Base class of symmetric matrices known through products.

    Subclasses call ``super().__init__(n, dtype, device)`` and implement
    ``_matmat(V: Tensor) -> Tensor`` for ``V`` of shape ``(n, k)`` with the operator's dtype
    and device, returning ``(n, k)``.

    Args:
        n: the size (the matrix is ``n x n``).
        dtype: dtype of the products (inputs are converted to it).
        device: device of the products.

    Attributes:
        shape: ``(n, n)``.
        num_matvecs: number of matrix-vector products computed so far (a block of ``k``
            columns counts ``k``); :meth:`reset_matvecs` sets it back to 0.

    Example::

        >>> import torch
        >>> from gradkit.curvature import LinearOperator, lanczos
        >>> class Diagonal(LinearOperator):
        ...     def __init__(self, d):
        ...         super().__init__(d.shape[0], d.dtype)
        ...         self.d = d
        ...     def _matmat(self, V):
        ...         return self.d[:, None] * V
        >>> A = Diagonal(torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64))
        >>> A @ torch.ones(3, dtype=torch.float64)
        tensor([ 3., -1.,  2.], dtype=torch.float64)
        >>> round(float(lanczos(A, 1)[0][0]), 6), A.num_matvecs > 0
        (3.0, True)
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        if n < 1:
            raise ValueError(f"Invalid operator size: {n}")
        self.shape: tuple[int, int] = (int(n), int(n))
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_matvecs = 0

    def _matmat(self, V: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _matmat(V)")

    def reset_matvecs(self) -> None:
        self.num_matvecs = 0

    def matmat(self, V: Tensor) -> Tensor:
        """``A @ V`` for ``V`` of shape ``(n, k)``."""
        if V.ndim != 2 or V.shape[0] != self.shape[0]:
            raise ValueError(
                f"expected a matrix of shape ({self.shape[0]}, k), got {tuple(V.shape)}"
            )
        V = V.to(dtype=self.dtype, device=self.device)
        if V.shape[1] == 0:
            return V.clone()
        self.num_matvecs += V.shape[1]
        return self._matmat(V)

    def matvec(self, v: Tensor) -> Tensor:
        """``A @ v`` for ``v`` of shape ``(n,)``."""
        if v.ndim != 1:
            raise ValueError(f"expected a vector of shape ({self.shape[0]},), got {tuple(v.shape)}")
        return self.matmat(v.unsqueeze(1)).squeeze(1)

    def __matmul__(self, other: Tensor) -> Tensor:
        if not isinstance(other, Tensor):
            return NotImplemented
        return self.matvec(other) if other.ndim == 1 else self.matmat(other)

    def to_dense(self, chunk_size: int = 256) -> Tensor:
        """The ``n x n`` matrix, built from products with blocks of ``chunk_size`` columns of
        the identity (``n`` products)."""
        n = self.shape[0]
        cols = []
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            E = torch.zeros(n, stop - start, dtype=self.dtype, device=self.device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            cols.append(self.matmat(E))
        return torch.cat(cols, dim=1)

    def sandwich(self, d: Tensor) -> LinearOperator:
        """The operator ``D A D`` with ``D = diag(d)`` (e.g. ``P^{-1/2} H P^{-1/2}``)."""
        return SandwichOperator(self, d)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


class MatrixOperator(LinearOperator):
    """A dense symmetric matrix seen as a :class:`LinearOperator` (tests, small problems).

    Args:
        matrix: a square symmetric tensor (symmetry is not checked).

    Example::

        >>> import torch
        >>> from gradkit.curvature import MatrixOperator
        >>> A = MatrixOperator(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        >>> A @ torch.tensor([1.0, 1.0]), A.num_matvecs
        (tensor([3., 3.]), 1)
    """

    def __init__(self, matrix: Tensor):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V


class SandwichOperator(LinearOperator):
    """``diag(d) A diag(d)``; symmetric whenever ``A`` is (built by
    :meth:`LinearOperator.sandwich`, e.g. ``P^{-1/2} H P^{-1/2}`` for a diagonal
    preconditioner ``P``).

    Args:
        op: the operator ``A``.
        d: the diagonal ``(n,)``.

    Example::

        >>> import torch
        >>> from gradkit.curvature import MatrixOperator
        >>> A = MatrixOperator(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        >>> A.sandwich(torch.tensor([1.0, 2.0])).to_dense()
        tensor([[2., 2.],
                [2., 8.]])
    """

    def __init__(self, op: LinearOperator, d: Tensor):
        if d.ndim != 1 or d.shape[0] != op.shape[0]:
            raise ValueError(f"expected d of shape ({op.shape[0]},), got {tuple(d.shape)}")
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op = op
        self.d = d.to(dtype=op.dtype, device=op.device).reshape(-1, 1)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.d * self.op.matmat(self.d * V)
