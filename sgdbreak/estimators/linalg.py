"""Matrix-free symmetric eigensolvers and trace estimators on a matvec.

Everything here is model-agnostic: an operator is a callable that maps a 1-D tensor of
length ``dim`` to another (for sgdbreak, a Hessian-vector product). Small dense problems
(projected matrices, Gram matrices) are solved in float64.

The default eigensolver is a Lanczos-type Rayleigh-Ritz iteration with full
reorthogonalisation that can start from a *block* of previous eigenvectors: the top
eigenvectors of a training loss move slowly, so a warm start needs a few products
instead of the tens a cold start needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import NonFiniteMeasurement

__all__ = ["EigenResult", "TraceResult", "as_linear_operator", "hutchinson_trace", "lanczos", "power_iteration"]

Matvec = Callable[[Tensor], Tensor]

_WHICH = ("LA", "LM", "SA")


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: float64 tensor (k,), ordered by ``which`` (descending for "LA").
        eigenvectors: (k, dim) tensor, unit rows, in the operator's dtype.
        residuals: float64 tensor (k,), ‖A v − θ v‖ for each pair.
        num_matvecs: operator applications spent.
        converged: whether every requested pair met the tolerance.
        error_bounds: float64 tensor (k,), estimated |θ − λ| (residual, sharpened by
            the spectral gap where the Ritz values give one).
        restart_vectors: the top Ritz vectors (up to k + 2) of the final basis: the warm
            start for the next measurement (more than k, so a swap of the top
            eigenvectors between measurements is caught by the Rayleigh-Ritz step).
        estimates: ``(products so far, first Ritz value)`` after every Rayleigh-Ritz
            step of :func:`lanczos` (empty for :func:`power_iteration`): how fast the
            estimate converged, as opposed to when the stopping test fired.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    num_matvecs: int
    converged: bool
    error_bounds: Tensor
    restart_vectors: Tensor | None = None
    estimates: tuple[tuple[int, float], ...] = ()

    @property
    def start_vectors(self) -> Tensor:
        """What a warm start begins from: ``restart_vectors`` where kept, else the eigenvectors."""
        return self.restart_vectors if self.restart_vectors is not None else self.eigenvectors


@dataclass(frozen=True)
class TraceResult:
    """A stochastic trace estimate with its standard error."""

    value: float
    stderr: float
    num_matvecs: int
    samples: Tensor


def _check_dim_k(dim: int, k: int) -> None:
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if k > dim:
        raise ValueError(f"k={k} is larger than the operator dimension {dim}")


def _check_common(which: str, tol: float, max_matvecs: int) -> None:
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    if not isinstance(max_matvecs, int) or max_matvecs < 1:
        raise ValueError(f"max_matvecs must be an int >= 1, got {max_matvecs!r}")


def _order(theta: Tensor, which: str) -> Tensor:
    """Indices of Ritz values, most wanted first."""
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def _random_vector(dim: int, dtype, device, generator) -> Tensor:
    return torch.randn(dim, dtype=dtype, device="cpu", generator=generator).to(device)


def _orthogonalize_(w: Tensor, basis: Tensor) -> Tensor:
    """Classical Gram-Schmidt of ``w`` against the rows of ``basis``, in place, repeated once if needed (DGKS).

    The second pass runs only when the first removed most of ``w`` (its norm fell below
    1/√2 of what it was): rounding may then have left components along the basis.
    Otherwise one pass is as accurate ("twice is enough") and the basis is read once.
    """
    if basis.shape[0] == 0:
        return w
    before = torch.linalg.vector_norm(w)
    w.addmv_(basis.T, basis @ w, alpha=-1.0)  # one pass over the basis, no temporary
    if torch.linalg.vector_norm(w) < 0.7071 * before:
        w.addmv_(basis.T, basis @ w, alpha=-1.0)
    return w


class _Basis:
    """The Lanczos basis V and its images AV, rows of two buffers.

    New vectors are written straight into the rows after V (``stage``), multiplied into
    the matching rows of AV and then ``commit``-ted: no vector of length ``dim`` is
    allocated, stacked or copied on the way (on CPU a fresh one costs its page faults,
    about as much as a pass over it). On CPU both buffers hold ``max_rows`` rows from the
    start: pages of an unwritten ``torch.empty`` are not resident, so memory is still that
    of the vectors held, and the basis is never copied into a larger buffer. Elsewhere
    (``grow``) capacity doubles as needed, up to ``max_rows``.
    """

    def __init__(self, dim: int, max_rows: int, dtype, device, initial: int = 4, grow: bool | None = None):
        self.max_rows = max_rows
        grow = torch.device(device).type != "cpu" if grow is None else grow
        cap = min(max_rows, max(initial, 1)) if grow else max_rows
        self._v = torch.empty(cap, dim, dtype=dtype, device=device)
        self._av = torch.empty(cap, dim, dtype=dtype, device=device)
        self.size = 0  # rows of V (multiplied)
        self.staged = 0  # rows written after them, not yet multiplied

    @property
    def V(self) -> Tensor:
        return self._v[: self.size]

    @property
    def AV(self) -> Tensor:
        return self._av[: self.size]

    @property
    def pending(self) -> Tensor:
        """The staged vectors, rows after V."""
        return self._v[self.size : self.size + self.staged]

    @property
    def pending_images(self) -> Tensor:
        """The rows of AV their images go into."""
        return self._av[self.size : self.size + self.staged]

    def stage(self) -> Tensor:
        """The next free row of V (a view), to write a new vector into."""
        need = self.size + self.staged + 1
        if need > self.max_rows:
            raise RuntimeError("Lanczos basis full")  # callers restart first
        if need > self._v.shape[0]:
            cap = min(self.max_rows, max(need, 2 * self._v.shape[0]))
            for name in ("_v", "_av"):
                old = getattr(self, name)
                new = old.new_empty(cap, old.shape[1])
                new[: need - 1] = old[: need - 1]
                setattr(self, name, new)
        self.staged += 1
        return self._v[need - 1]

    def unstage(self) -> None:
        """Drop the last staged row (a rejected vector)."""
        self.staged -= 1

    def commit(self) -> int:
        """The staged vectors, their images written, join V. Returns how many."""
        b, self.size, self.staged = self.staged, self.size + self.staged, 0
        return b

    def replace(self, v: Tensor, av: Tensor) -> None:
        """Restart: the basis becomes the rows of ``v``, with images ``av`` (nothing staged)."""
        self.size, self.staged = v.shape[0], 0
        self._v[: self.size] = v
        self._av[: self.size] = av


def _as_start_block(init, dim: int, dtype, device) -> list[Tensor]:
    if init is None:
        return []
    if isinstance(init, EigenResult):
        init = init.start_vectors
    if isinstance(init, Tensor):
        block = init.reshape(1, -1) if init.dim() == 1 else init
    elif isinstance(init, Sequence):
        block = torch.stack([torch.as_tensor(v).reshape(-1) for v in init])
    else:
        raise TypeError(f"init must be a tensor, a sequence of tensors or an EigenResult, got {type(init).__name__}")
    if block.dim() != 2 or block.shape[1] != dim:
        raise ValueError(f"init vectors must have length {dim}, got shape {tuple(block.shape)}")
    # A nan or inf shows in a row's maximum or minimum (nan propagates); no float64 copy.
    if not bool((torch.isfinite(block.amax(dim=1)) & torch.isfinite(block.amin(dim=1))).all()):
        raise NonFiniteMeasurement("init vectors contain non-finite values")
    return [row.to(dtype=dtype, device=device) for row in block]


def _apply_block(matvec: Matvec, block: Tensor, out: Tensor) -> None:
    """Write A x into ``out``'s rows for every row x of ``block`` (one batched call when the operator has ``matmat``)."""
    dim = block.shape[1]

    def check(image: Tensor, shape: tuple[int, ...]) -> Tensor:
        if tuple(image.shape) != shape:
            raise ValueError(f"matvec returned shape {tuple(image.shape[len(shape) - 1:])}, expected {(dim,)}")
        return image

    matmat = getattr(matvec, "matmat", None)
    if block.shape[0] > 1 and matmat is not None:
        out.copy_(check(matmat(block), tuple(block.shape)))
        return
    for x, row in zip(block, out):
        row.copy_(check(matvec(x), (dim,)))


