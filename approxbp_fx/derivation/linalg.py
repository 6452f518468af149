"""Small dense linear algebra on lists of mpmath (or float) numbers.

mpmath.matrix's element access costs more than the arithmetic at these sizes
(at most 17 x 17), so the derivation works on plain lists.
"""

from __future__ import annotations


def solve(A, B):
    """Solve ``A X = B`` (``B`` a list of columns) by Gaussian elimination
    with partial pivoting; raises ZeroDivisionError if ``A`` is singular."""
    n = len(A)
    M = [list(row) + [col[i] for col in B] for i, row in enumerate(A)]
    for k in range(n):
        p = max(range(k, n), key=lambda i: abs(M[i][k]))
        if not M[p][k]:
            raise ZeroDivisionError("singular system")
        M[k], M[p] = M[p], M[k]
        piv = M[k][k]
        rowk = M[k][k:]
        for i in range(k + 1, n):
            f = M[i][k] / piv
            if f:
                M[i][k:] = [x - f * y for x, y in zip(M[i][k:], rowk)]
    X = [[None] * n for _ in B]
    for b in range(len(B)):
        col = n + b
        for i in range(n - 1, -1, -1):
            s = M[i][col] - sum(M[i][j] * X[b][j] for j in range(i + 1, n))
            X[b][i] = s / M[i][i]
    return X


def is_positive_definite(H) -> bool:
    """Cholesky succeeds (strictly positive pivots)."""
    n = len(H)
    L = [[None] * n for _ in range(n)]
    for j in range(n):
        d = H[j][j] - sum(L[j][k] ** 2 for k in range(j))
        if not d > 0:
            return False
        L[j][j] = d**0.5
        for i in range(j + 1, n):
            L[i][j] = (H[i][j] - sum(L[i][k] * L[j][k] for k in range(j))) / L[j][j]
    return True
