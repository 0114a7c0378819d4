"""Flatness measures: Hessian trace and spectrum, gradient covariance, TIC, epsilon-sharpness.

Section 3.4 / Appendix E of Bartoldson et al. (2020), as its code computes them (notes:
shared/papers/generalization-stability.md section 4), plus exact-where-possible alternatives.

Everything works on `loss_fn(params) -> scalar` over a fixed batch (callers close over data, model
and BatchNorm statistics in eval mode) or on a per-example loss `loss_fn_i(params, x_i, y_i) ->
scalar` (unbatched `x_i`; add a batch axis inside if the model needs one). A mask pytree (1 keep / 0
pruned) restricts everything to the kept subspace: the operator is H_kept = D H D with D =
diag(mask), and vectors live in masked space, so pruned coordinates contribute nothing. Vectors are
handled flat (`ravel_pytree`); the Hessian is never materialised. No jit inside: callers jit, with
static arguments (probe counts, k, iterations) closed over by `functools.partial`. All functions
vmap over seeds (keys and params with a leading axis).
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.typing import ArrayLike

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]
ExampleLossFn = Callable[[PyTree, Any, Any], jax.Array]


class TraceEstimate(NamedTuple):
    estimate: jax.Array  # scalar trace estimate
    stderr: jax.Array  # Monte Carlo standard error: sample sd / sqrt(number of samples)


class Eigenpairs(NamedTuple):
    eigenvalues: jax.Array  # (k,), sorted descending
    eigenvectors: PyTree  # like params, every leaf with a leading k axis; unit norm in flat space


class GradientMoments(NamedTuple):
    second_moment: PyTree  # (1/n) sum_i g_i**2, elementwise (the empirical-Fisher diagonal)
    mean: PyTree  # (1/n) sum_i g_i
    count: int  # n


class CovarianceTrace(NamedTuple):
    uncentred: jax.Array  # Tr(C) = (1/n) sum_i ||g_i||^2, the original's definition
    centred: jax.Array  # (1/n) sum_i ||g_i - g_bar||^2 = uncentred - ||g_bar||^2


class Sharpness(NamedTuple):
    epsilon: (
        jax.Array
    )  # smallest |eps| over directions and signs reaching the threshold (inf: none)
    per_direction: jax.Array  # (k, 2): columns are the +eps and -eps directions
    radii: jax.Array  # (n,) grid of |eps| values: step, 2 step, ..., radius
    loss_increase: jax.Array  # (k, 2, n) loss(w + s r v) - base loss on the grid


# ----------------------------------------------------------------------------------------------
# Masks and flat operators.


def _check_mask(params: PyTree, mask: PyTree) -> None:
    p_leaves, p_def = jax.tree_util.tree_flatten_with_path(params)
    m_leaves, m_def = jax.tree_util.tree_flatten_with_path(mask)
    if p_def != m_def:
        raise ValueError(f"mask structure {m_def} does not match params structure {p_def}")
    for (path, p), (_, m) in zip(p_leaves, m_leaves):
        if jnp.shape(p) != jnp.shape(m):
            raise ValueError(
                f"mask leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(m)}, "
                f"params leaf has shape {jnp.shape(p)}"
            )


def _flat_mask(params: PyTree, mask: PyTree | None) -> jax.Array:
    flat, _ = ravel_pytree(params)
    if mask is None:
        return jnp.ones_like(flat)
    _check_mask(params, mask)
    flat_mask, _ = ravel_pytree(jax.tree.map(lambda m, p: jnp.asarray(m, p.dtype), mask, params))
    return flat_mask


def _hvp_operator(
    loss_fn: LossFn, params: PyTree, mask: PyTree | None
) -> tuple[Callable[[jax.Array], jax.Array], jax.Array, Callable[[jax.Array], PyTree]]:
    """Flat u -> D H D u by forward-over-reverse (jvp of grad); returns (matvec, mask, unravel)."""
    flat, unravel = ravel_pytree(params)
    m = _flat_mask(params, mask)
    grad_fn = jax.grad(lambda w: loss_fn(unravel(w)))

    def matvec(u: jax.Array) -> jax.Array:
        return m * jax.jvp(grad_fn, (flat,), (m * u,))[1]

    return matvec, m, unravel


def hvp(loss_fn: LossFn, params: PyTree, vector: PyTree, mask: PyTree | None = None) -> PyTree:
    """Hessian-vector product D H D v (forward-over-reverse), returned as a params-shaped pytree."""
    matvec, _, unravel = _hvp_operator(loss_fn, params, mask)
    return unravel(matvec(ravel_pytree(vector)[0]))


def _map(f: Callable, xs: Any, batch_size: int | None) -> Any:
    """vmap over the leading axis, or lax.map in chunks of batch_size to bound memory."""
    return jax.vmap(f)(xs) if batch_size is None else jax.lax.map(f, xs, batch_size=batch_size)


# ----------------------------------------------------------------------------------------------
# Trace estimators.


def hutchinson_trace(
    key: jax.Array,
    loss_fn: LossFn,
    params: PyTree,
    num_probes: int,
    mask: PyTree | None = None,
    batch_size: int | None = None,
) -> TraceEstimate:
    """Tr(D H D) ~ (1/m) sum_j z_j^T H z_j, z_j Rademacher (Hutchinson 1989; Avron & Toledo 2011).

    Per-probe variance is 2 sum_{i != j} H_ij^2, so the error shrinks like 1/sqrt(num_probes).
    """
    if num_probes < 2:
        raise ValueError(f"num_probes must be >= 2 for a standard error, got {num_probes}")
    matvec, _, _ = _hvp_operator(loss_fn, params, mask)
    dim = ravel_pytree(params)[0].shape[0]
    dtype = ravel_pytree(params)[0].dtype

    def one_probe(probe_key: jax.Array) -> jax.Array:
        z = jax.random.rademacher(probe_key, (dim,), dtype)
        return z @ matvec(z)

    samples = _map(one_probe, jax.random.split(key, num_probes), batch_size)
    return TraceEstimate(samples.mean(), samples.std(ddof=1) / jnp.sqrt(num_probes))


def hutchpp_trace(
    key: jax.Array,
    loss_fn: LossFn,
    params: PyTree,
    num_matvecs: int,
    mask: PyTree | None = None,
    batch_size: int | None = None,
) -> TraceEstimate:
    """Hutch++ (Meyer et al. 2021, Alg. 1) with num_matvecs = 3k HVPs.

    Q = orth(H S) for k Rademacher probes S; Tr(H) = Tr(Q^T H Q) + Tr(P H P), P = I - Q Q^T, the
    second term by Hutchinson with k probes (its standard error is the one reported). Exact once
    k >= the number of kept parameters. Probes need no masking: the operator is D H D already.
    """
    k = num_matvecs // 3
    if k < 2:
        raise ValueError(
            f"num_matvecs must be >= 6 for Hutch++ with a standard error, got {num_matvecs}"
        )
    matvec, _, _ = _hvp_operator(loss_fn, params, mask)
    flat = ravel_pytree(params)[0]
    s_key, g_key = jax.random.split(key)
    probes_s = jax.random.rademacher(s_key, (k, flat.shape[0]), flat.dtype)
    probes_g = jax.random.rademacher(g_key, (k, flat.shape[0]), flat.dtype)
    q, _ = jnp.linalg.qr(_map(matvec, probes_s, batch_size).T)  # (d, min(d, k)) orthonormal
    low_rank = jnp.sum(q.T * _map(matvec, q.T, batch_size))
    residual = probes_g - (probes_g @ q) @ q.T
    samples = jnp.sum(residual * _map(matvec, residual, batch_size), axis=1)
    return TraceEstimate(low_rank + samples.mean(), samples.std(ddof=1) / jnp.sqrt(k))


# ----------------------------------------------------------------------------------------------
# Top-k eigenpairs.


def _unravel_rows(unravel: Callable[[jax.Array], PyTree], rows: jax.Array) -> PyTree:
    return jax.vmap(unravel)(rows)


def lanczos_eigenpairs(
    key: jax.Array,
    loss_fn: LossFn,
    params: PyTree,
    k: int,
    num_iters: int,
    mask: PyTree | None = None,
    largest_magnitude: bool = False,
    unroll: int | bool = 1,
) -> Eigenpairs:
    """Top-k Ritz pairs of D H D from num_iters Lanczos steps with full reorthogonalisation.

    T = V^T H V (tridiagonal) is diagonalised exactly; Ritz vectors are V^T s. On breakdown (beta ~
    0, an invariant subspace) the iteration restarts from a random vector orthogonal to V, so
    num_iters = number of kept parameters gives the exact spectrum. Once the kept space is
    exhausted, further rows are zero and add eigenvalue-0 pairs (with zero vectors), which are true
    eigenvalues of D H D. Memory: (num_iters + 1) x d. Selects the k largest eigenvalues, or largest
    |eigenvalue|. `unroll` is passed to `lax.fori_loop`: on XLA CPU, HVPs of conv nets inside a
    rolled loop ran ~3.4x slower than unrolled ones (README, "Flatness vs stability"); unrolling
    costs compile time, growing with num_iters.
    """
    if not 1 <= k <= num_iters:
        raise ValueError(f"need 1 <= k <= num_iters, got k={k}, num_iters={num_iters}")
    matvec, m, unravel = _hvp_operator(loss_fn, params, mask)
    dim = m.shape[0]
    if num_iters > dim:
        raise ValueError(f"num_iters={num_iters} exceeds the number of parameters {dim}")
    eps = jnp.finfo(m.dtype).eps
    init_key, restart_key = jax.random.split(key)

    def orthonormalise(x: jax.Array, basis: jax.Array) -> tuple[jax.Array, jax.Array]:
        # Two passes of classical Gram-Schmidt ("twice is enough", Parlett 1998).
        y = x - basis.T @ (basis @ x)
        y = y - basis.T @ (basis @ y)
        return y, jnp.linalg.norm(y)

    v0 = m * jax.random.normal(init_key, (dim,), m.dtype)
    basis = jnp.zeros((num_iters + 1, dim), m.dtype).at[0].set(v0 / jnp.linalg.norm(v0))

    def step(j: int, carry: tuple) -> tuple:
        basis, alphas, betas = carry
        w = matvec(basis[j])
        alphas = alphas.at[j].set(basis[j] @ w)
        w_orth, beta = orthonormalise(w, basis)  # rows > j are still zero
        r = m * jax.random.normal(jax.random.fold_in(restart_key, j), (dim,), m.dtype)
        r_orth, r_norm = orthonormalise(r, basis)
        ok = beta > eps**0.75 * jnp.maximum(jnp.linalg.norm(w), jnp.finfo(m.dtype).tiny)
        r_ok = r_norm > eps**0.5 * jnp.linalg.norm(r)
        restart = jnp.where(r_ok, r_orth / jnp.where(r_ok, r_norm, 1.0), 0.0)
        nxt = jnp.where(ok, w_orth / jnp.where(ok, beta, 1.0), restart)
        return basis.at[j + 1].set(nxt), alphas, betas.at[j].set(jnp.where(ok, beta, 0.0))

    zeros = jnp.zeros((num_iters,), m.dtype)
    basis, alphas, betas = jax.lax.fori_loop(0, num_iters, step, (basis, zeros, zeros),
                                             unroll=unroll)
    tri = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    theta, s = jnp.linalg.eigh(tri)
    order = jnp.argsort(-jnp.abs(theta) if largest_magnitude else -theta)[:k]
    vectors = s[:, order].T @ basis[:num_iters]
    return Eigenpairs(theta[order], _unravel_rows(unravel, vectors))


def power_iteration_eigenpairs(
    key: jax.Array,
    loss_fn: LossFn,
    params: PyTree,
    k: int,
    max_iters: int = 20,
    tol: float = 1e-4,
    mask: PyTree | None = None,
) -> Eigenpairs:
    """Deflated power iteration as in the original (vendored pytorch-hessian-eigenthings).

    Pair j runs power iteration on H_j = H - sum_{i<j} lambda_i v_i v_i^T for at most max_iters
    steps, stopping when |lambda_t - lambda_{t-1}| / |lambda_t| < tol. Pair 0 starts from uniform
    [0, 1) noise (unnormalised, as the original); pair j+1 starts from v_j. Finds large-|lambda|
    pairs; accuracy is
    only what 20 steps give. Eigenvalues returned sorted descending.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    matvec, m, unravel = _hvp_operator(loss_fn, params, mask)
    dim = m.shape[0]

    def single_pair(
        vecs: jax.Array, lams: jax.Array, init: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        def deflated(x: jax.Array) -> jax.Array:
            return matvec(x) - vecs.T @ (lams * (vecs @ x))

        def cond(state: tuple) -> jax.Array:
            i, _, _, _, done = state
            return (i < max_iters) & ~done

        def body(state: tuple) -> tuple:
            i, vec, _, prev_lam, _ = state
            new = deflated(vec)
            norm = jnp.linalg.norm(new)
            null = norm == 0.0  # in the operator's null space: the original stops with lambda = 0
            lam = vec @ new
            err = jnp.where(
                lam == 0.0, 1.0, jnp.abs((lam - prev_lam) / jnp.where(lam == 0.0, 1.0, lam))
            )
            vec = jnp.where(null, new, new / jnp.where(null, 1.0, norm))
            return i + 1, vec, jnp.where(null, 0.0, lam), lam, null | (err < tol)

        zero = jnp.zeros((), m.dtype)
        state = (0, init, zero, zero, jnp.array(False))
        _, vec, lam, _, _ = jax.lax.while_loop(cond, body, state)
        return lam, vec

    def pair(j: int, carry: tuple) -> tuple:
        vecs, lams, init = carry
        lam, vec = single_pair(vecs, lams, init)
        return vecs.at[j].set(vec), lams.at[j].set(lam), vec

    init = m * jax.random.uniform(key, (dim,), m.dtype)
    vecs, lams = jnp.zeros((k, dim), m.dtype), jnp.zeros((k,), m.dtype)
    vecs, lams, _ = jax.lax.fori_loop(0, k, pair, (vecs, lams, init))
    order = jnp.argsort(-lams)
    return Eigenpairs(lams[order], _unravel_rows(unravel, vecs[order]))


def top_k_eigenvalue_trace(
    key: jax.Array, loss_fn: LossFn, params: PyTree, k: int = 100, mask: PyTree | None = None
) -> jax.Array:
    """The original's "Tr(H)": sum of the top-k eigenvalues by deflated power iteration."""
    return power_iteration_eigenpairs(key, loss_fn, params, k, mask=mask).eigenvalues.sum()


# ----------------------------------------------------------------------------------------------
# Gradient covariance and TIC.


def per_example_grads(loss_fn_i: ExampleLossFn, params: PyTree, xs: Any, ys: Any) -> PyTree:
    """g_i = grad_theta loss_fn_i(theta, x_i, y_i) by vmap; leaves gain a leading n axis."""
    return jax.vmap(jax.grad(loss_fn_i), in_axes=(None, 0, 0))(params, xs, ys)


def _num_examples(xs: Any, ys: Any, batch_size: int | None) -> int:
    sizes = {jnp.shape(leaf)[0] for leaf in jax.tree.leaves((xs, ys))}
    if len(sizes) != 1:
        raise ValueError(f"xs and ys leaves must share their leading (example) axis, got {sizes}")
    n = sizes.pop()
    if batch_size is not None and (batch_size < 1 or n % batch_size):
        raise ValueError(f"batch_size={batch_size} must be positive and divide n={n}")
    return n


def _sum_over_examples(fn: Callable, xs: Any, ys: Any, n: int, batch_size: int | None) -> PyTree:
    """sum_i fn(x_i, y_i), vmapped within chunks of batch_size and scanned over chunks."""
    b = n if batch_size is None else batch_size

    def chunk(tree: Any) -> Any:
        return jax.tree.map(lambda a: a.reshape((n // b, b) + a.shape[1:]), tree)

    def body(total: PyTree, batch: tuple) -> tuple[PyTree, None]:
        out = jax.vmap(fn)(*batch)
        return jax.tree.map(lambda t, o: t + o.sum(0), total, out), None

    init = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        jax.eval_shape(fn, *jax.tree.map(lambda a: a[0], (xs, ys))),
    )
    return jax.lax.scan(body, init, (chunk(xs), chunk(ys)))[0]


def gradient_moments(
    loss_fn_i: ExampleLossFn, params: PyTree, xs: Any, ys: Any, batch_size: int | None = None
) -> GradientMoments:
    """First and elementwise second moments of per-example gradients, in chunks of batch_size."""
    n = _num_examples(xs, ys, batch_size)

    def fn(x: Any, y: Any) -> tuple[PyTree, PyTree]:
        g = jax.grad(loss_fn_i)(params, x, y)
        return jax.tree.map(jnp.square, g), g

    sq, total = _sum_over_examples(fn, xs, ys, n, batch_size)
    return GradientMoments(
        jax.tree.map(lambda a: a / n, sq), jax.tree.map(lambda a: a / n, total), n
    )


def covariance_trace(moments: GradientMoments, mask: PyTree | None = None) -> CovarianceTrace:
    """Tr(C) over kept coordinates: uncentred (1/n) sum ||D g_i||^2, centred minus ||D g_bar||^2."""
    if mask is None:
        mask = jax.tree.map(jnp.ones_like, moments.mean)
    _check_mask(moments.mean, mask)
    uncentred = sum(
        jnp.sum(m * s)
        for m, s in zip(jax.tree.leaves(mask), jax.tree.leaves(moments.second_moment))
    )
    mean_sq = sum(
        jnp.sum(m * g**2) for m, g in zip(jax.tree.leaves(mask), jax.tree.leaves(moments.mean))
    )
    return CovarianceTrace(jnp.asarray(uncentred), jnp.asarray(uncentred - mean_sq))


def tic_proxy(cov_trace: ArrayLike, hessian_trace: ArrayLike) -> jax.Array:
    """The original's rough TIC: Tr(C) / Tr(H)."""
    return jnp.asarray(cov_trace) / jnp.asarray(hessian_trace)


def tic_trace(
    loss_fn: LossFn,
    loss_fn_i: ExampleLossFn,
    params: PyTree,
    xs: Any,
    ys: Any,
    damping: float,
    mask: PyTree | None = None,
    batch_size: int | None = None,
    tol: float = 1e-5,
    maxiter: int = 100,
) -> jax.Array:
    """Tr((H + lambda I)^-1 C) = (1/n) sum_i g_i^T (H + lambda I)^-1 g_i (C = G^T G / n, uncentred).

    One conjugate-gradient solve per example on the kept subspace (D H D + lambda I, D g_i). CG
    needs H + lambda I positive definite there: choose damping above -lambda_min (e.g. from
    Lanczos).
    """
    matvec, m, unravel = _hvp_operator(loss_fn, params, mask)
    n = _num_examples(xs, ys, batch_size)

    def operator(u: jax.Array) -> jax.Array:
        return matvec(u) + damping * u

    def fn(x: Any, y: Any) -> jax.Array:
        g = m * ravel_pytree(jax.grad(loss_fn_i)(params, x, y))[0]
        sol, _ = jax.scipy.sparse.linalg.cg(operator, g, tol=tol, maxiter=maxiter)
        return g @ sol

    return _sum_over_examples(fn, xs, ys, n, batch_size) / n


# ----------------------------------------------------------------------------------------------
# epsilon-sharpness.


def epsilon_sharpness(
    loss_fn: LossFn,
    params: PyTree,
    directions: PyTree,
    threshold: float = 0.1,
    radius: float = 0.4,
    step: float = 0.01,
    bisection_steps: int = 0,
    base_loss: ArrayLike | None = None,
    batch_size: int | None = None,
) -> Sharpness:
    """Smallest |eps| with loss(w + eps v) - loss(w) >= threshold along unit directions, both signs.

    The original: v = top-10 eigenvectors, eps on the grid -0.40:0.01:0.40, threshold 0.1, and eps*
    the smallest grid |eps| where the max over v of the increase reaches 0.1 (= min over (v, sign)
    of the first grid crossing). bisection_steps > 0 refines each first crossing within its grid
    cell. inf where no direction reaches the threshold within radius. `directions` leaves have a
    leading k axis.
    """
    num = math.floor(radius / step * (1 + 1e-9))  # the grid never passes the radius (float slack)
    if num < 1:
        raise ValueError(f"radius={radius} must be at least step={step}")
    flat, unravel = ravel_pytree(params)
    dirs = jax.vmap(lambda d: ravel_pytree(d)[0])(directions)  # (k, d)
    if dirs.shape[1:] != flat.shape:
        raise ValueError(
            f"directions must be params-shaped with a leading k axis, got {dirs.shape}"
        )
    base = loss_fn(params) if base_loss is None else jnp.asarray(base_loss)
    radii = step * jnp.arange(1, num + 1, dtype=flat.dtype)
    dirs_k2 = jnp.stack([dirs, -dirs], axis=1)  # (k, 2, d)

    def increase_fn(v: jax.Array, r: jax.Array) -> jax.Array:
        return loss_fn(unravel(flat + r * v)) - base

    pairs = (
        jnp.repeat(dirs_k2.reshape(-1, flat.shape[0]), num, axis=0),
        jnp.tile(radii, 2 * dirs.shape[0]),
    )
    increase = _map(lambda p: increase_fn(*p), pairs, batch_size).reshape(dirs.shape[0], 2, num)
    crossed = increase >= threshold
    first = jnp.argmax(crossed, axis=-1)  # (k, 2)
    hit = crossed.any(axis=-1)
    hi = radii[first]
    lo = jnp.where(first > 0, radii[jnp.maximum(first - 1, 0)], 0.0)

    def bisect(v: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
        def body(_: int, bracket: tuple) -> tuple:
            lo, hi = bracket
            mid = 0.5 * (lo + hi)
            up = increase_fn(v, mid) >= threshold
            return jnp.where(up, lo, mid), jnp.where(up, mid, hi)

        return jax.lax.fori_loop(0, bisection_steps, body, (lo, hi))[1]

    if bisection_steps > 0:
        hi = jax.vmap(jax.vmap(bisect))(dirs_k2, lo, hi)
    per_direction = jnp.where(hit, hi, jnp.inf)
    return Sharpness(per_direction.min(), per_direction, radii, increase)


# ----------------------------------------------------------------------------------------------
# Per-layer and kept-vs-pruned regions.


def _path_name(path: tuple) -> str:
    parts = []
    for p in path:
        parts.append(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))))
    return "/".join(parts)


def layer_masks(params: PyTree, mask: PyTree | None = None) -> dict[str, PyTree]:
    """One mask per layer (leaves grouped by parent path, e.g. "params/Dense_0"), times mask."""
    if mask is None:
        mask = jax.tree.map(jnp.ones_like, params)
    _check_mask(params, mask)
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    names = [_path_name(p[:-1] if len(p) > 1 else p) for p in paths]
    masks = {}
    for name in dict.fromkeys(names):
        leaves = [
            jnp.asarray(m, p.dtype) * (leaf_name == name)
            for leaf_name, m, p in zip(names, jax.tree.leaves(mask), jax.tree.leaves(params))
        ]
        masks[name] = jax.tree.unflatten(jax.tree.structure(params), leaves)
    return masks


def kept_pruned_masks(mask: PyTree) -> dict[str, PyTree]:
    """{"kept": mask, "pruned": 1 - mask}: the two regions a mask splits parameters into."""
    return {"kept": mask, "pruned": jax.tree.map(lambda m: 1 - m, mask)}


def hutchinson_block_traces(key: jax.Array, loss_fn: LossFn, params: PyTree, mask: PyTree,
                            num_probes: int, num_pruned: int, groups: jax.Array
                            ) -> dict[str, jax.Array]:
    """Hutchinson samples s_j = z_j^T D H D z_j (probes drawn exactly as `hutchinson_trace`
    draws them, so the estimate is the same number) and their block parts per group:
    E[sum_{i in g} z_i (D H D z)_i] = Tr(H_gg) for a group g of kept coordinates (layers), so
    per-layer traces cost no extra HVPs. `num_pruned` probes on the pruned coordinates estimate
    Tr((1-D) H (1-D)). groups: (G, d) 0/1 rows. Means and standard errors over probes."""
    flat, unravel = ravel_pytree(params)
    m = ravel_pytree(jax.tree.map(lambda a, p: jnp.asarray(a, p.dtype), mask, params))[0]
    grad_fn = jax.grad(lambda w: loss_fn(unravel(w)))
    kept_key, pruned_key = jax.random.split(key)
    keys = jnp.concatenate([jax.random.split(kept_key, num_probes),
                            jax.random.split(pruned_key, num_pruned)])
    z = jax.vmap(lambda k: jax.random.rademacher(k, flat.shape, flat.dtype))(keys)
    region = jnp.concatenate([jnp.broadcast_to(m, (num_probes,) + m.shape),
                              jnp.broadcast_to(1 - m, (num_pruned,) + m.shape)])
    z = z * region
    hz = jax.vmap(lambda u: jax.jvp(grad_fn, (flat,), (u,))[1])(z) * region
    prod = z * hz  # (P, d): rows sum to the Hutchinson samples

    def mean_se(s: jax.Array) -> tuple[jax.Array, jax.Array]:
        return s.mean(0), s.std(0, ddof=1) / jnp.sqrt(s.shape[0])

    trace, trace_se = mean_se(prod[:num_probes].sum(-1))
    layers, layers_se = mean_se(prod[:num_probes] @ groups.T)
    out = dict(trace=trace, trace_se=trace_se, layers=layers, layers_se=layers_se)
    if num_pruned > 1:
        out["pruned"], out["pruned_se"] = mean_se(prod[num_probes:].sum(-1))
    return out


def layer_group_rows(params: PyTree, mask: PyTree) -> tuple[list[str], jax.Array]:
    """(layer names, (G, d) 0/1 rows of kept coordinates per layer): `layer_masks` flattened, the
    `groups` of `hutchinson_block_traces`."""
    lm = layer_masks(params, mask)
    return list(lm), jnp.stack([ravel_pytree(v)[0] for v in lm.values()])


def by_region(
    estimate_fn: Callable[[jax.Array, PyTree], Any], key: jax.Array, masks: dict[str, PyTree]
) -> dict[str, Any]:
    """{name: estimate_fn(key_name, mask_name)} with one independent key per region.

    The masks are stacked and scanned (lax.map), so estimate_fn is traced and compiled once and
    regions run one after another (memory of one region). E.g. per-layer Hutchinson traces:
    by_region(lambda k, m: hutchinson_trace(k, loss_fn, params, 64, m), key, layer_masks(params)).
    """
    names = list(masks)
    stacked = jax.tree.map(lambda *ms: jnp.stack(ms), *(masks[n] for n in names))
    out = jax.lax.map(lambda km: estimate_fn(*km), (jax.random.split(key, len(names)), stacked))
    return {n: jax.tree.map(lambda a, i=i: a[i], out) for i, n in enumerate(names)}