def lanczos(
    matvec: Matvec,
    dim: int,
    k: int = 1,
    *,
    which: str = "LA",
    tol: float = 1e-3,
    max_matvecs: int = 100,
    init=None,
    max_basis: int | None = None,
    block_size: int | None = None,
    convergence: str = "eigenvalue",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> EigenResult:
    """Top-k eigenpairs of a symmetric operator by Lanczos with Rayleigh-Ritz.

    Builds an orthonormal basis (full reorthogonalisation) and, after every product,
    solves the projected problem in float64. Started from one vector this is exactly
    Lanczos; started from a block (``init``: previous eigenvectors) the first products
    are spent on the block and the basis then grows with the residual of the first
    unconverged Ritz vector (Krylov directions), so a slowly moving eigenvector costs
    one or two extra products. When the basis reaches ``max_basis`` it is thick-restarted
    from the best Ritz vectors, which bounds memory to ``2 * max_basis`` vectors.

    Args:
        matvec: v ↦ A v for a symmetric A, on 1-D tensors of length ``dim``.
        dim: operator dimension.
        k: number of eigenpairs.
        which: "LA" largest algebraic (default: the top Hessian eigenvalue even when a
            larger negative one exists), "LM" largest magnitude, "SA" smallest algebraic.
        tol: relative accuracy target, compared with ``error_bound / max|θ|``.
        max_matvecs: budget of products; the best estimate so far is returned with
            ``converged=False`` when it runs out.
        init: warm start: an :class:`EigenResult`, a (m, dim) tensor or a sequence of
            vectors. Without it, a random start from ``generator``.
        max_basis: basis size before a thick restart (default ``max(20, 2k + 10)``).
        block_size: minimum size of the start block, padded with random vectors
            (default k). Exactly repeated eigenvalues are found up to this multiplicity.
        convergence: "eigenvalue" stops when min(‖r‖, ‖r‖²/gap) is small (the error of
            the eigenvalue, gap from the other Ritz values); "residual" when ‖r‖ is
            small (a rigorous bound, also on the eigenvector; costs more products).
        dtype, device: of the vectors passed to ``matvec``.
        generator: seeds the random start and restarts on invariant subspaces.

    Returns:
        An :class:`EigenResult`.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 1.0, -5.0]))
        >>> lanczos(lambda v: A @ v, 3, tol=1e-8).eigenvalues.round(decimals=6)
        tensor([3.], dtype=torch.float64)
    """
    _check_dim_k(dim, k)
    _check_common(which, tol, max_matvecs)
    if convergence not in ("eigenvalue", "residual"):
        raise ValueError(f"convergence must be 'eigenvalue' or 'residual', got {convergence!r}")
    max_basis = max(20, 2 * k + 10) if max_basis is None else max_basis
    if max_basis < k + 2 and max_basis < dim:
        raise ValueError(f"max_basis={max_basis} must be at least k + 2 = {k + 2}")
    max_basis = min(max_basis, dim)

    # The start block, written straight into the basis: the warm-start vectors, orthonormalised
    # (each scaled first: a huge vector's norm overflows), padded with random vectors up to
    # ``block_size`` (default k): a single Krylov sequence cannot see the second copy of a
    # repeated eigenvalue, a block can. At most max_basis - 1 of them, and max_matvecs.
    block_size = k if block_size is None else block_size
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    start = _as_start_block(init, dim, dtype, device)
    cap = min(max_basis - 1, max(1, max_matvecs)) if max_basis > 1 else 1
    basis = _Basis(dim, max_basis, dtype, device, initial=max(len(start), block_size) + 3)
    for v in start:
        if basis.staged >= cap:
            break
        row = basis.stage()
        row.copy_(v)
        peak = row.abs().max()
        if 0 < peak < math.inf:
            row.div_(peak)
        _orthogonalize_(row, basis.pending[:-1])
        n = row.norm()
        if n > 1e-6 * max(1.0, row.abs().max().item()):
            row.div_(n)
        else:
            basis.unstage()
    while basis.staged < min(block_size, dim, cap):
        row = basis.stage()
        row.copy_(_random_vector(dim, dtype, device, generator))
        _orthogonalize_(row, basis.pending[:-1])
        row.div_(row.norm())

    T = torch.zeros(0, 0, dtype=torch.float64)  # projected matrix V^T A V
    num = 0
    best = None
    estimates: list[tuple[int, float]] = []
    while True:
        # Multiply the staged vectors (the start block in one batched call when the
        # operator allows) and extend the projected matrix.
        _apply_block(matvec, basis.pending, basis.pending_images)
        b = basis.commit()
        num += b
        m = basis.size
        images = basis.AV[m - b :]
        # V^T A v for the new vectors; a nan or inf in an image lands here (no extra pass).
        new_cols = (basis.V @ images[0] if b == 1 else basis.V @ images.T).reshape(m, b).double().cpu()
        if not bool(torch.isfinite(new_cols).all()):
            raise NonFiniteMeasurement("matvec returned non-finite values")
        T_new = torch.zeros(m, m, dtype=torch.float64)
        T_new[: m - b, : m - b] = T
        T_new[:, m - b :] = new_cols
        T_new[m - b :, :] = new_cols.T
        T = T_new

        # Rayleigh-Ritz on span(V).
        theta, Y = torch.linalg.eigh(0.5 * (T + T.T))
        order = _order(theta, which)
        theta, Y = theta[order], Y[:, order]
        kk = min(k, m)
        estimates.append((num, theta[0].item()))
        # Ritz pairs k + 1 and k + 2 too: their values enter the gap estimate, and their
        # vectors are kept as the next warm start (eigenvectors swap order in training).
        # Residuals A V y - θ V y of the wanted pairs only, straight from the two buffers
        # (no Ritz vectors needed); norms in the vectors' dtype (a float64 copy cost more).
        # With one wanted pair its residual is computed in the next free row, where it is
        # the next vector if the solve goes on.
        nr = min(m, k + 2)
        Yr = Y[:, :nr].to(dtype=dtype, device=device)
        Yw = Yr[:, :kk]
        theta_w = theta[:kk].to(dtype=dtype, device=device)
        in_place = kk == 1 and m < max_basis
        out = basis.stage().unsqueeze(0) if in_place else None
        resid_vecs = torch.mm(Yw.T, basis.AV, out=out).addmm_((Yw * theta_w).T, basis.V, alpha=-1.0)
        res = torch.linalg.vector_norm(resid_vecs, dim=1).double().cpu()
        bounds = _error_bounds(theta[:nr], res, kk, convergence)
        scale = max(theta.abs().max().item(), torch.finfo(dtype).tiny)
        done = m >= k and bool((bounds <= tol * scale).all())
        if done or m == dim or num >= max_matvecs:
            converged = done or (m == dim and m >= k)
            best = (theta[:kk].clone(), Yr.T @ basis.V, res, bounds)
            break

        # Expand with the residual of the first unconverged wanted Ritz vector.
        unconverged = (bounds > tol * scale).nonzero().flatten()
        j = int(unconverged[0]) if len(unconverged) else 0
        if m >= max_basis:
            keep = max(k + 1, max_basis // 2)
            Yk = Y[:, :keep].to(dtype=dtype, device=device)
            basis.replace(Yk.T @ basis.V, Yk.T @ basis.AV)
            T = torch.diag(theta[:keep])
        r = resid_vecs[0] if in_place else basis.stage().copy_(resid_vecs[j])
        _orthogonalize_(r, basis.V)
        norm = float(torch.linalg.vector_norm(r))  # nan or inf when r is not finite
        if not math.isfinite(norm) or norm <= 1e-10 * max(scale, 1.0):
            # Invariant subspace: continue from a fresh random direction.
            r.copy_(_random_vector(dim, dtype, device, generator))
            _orthogonalize_(_orthogonalize_(r, basis.V), basis.V)
            norm = float(torch.linalg.vector_norm(r))
        r.div_(norm)

    theta, ritz, res, bounds = best
    if len(theta) < k:  # dim == m < k cannot happen (k <= dim); guard anyway
        raise RuntimeError("Lanczos ended with fewer Ritz pairs than requested")
    return EigenResult(theta, ritz[:k], res[:k], num, converged, bounds, restart_vectors=ritz,
                       estimates=tuple(estimates))


def _error_bounds(theta: Tensor, res: Tensor, kk: int, convergence: str) -> Tensor:
    """Estimated errors of the first ``kk`` Ritz values.

    "residual": ‖r_i‖ (some eigenvalue lies within it, rigorous). "eigenvalue":
    min(‖r_i‖, ‖r_i‖²/δ_i) with δ_i the distance to the nearest other Ritz value — the gap
    bound, an estimate (δ is only as good as the neighbouring Ritz values, which is why
    warm starts keep a block of k + 2 vectors rather than one).
    """
    bounds = res[:kk].clone()
    if convergence == "residual" or len(theta) < 2:
        return bounds
    for i in range(kk):
        gap = min(abs(theta[i].item() - theta[j].item()) for j in range(len(theta)) if j != i)
        if gap > 0:
            bounds[i] = min(res[i].item(), res[i].item() ** 2 / gap)
    return bounds


def power_iteration(
    matvec: Matvec,
    dim: int,
    k: int = 1,
    *,
    which: str = "LA",
    tol: float = 1e-3,
    max_matvecs: int = 100,
    init=None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> EigenResult:
    """Top-k eigenpairs by power iteration with Hotelling deflation (a simple baseline).

    Plain power iteration converges to the eigenvalue of largest *magnitude*. For
    ``which="LA"`` (default) a negative dominant eigenvalue μ is detected and the
    iteration is repeated on A − μI, whose dominant eigenvalue is λ_max − μ. Converges
    slowly when eigenvalues cluster; prefer :func:`lanczos`.

    The arguments are those of :func:`lanczos` (``max_matvecs`` is the total budget over
    all pairs); convergence is by residual ‖A v − θ v‖ ≤ tol·|θ|.
    """
    _check_dim_k(dim, k)
    _check_common(which, tol, max_matvecs)
    if which == "SA":
        res = power_iteration(
            lambda v: -matvec(v), dim, k, which="LA", tol=tol, max_matvecs=max_matvecs,
            init=init, dtype=dtype, device=device, generator=generator,
        )
        return EigenResult(-res.eigenvalues, res.eigenvectors, res.residuals, res.num_matvecs,
                           res.converged, res.error_bounds)
    starts = _as_start_block(init, dim, dtype, device)
    found_vals: list[float] = []
    found_vecs: list[Tensor] = []
    residuals: list[float] = []
    used = 0
    all_converged = True

    def deflated(v: Tensor, shift: float) -> Tensor:
        w = matvec(v) - shift * v
        for lam, u in zip(found_vals, found_vecs):
            w = w - (lam - shift) * (u @ v) * u
        return w

    for i in range(k):
        start = starts[i] if i < len(starts) else _random_vector(dim, dtype, device, generator)
        budget = max(1, (max_matvecs - used) // (k - i))
        val, vec, r, n, ok = _power_single(deflated, start, 0.0, tol, budget)
        used += n
        if which == "LA" and val < 0 and used < max_matvecs:
            # Dominant eigenvalue is negative: shift so the algebraic top dominates.
            budget = max(1, (max_matvecs - used) // (k - i))
            val2, vec2, r2, n2, ok2 = _power_single(deflated, vec if vec.norm() > 0 else start, val, tol, budget)
            used += n2
            val, vec, r, ok = val2 + val, vec2, r2, ok2
        found_vals.append(val)
        found_vecs.append(vec)
        residuals.append(r)
        all_converged &= ok
    vals = torch.tensor(found_vals, dtype=torch.float64)
    order = _order(vals, which)
    vecs = torch.stack(found_vecs)[order.to(found_vecs[0].device)]
    res_t = torch.tensor(residuals, dtype=torch.float64)[order]
    return EigenResult(vals[order], vecs, res_t, used, all_converged, res_t.clone())


def _power_single(op, start: Tensor, shift: float, tol: float, budget: int):
    v = start / start.norm()
    val, r, n = 0.0, float("inf"), 0
    while n < budget:
        w = op(v, shift)
        n += 1
        if not torch.isfinite(w).all():
            raise NonFiniteMeasurement("matvec returned non-finite values")
        val = float((v.double() @ w.double()).item())
        r = float((w - val * v).double().norm().item())
        if r <= tol * max(abs(val), 1e-30):
            return val, v, r, n, True
        nw = w.norm()
        if nw == 0:
            return val, v, r, n, True
        v = w / nw
    return val, v, r, n, False


def hutchinson_trace(
    matvec: Matvec,
    dim: int,
    *,
    num_samples: int = 20,
    method: str = "hutchinson",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> TraceResult:
    """Stochastic trace estimate with Rademacher probes.

    ``method="hutchinson"``: mean of zᵀAz over ``num_samples`` probes, unbiased, with
    standard error std/√m. ``method="hutch++"`` (Meyer et al. 2021): a third of the
    products sketch the dominant subspace Q (trace taken exactly there), the rest run
    Hutchinson on the deflated operator (I−QQᵀ)A(I−QQᵀ); unbiased too, and far more
    accurate when a few eigenvalues dominate (typical of Hessians). Its ``stderr``
    covers the stochastic (deflated) part only, which is the whole error.
    """
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")

    def rademacher(n: int) -> Tensor:
        bits = torch.randint(0, 2, (n, dim), generator=generator, dtype=torch.int64)
        return (2 * bits - 1).to(dtype=dtype, device=device)

    if method == "hutchinson":
        Z = rademacher(num_samples)
        vals = torch.stack([(z.double() @ matvec(z).double()) for z in Z]).cpu()
        return TraceResult(float(vals.mean()), float(vals.std() / math.sqrt(len(vals))), num_samples, vals)
    if method != "hutch++":
        raise ValueError(f"method must be 'hutchinson' or 'hutch++', got {method!r}")
    if num_samples < 6:
        raise ValueError(f"hutch++ needs num_samples >= 6, got {num_samples}")
    s = min(num_samples // 3, dim)
    g = num_samples - 2 * s
    S = rademacher(s)
    AS = torch.stack([matvec(z) for z in S])
    Q, _ = torch.linalg.qr(AS.double().T)  # (dim, s)
    Q = Q.to(dtype)
    AQ = torch.stack([matvec(q) for q in Q.T])
    top = float(torch.einsum("ij,ij->", Q.T.double(), AQ.double()))
    G = rademacher(g)
    G = G - (G @ Q) @ Q.T
    vals = torch.stack([(z.double() @ matvec(z).double()) for z in G]).cpu()
    return TraceResult(top + float(vals.mean()), float(vals.std() / math.sqrt(len(vals))), 2 * s + g, vals + top)


def as_linear_operator(matvec: Matvec, dim: int, *, dtype: torch.dtype = torch.float64, device="cpu"):
    """Wrap a torch matvec as a ``scipy.sparse.linalg.LinearOperator`` (for ``eigsh``)."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator

    def mv(x):
        x = torch.as_tensor(np.asarray(x).reshape(-1), dtype=dtype, device=device)
        return matvec(x).detach().double().cpu().numpy()

    return LinearOperator((dim, dim), matvec=mv, rmatvec=mv, dtype=np.float64)
