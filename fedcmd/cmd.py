"""Correlation Mode Decomposition (CMD): post-hoc fit, online statistics, embedding schedule.

Brokman et al., "Enhancing neural training via a correlated dynamics model" (ICLR 2024), and
Turjeman et al., "The underlying correlated dynamics in neural training" (2022). Every trajectory
w_i(t) of a weight is modelled as a_i * r_m(t) + b_i, where r_m is the trajectory of the reference
weight of the weight's mode m.

- `fit_cmd` (post-hoc, Alg. 1-2): sample K weights, cluster them into modes, pick one reference per
  mode, assign every weight to the reference it correlates with most, fit (a_i, b_i) by least squares.
- `OnlineCMD` (paper 3.3): keeps the first F+1 snapshots, fits at F, then updates (a, b) with every
  new snapshot in O(N) memory (Eqs. 9-10) and keeps no trajectory.
- `EmbeddingSchedule` (paper 3.4, Eqs. 11-12): every L snapshots, freezes the coefficients of the
  P% of weights whose coefficients moved least since the previous event.

Clustering of the K samples. The default, `clustering="pam"`, is k-medoids (PAM: BUILD then SWAP;
Kaufman & Rousseeuw 1990) with the distance 1 - corr^2: it picks the M references that minimise
sum_k (1 - max_m corr(w_k, r_m)^2), which is the least-squares CMD reconstruction error of the
sampled trajectories, each standardised. A weight that barely moves (a_i ~ 0, trajectory mostly
noise) is explained by no reference and explains no other weight, so it never earns a mode of its
own. The authors' rule, complete linkage on the rows of |corr| with Euclidean distance cut at M
clusters, is `clustering="hierarchical"` (its defaults `linkage="complete"`, `features="rows"`);
there such noise weights form clusters of their own and real modes get merged (see
experiments/benchmarks/cmd_core.py for the measured difference).

Pure numpy/scipy. Weight indices are int64 everywhere (the online state stores no index per weight,
only each weight's mode, in the smallest unsigned type that holds it); correlations are centred and
computed in float64; passes over all N weights go in chunks, so no N x T float64 array is ever held.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

from fedcmd import kernels

CLUSTERINGS = ("pam", "hierarchical")
LINKAGES = ("complete", "average", "single", "weighted")
FEATURES = ("rows", "correlation")

# Rows per chunk are chosen so that a chunk's float64 copy is about this size: small enough to stay
# in cache across the few passes made over it, large enough that numpy call overhead is negligible.
_CHUNK_BYTES = 1 << 20
# A PAM step must improve the objective (a sum of K values in [0, 1]) by more than this times K;
# it stops BUILD on exact duplicates (fewer distinct modes than asked) and bounds SWAP.
_PAM_TOLERANCE = 1e-9
_PAM_MAX_PASSES = 100


# ------------------------------------------------------------------------------------ validation


def _as_real_array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; duck-typed so this module never imports torch
        x = x.detach().cpu().numpy()
    array = np.asarray(x)
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    return array


def _non_finite_error(name: str, values: np.ndarray, row: int | None = None) -> ValueError:
    """The error for non-finite input, naming the first bad position and what it holds."""
    bad = np.argwhere(~np.isfinite(values))[0]
    value = values[tuple(bad)]
    where = [row, *bad[1:]] if row is not None else list(bad)
    return ValueError(f"{name}[{', '.join(str(int(i)) for i in where)}] is {value}: CMD needs finite values")


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_tensor_sizes(tensor_sizes: Any, n_params: int) -> np.ndarray | None:
    if tensor_sizes is None:
        return None
    sizes = np.asarray(tensor_sizes)
    if sizes.ndim != 1 or sizes.dtype.kind not in "iu" or (sizes < 0).any():
        raise ValueError(f"tensor_sizes must be a 1-D array of non-negative integers, got {tensor_sizes!r}")
    sizes = sizes.astype(np.int64)
    if int(sizes.sum()) != n_params:
        raise ValueError(f"tensor_sizes sum to {int(sizes.sum())}, but there are {n_params} weights")
    return sizes


@dataclass(frozen=True)
class ClusteringOptions:
    """How the K sampled trajectories become modes; checked once, shared by fit_cmd and OnlineCMD.

    Exactly one of n_modes (a fixed M) and distance_threshold is given. The threshold is in the
    clustering's own distance: for "pam", the mean of 1 - corr^2 between samples and their
    reference (the unexplained fraction of their variance), medoids being added until it is at most
    the threshold; for "hierarchical", the cophenetic distance at which the tree is cut.
    """

    n_modes: int | None
    distance_threshold: float | None = None
    clustering: str = "pam"
    linkage: str | None = None
    features: str | None = None

    def __post_init__(self) -> None:
        if (self.n_modes is None) == (self.distance_threshold is None):
            raise ValueError(
                "give exactly one of n_modes and distance_threshold, got "
                f"n_modes={self.n_modes!r}, distance_threshold={self.distance_threshold!r}"
            )
        if self.n_modes is not None:
            _positive_int(self.n_modes, "n_modes")
        if self.clustering not in CLUSTERINGS:
            raise ValueError(f"clustering must be one of {CLUSTERINGS}, got {self.clustering!r}")
        if self.clustering == "pam":
            if self.linkage is not None or self.features is not None:
                raise ValueError("linkage and features apply to clustering='hierarchical' only")
            upper = 1.0
        else:
            if self.linkage is None:
                object.__setattr__(self, "linkage", "complete")
            if self.features is None:
                object.__setattr__(self, "features", "rows")
            if self.linkage not in LINKAGES:
                raise ValueError(f"linkage must be one of {LINKAGES}, got {self.linkage!r}")
            if self.features not in FEATURES:
                raise ValueError(f"features must be one of {FEATURES}, got {self.features!r}")
            upper = np.inf
        if self.distance_threshold is not None and not 0.0 <= float(self.distance_threshold) < upper:
            raise ValueError(
                f"distance_threshold must be in [0, {upper}) for clustering={self.clustering!r}, "
                f"got {self.distance_threshold!r}"
            )


# -------------------------------------------------------------------------------------- sampling


def sample_indices(n_params: int, n_samples: int, seed: int = 0, tensor_sizes: Any = None) -> np.ndarray:
    """Sorted, distinct int64 indices of the K weights whose trajectories are clustered (2022, 8.2).

    With tensor_sizes, about K/2 samples are split evenly over the tensors (capped by each tensor's
    size) so that every tensor is represented, and the rest are uniform over all N weights; when
    K/2 is less than the number of tensors, all K are uniform. K >= N takes every weight.
    """
    n_params = _positive_int(n_params, "n_params")
    n_samples = _positive_int(n_samples, "n_samples")
    sizes = _check_tensor_sizes(tensor_sizes, n_params)
    if n_samples >= n_params:
        return np.arange(n_params, dtype=np.int64)
    rng = np.random.default_rng(seed)
    parts = [np.zeros(0, dtype=np.int64)]
    if sizes is not None and n_samples // 2 >= sizes.size:
        per_tensor = n_samples // 2 // sizes.size
        starts = np.cumsum(sizes) - sizes
        for start, size in zip(starts, sizes):
            take = min(per_tensor, int(size))
            if take:
                parts.append(start + rng.choice(int(size), take, replace=False).astype(np.int64))
    stratified = np.concatenate(parts)
    need = n_samples - stratified.size
    # Drawing need + |stratified| distinct indices leaves at least `need` once those are removed.
    uniform = rng.choice(n_params, need + stratified.size, replace=False).astype(np.int64)
    uniform = uniform[~np.isin(uniform, stratified)][:need]
    return np.sort(np.concatenate([stratified, uniform]))


# ----------------------------------------------------------------------------------- correlation


def _centre(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows - row mean, row mean) in float64.

    The first column is subtracted before averaging: exact for float32 input, so a constant row
    centres to exact zeros (corr 0, a = 0) and nearly constant rows lose no digits to cancellation.
    """
    rows = np.array(rows, dtype=np.float64)
    first = rows[:, :1].copy()
    rows -= first
    shift = rows.mean(axis=1, keepdims=True)
    rows -= shift
    return rows, (first + shift)[:, 0]


def _standardise(centred: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm; constant (all-zero) rows stay zero, i.e. correlate 0 with anything."""
    norm = np.sqrt(np.einsum("ij,ij->i", centred, centred))
    scale = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
    return centred * scale[:, None]


def _abs_correlation(samples: np.ndarray) -> np.ndarray:
    z = _standardise(_centre(samples)[0])
    return np.clip(np.abs(z @ z.T), 0.0, 1.0)


# ------------------------------------------------------------------------------------ clustering


def _pam(similarity: np.ndarray, n_modes: int | None, threshold: float | None) -> np.ndarray:
    """Medoid positions maximising sum_k max_m similarity[k, medoid_m] (PAM, BUILD then SWAP).

    similarity is corr^2, so 1 - similarity is each sample's unexplained variance fraction.
    """
    k = similarity.shape[0]
    limit = k if n_modes is None else min(n_modes, k)
    tolerance = _PAM_TOLERANCE * k
    medoids: list[int] = []
    best = np.zeros(k)
    # BUILD: add the sample whose addition explains the most; stop early once nothing more can be
    # explained (fewer distinct modes than asked) or the threshold rule is met.
    while len(medoids) < limit:
        if threshold is not None and medoids and float(np.mean(1.0 - best)) <= threshold:
            break
        gain = np.maximum(similarity - best[:, None], 0.0).sum(axis=0)
        gain[medoids] = -np.inf
        candidate = int(np.argmax(gain))
        if medoids and gain[candidate] <= tolerance:
            break
        medoids.append(candidate)
        best = np.maximum(best, similarity[:, candidate])
    # SWAP: replace a medoid by the sample that most improves the objective, until none does.
    objective = float(best.sum())
    for _ in range(_PAM_MAX_PASSES):
        improved = False
        for slot in range(len(medoids)):
            others = [m for i, m in enumerate(medoids) if i != slot]
            base = similarity[:, others].max(axis=1) if others else np.zeros(k)
            totals = np.maximum(similarity, base[:, None]).sum(axis=0)
            totals[medoids] = -np.inf
            candidate = int(np.argmax(totals))
            if totals[candidate] > objective + tolerance:
                medoids[slot], objective, improved = candidate, float(totals[candidate]), True
        if not improved:
            break
    return np.array(medoids, dtype=np.int64)


def _hierarchical(abs_corr: np.ndarray, options: ClusteringOptions) -> np.ndarray:
    """Reference positions from hierarchical clustering; the reference of a cluster is the member
    with the highest mean |corr| to the other members (paper, step 1)."""
    k = abs_corr.shape[0]
    if k == 1:
        return np.zeros(1, dtype=np.int64)
    if options.features == "rows":
        with warnings.catch_warnings():
            # |corr| rows are observations; scipy warns when they happen to look like a distance
            # matrix (symmetric, zero diagonal: constant samples).
            warnings.simplefilter("ignore", hierarchy.ClusterWarning)
            tree = hierarchy.linkage(abs_corr, method=options.linkage, metric="euclidean")
    else:
        distance = 1.0 - abs_corr
        np.fill_diagonal(distance, 0.0)
        tree = hierarchy.linkage(squareform(distance, checks=False), method=options.linkage)
    if options.n_modes is not None:
        labels = hierarchy.fcluster(tree, t=options.n_modes, criterion="maxclust")
    else:
        labels = hierarchy.fcluster(tree, t=options.distance_threshold, criterion="distance")
    references = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        block = abs_corr[np.ix_(members, members)]
        to_others = (block.sum(axis=1) - np.diag(block)) / max(members.size - 1, 1)
        references.append(members[np.argmax(to_others)])
    return np.array(references, dtype=np.int64)


def _cluster_samples(samples: np.ndarray, options: ClusteringOptions) -> np.ndarray:
    """Positions (into samples) of the references, largest mode first."""
    abs_corr = _abs_correlation(samples)
    if options.clustering == "pam":
        references = _pam(abs_corr**2, options.n_modes, options.distance_threshold)
    else:
        references = _hierarchical(abs_corr, options)
    # Order modes by how many samples they explain best, so mode 0 is the largest.
    members = np.bincount(np.argmax(abs_corr[:, references], axis=1), minlength=references.size)
    return references[np.lexsort((references, -members))]


# ---------------------------------------------------------------------------- assignment and fit


def _uint_for(count: int) -> np.dtype:
    """The smallest unsigned integer type holding 0 .. count - 1 (uint8 up to 256 values)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if count <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _chunk_rows(bytes_per_row: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return _positive_int(chunk_size, "chunk_size")
    return max(1, _CHUNK_BYTES // max(bytes_per_row, 1))


def _assign_and_fit(
    trajectories: np.ndarray,
    references: np.ndarray,
    chunk_size: int | None,
    compact_modes: bool = False,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mode (argmax |corr| to the references) and least-squares (a, b) of every weight, in chunks.

    out: float64 (N, 2) for the (a_i, b_i) pairs (a and b are returned as its two columns). It may
    share memory with `trajectories` when row i of out lies within rows 0..i of the trajectories
    (rows of at least 16 bytes, out over their start): the chunks go up the rows and each is copied
    before anything is written, so no value is overwritten before it is read. `OnlineCMD` fits its
    warm-up snapshots that way, in place.
    """
    n_params, n_snapshots = trajectories.shape
    ref_centred, ref_mean = _centre(trajectories[references])
    ref_ss = np.einsum("ij,ij->i", ref_centred, ref_centred)
    ref_inv_norm = np.divide(1.0, np.sqrt(ref_ss), out=np.zeros_like(ref_ss), where=ref_ss > 0)
    n_modes = references.size
    # Columns 0..M-1: the standardised, centred references; column M: 1/T, giving the row mean.
    # The references are centred, so the product with un-centred rows is already the centred
    # inner product: column m is <w_i - mean_i, r_m - mean_m> / |r_m - mean_m|, i.e. |corr| up to
    # the row's norm and the covariance that a_i needs, all from one matrix product.
    projector = np.empty((n_snapshots, n_modes + 1))
    projector[:, :n_modes] = (ref_centred * ref_inv_norm[:, None]).T
    projector[:, n_modes] = 1.0 / n_snapshots
    modes = np.empty(n_params, dtype=_uint_for(n_modes) if compact_modes else np.int64)
    if out is None:
        a, b = np.empty(n_params, dtype=np.float64), np.empty(n_params, dtype=np.float64)
    else:
        a, b = out[:, 0], out[:, 1]
    # OpenBLAS runs products below 2^18 multiply-adds on one thread; above, on a shared machine,
    # waking its threads for a skinny chunk x M product costs ~100x the arithmetic.
    default_rows = max(1, min(_CHUNK_BYTES // (8 * n_snapshots), (1 << 18) // (n_snapshots * (n_modes + 1))))
    chunk = default_rows if chunk_size is None else _positive_int(chunk_size, "chunk_size")
    for start in range(0, n_params, chunk):
        stop = min(start + chunk, n_params)
        rows = np.array(trajectories[start:stop], dtype=np.float64)
        first = rows[:, 0].copy()
        rows -= first[:, None]  # exact for float32 input: constant rows become exact zeros
        with np.errstate(invalid="ignore"):  # non-finite input is reported just below
            product = rows @ projector
        mean = first + product[:, n_modes]
        if not np.isfinite(mean).all():
            row = start + int(np.flatnonzero(~np.isfinite(mean))[0])
            raise _non_finite_error("trajectories", np.asarray(trajectories[row : row + 1]), row)
        chunk_modes = np.argmax(np.abs(product[:, :n_modes]), axis=1)
        # 1-D gathers from the flat product: numpy's fast path for fancy indexing.
        chunk_a = product.ravel()[np.arange(stop - start) * (n_modes + 1) + chunk_modes] * ref_inv_norm[chunk_modes]
        modes[start:stop] = chunk_modes
        a[start:stop] = chunk_a
        b[start:stop] = mean - chunk_a * ref_mean[chunk_modes]
    # A reference is its mode's exact model, even when it ties with an identical reference.
    modes[references] = np.arange(references.size)
    a[references] = 1.0
    b[references] = 0.0
    return modes, a, b


@dataclass(frozen=True, eq=False)
class CMDModel:
    """A fitted CMD model of N weights: w_i(t) ~ a_i * w_{reference_index[modes[i]]}(t) + b_i.

    a and b are float64 (least squares in float64; cast to the network's dtype when applied).
    """

    modes: np.ndarray  # int64 (N,): mode of every weight
    reference_index: np.ndarray  # int64 (M,): weight index of each mode's reference
    a: np.ndarray  # float64 (N,)
    b: np.ndarray  # float64 (N,)
    sample_index: np.ndarray  # int64 (K,): the weights that were clustered

    @property
    def n_params(self) -> int:
        return int(self.modes.size)

    @property
    def n_modes(self) -> int:
        return int(self.reference_index.size)

    def reconstruct(self, reference_trajectories: Any, chunk_size: int | None = None) -> np.ndarray:
        """CMD trajectories of all N weights from their references' trajectories.

        reference_trajectories: M x T (row m is reference m over time) gives N x T; a length-M
        vector (one snapshot) gives a length-N vector. The result has the input's float dtype.
        """
        refs = _as_real_array(reference_trajectories, "reference_trajectories")
        if refs.ndim not in (1, 2) or refs.shape[0] != self.n_modes:
            raise ValueError(
                f"reference_trajectories must be ({self.n_modes},) or ({self.n_modes}, T), got shape {refs.shape}"
            )
        if not np.isfinite(refs).all():
            raise _non_finite_error("reference_trajectories", refs)
        dtype = refs.dtype if refs.dtype.kind == "f" else np.dtype(np.float64)
        refs64 = refs.astype(np.float64).reshape(self.n_modes, -1)
        out = np.empty((self.n_params, refs64.shape[1]), dtype=dtype)
        chunk = _chunk_rows(8 * refs64.shape[1], chunk_size)
        for start in range(0, self.n_params, chunk):
            stop = min(start + chunk, self.n_params)
            values = refs64[self.modes[start:stop]]
            values *= self.a[start:stop, None]
            values += self.b[start:stop, None]
            out[start:stop] = values
        return out if refs.ndim == 2 else out[:, 0]


def fit_cmd(
    trajectories: Any,
    n_modes: int | None,
    n_samples: int = 1000,
    seed: int = 0,
    tensor_sizes: Any = None,
    *,
    distance_threshold: float | None = None,
    clustering: str = "pam",
    linkage: str | None = None,
    features: str | None = None,
    chunk_size: int | None = None,
    compact_modes: bool = False,
) -> CMDModel:
    """Post-hoc CMD of trajectories (N x T: row i is weight i, column t is snapshot t).

    Samples n_samples weights (`sample_indices`), clusters them (see the module docstring; the
    authors' rule is clustering="hierarchical"), then assigns all N weights to the reference they
    correlate with most and fits a_i = cov(w_i, r) / var(r), b_i = mean(w_i) - a_i mean(r)
    (a constant reference gives a_i = 0, b_i = mean(w_i)). Returns at most min(n_modes, K) modes:
    fewer when the samples hold fewer distinct trajectories. numpy arrays (any strides, e.g. a
    transposed T x N buffer) and torch tensors are accepted; the data are read in chunks. Modes
    are int64, or with compact_modes the smallest unsigned type that holds them (1 byte per
    weight instead of 8 while the fit runs: what OnlineCMD keeps).
    """
    options = ClusteringOptions(n_modes, distance_threshold, clustering, linkage, features)
    traj = _as_real_array(trajectories, "trajectories")
    if traj.ndim != 2 or traj.shape[0] < 1 or traj.shape[1] < 2:
        raise ValueError(f"trajectories must be N x T with N >= 1 weights and T >= 2 snapshots, got shape {traj.shape}")
    references, sample_index = _references(traj, options, n_samples, seed, tensor_sizes)
    modes, a, b = _assign_and_fit(traj, references, chunk_size, compact_modes)
    return CMDModel(modes, references, a, b, sample_index)


def _references(
    traj: np.ndarray, options: ClusteringOptions, n_samples: int, seed: int, tensor_sizes: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(the references' weight indices, the sampled weights): sample, check, cluster (`fit_cmd`)."""
    sample_index = sample_indices(traj.shape[0], n_samples, seed, tensor_sizes)
    samples = np.asarray(traj[sample_index])
    bad_rows = np.flatnonzero(~np.isfinite(samples).all(axis=1))
    if bad_rows.size:
        row = int(bad_rows[0])
        raise _non_finite_error("trajectories", samples[row : row + 1], int(sample_index[row]))
    return sample_index[_cluster_samples(samples, options)], sample_index


# ----------------------------------------------------------------------------------------- online


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


class OnlineCMD:
    """Online CMD over a stream of flat snapshots theta(0), theta(1), ... (paper 3.3, Eqs. 9-10).

    Warm-up: snapshots 0..F (warmup = F) are kept; at F, `fit_cmd`'s fit runs once, in their place.
    Modes and references are fixed from then on. Per mode the state is n, the mean and the centred
    sum of squares of r (Welford: float64, no cancellation when a reference moves little relative
    to its value). Per weight the state is (a_i, b_i) themselves, in float64: with the mode's 2x2 Gram
    matrix G = [[Srr, Sr], [Sr, n]] they are equivalent to the sums (Swr, Sw) = (a, b) G, and each
    snapshot updates them to the least-squares fit on all snapshots 0..t (recursive least squares,
    Eq. 9). Storing (a, b) rather than the sums lets a frozen (embedded) weight simply keep its
    coefficients: its sums are not needed any more. State after warm-up: 18 bytes per weight
    (a, b float64, the mode as uint8 (uint16 beyond 256 modes), the frozen flag).

    Memory of the fit: the warm-up snapshots are kept weight by weight (row i: w_i(0..F)), in rows of
    at least 16 bytes (4 float32 snapshots; fewer are padded), and the fit writes each weight's
    (a_i, b_i) pair, float64, over the start of the rows it has read (`_assign_and_fit`); then the
    block is shrunk to those pairs. So the fit allocates only the modes (1 byte per weight) and
    chunks of a few MB beyond what the warm-up held: a server fitting 10^7 weights never holds the
    snapshots and the coefficients side by side. a and b are the pairs' two columns (stride 16 bytes).
    """

    def __init__(
        self,
        n_params: int,
        n_modes: int | None,
        warmup: int,
        n_samples: int = 1000,
        seed: int = 0,
        tensor_sizes: Any = None,
        *,
        distance_threshold: float | None = None,
        clustering: str = "pam",
        linkage: str | None = None,
        features: str | None = None,
        chunk_size: int | None = None,
    ) -> None:
        self.n_params = _positive_int(n_params, "n_params")
        self.warmup = _positive_int(warmup, "warmup")
        self.n_samples = _positive_int(n_samples, "n_samples")
        self.seed = seed
        self.tensor_sizes = _check_tensor_sizes(tensor_sizes, self.n_params)
        self.options = ClusteringOptions(n_modes, distance_threshold, clustering, linkage, features)
        self._chunk_size = chunk_size
        self.n_observed = 0
        # Warm-up: the snapshots' bytes (`_snapshots`); after the fit: the (a, b) pairs, a and b its columns.
        self._block: np.ndarray | None = None
        self._snapshot_dtype = np.dtype(np.float32)
        self._pairs = self._modes = self._reference_index = self._a = self._b = self._frozen = None
        self._ref_mean = self._ref_m2 = None

    # ----- public state --------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True once the warm-up fit has run (after snapshot F)."""
        return self._a is not None

    def _require_ready(self, what: str) -> None:
        if not self.ready:
            raise RuntimeError(
                f"OnlineCMD.{what} is available after warm-up: {self.warmup + 1} snapshots are "
                f"needed, {self.n_observed} observed"
            )

    @property
    def a(self) -> np.ndarray:
        self._require_ready("a")
        return _read_only(self._a)

    @property
    def b(self) -> np.ndarray:
        self._require_ready("b")
        return _read_only(self._b)

    @property
    def modes(self) -> np.ndarray:
        self._require_ready("modes")
        return _read_only(self._modes)

    @property
    def reference_index(self) -> np.ndarray:
        self._require_ready("reference_index")
        return _read_only(self._reference_index)

    @property
    def frozen_mask(self) -> np.ndarray:
        """Weights whose (a, b) no longer follow new snapshots (embedded weights)."""
        self._require_ready("frozen_mask")
        return _read_only(self._frozen)

    @property
    def n_modes(self) -> int:
        self._require_ready("n_modes")
        return int(self._reference_index.size)

    @property
    def nbytes(self) -> int:
        """Bytes held by the state (the warm-up buffer included while it exists)."""
        arrays = (
            self._block,
            self._pairs,
            self._modes,
            self._reference_index,
            self._frozen,
            self._ref_mean,
            self._ref_m2,
        )
        return sum(array.nbytes for array in arrays if array is not None)

    # ----- updates -------------------------------------------------------------------------------
    def _check_theta(self, theta: Any) -> np.ndarray:
        theta = _as_real_array(theta, "theta")
        if theta.shape != (self.n_params,):
            raise ValueError(f"theta must have shape ({self.n_params},), got {theta.shape}")
        if theta.dtype.kind == "f" and not kernels.finite(theta):  # integers are always finite
            raise _non_finite_error("theta", theta)
        return theta

    def observe(self, theta: Any, *, rebuild: bool = False) -> None:
        """Take the next snapshot (flat vector of N weights): buffer it, fit at F, or update (a, b).

        rebuild=True (after the fit, float32 theta): first set theta's frozen weights, in place, to
        float32(a_i) * theta[ref(mode_i)] + float32(b_i), the embedded weights as a client rebuilds
        them, in the same pass as the update (a server's embedded weights follow its references)."""
        if rebuild and self.ready:  # theta is checked after the rebuild, every weight (`_update`)
            theta = _as_real_array(theta, "theta")
            if theta.shape != (self.n_params,) or theta.dtype != np.float32:
                raise ValueError(f"rebuild=True takes float32 theta of shape ({self.n_params},)")
            self._update(theta, rebuild)
            self.n_observed += 1
            return
        theta = self._check_theta(theta)
        if self.ready:
            self._update(theta)
        else:
            if self._block is None:
                self._allocate_snapshots(np.result_type(theta.dtype, np.float32))
            self._snapshots()[:, self.n_observed] = theta
            if self.n_observed == self.warmup:
                self._fit()
        self.n_observed += 1

    def _allocate_snapshots(self, dtype: np.dtype) -> None:
        self._snapshot_dtype = np.dtype(dtype)
        row_bytes = max(16, -(-(self.warmup + 1) * self._snapshot_dtype.itemsize // 8) * 8)
        self._block = np.empty(self.n_params * row_bytes, dtype=np.uint8)

    def _snapshots(self) -> np.ndarray:
        """The warm-up snapshots, N x (F + 1): a view of the block's rows (see the class docstring)."""
        rows = self._block.view(self._snapshot_dtype).reshape(self.n_params, -1)
        return rows[:, : self.warmup + 1]

    def _fit(self) -> None:
        # fit_cmd's steps, with (a, b) written over the snapshots they are fitted from (class docstring).
        trajectories = self._snapshots()
        references, _ = _references(trajectories, self.options, self.n_samples, self.seed, self.tensor_sizes)
        ref_centred, self._ref_mean = _centre(trajectories[references])  # read before the fit overwrites them
        self._ref_m2 = np.einsum("ij,ij->i", ref_centred, ref_centred)
        n = self.n_params
        pairs = self._block[: 16 * n].view(np.float64).reshape(n, 2)
        self._modes = _assign_and_fit(trajectories, references, self._chunk_size, True, out=pairs)[0]
        del trajectories, pairs  # no view may be left for the block to shrink in place
        block, self._block = self._block, None
        if block.size > 16 * n:
            try:  # realloc: the tail past the pairs goes back, nothing is copied
                block.resize(16 * n, refcheck=True)
            except ValueError:  # something else holds the block (a debugger, a test): copy the pairs out
                block = block[: 16 * n].copy()
        self._set_pairs(block.view(np.float64).reshape(n, 2))
        self._reference_index = references
        self._frozen = np.zeros(self.n_params, dtype=bool)

    def _set_pairs(self, pairs: np.ndarray) -> None:
        self._pairs, self._a, self._b = pairs, pairs[:, 0], pairs[:, 1]

    def _update(self, theta: np.ndarray, rebuild: bool = False) -> None:
        # Welford step per mode; for weight i with old mean c_i = b_i + a_i mean_r and residual
        # e_i = w_i - c_i, the co-moment a_i * M2 grows by e_i (r - mean_r'), so
        # a_i' = a_i M2 / M2' + e_i (r - mean_r') / M2' and b_i' = c_i + e_i / n' - a_i' mean_r'.
        r = theta[self._reference_index].astype(np.float64)
        n_new = self.n_observed + 1
        mean_new = self._ref_mean + (r - self._ref_mean) / n_new
        m2_new = self._ref_m2 + (r - self._ref_mean) * (r - mean_new)
        moving = m2_new > 0
        keep = np.divide(self._ref_m2, m2_new, out=np.zeros_like(m2_new), where=moving)
        gain = np.divide(r - mean_new, m2_new, out=np.zeros_like(m2_new), where=moving)
        # One compiled pass over the weights that are not frozen (`fedcmd.kernels.online_update`: the
        # arithmetic above, in float64); frozen (embedded) weights keep their coefficients untouched.
        references = theta[self._reference_index] if rebuild else np.zeros(0, np.float32)
        finite = kernels.online_update(
            self._a,
            self._b,
            theta,
            self._modes,
            self._frozen,
            self._ref_mean,
            keep,
            gain,
            mean_new,
            1.0 / n_new,
            references,
        )
        if not finite:
            raise _non_finite_error("theta (its embedded weights rebuilt)", theta)
        self._a[self._reference_index] = 1.0
        self._b[self._reference_index] = 0.0
        self._ref_mean, self._ref_m2 = mean_new, m2_new

    def freeze(self, index: Any) -> None:
        """Freeze the coefficients of weights `index` (int64): later snapshots no longer change them."""
        self._require_ready("freeze")
        index = _check_index(index, self.n_params, "index")
        if np.isin(index, self._reference_index).any():
            raise ValueError("index contains reference weights; references are never embedded")
        self._frozen[index] = True

    def model_weights(self, theta: Any, index: Any = None) -> np.ndarray:
        """The CMD-modelled weights a_i * theta[ref(mode_i)] + b_i, for all weights or for `index`.

        Returned in theta's float dtype (float64 for integer input).
        """
        self._require_ready("model_weights")
        theta = self._check_theta(theta)
        dtype = theta.dtype if theta.dtype.kind == "f" else np.dtype(np.float64)
        r = theta[self._reference_index].astype(np.float64)
        if index is not None:
            index = _check_index(index, self.n_params, "index")
            return (self._a[index] * r[self._modes[index].astype(np.intp)] + self._b[index]).astype(dtype)
        out = np.empty(self.n_params, dtype=dtype)
        chunk = _chunk_rows(32, self._chunk_size)
        widened = np.empty(min(chunk, self.n_params), dtype=np.intp)
        for start in range(0, self.n_params, chunk):
            stop = min(start + chunk, self.n_params)
            modes = widened[: stop - start]
            np.copyto(modes, self._modes[start:stop])
            out[start:stop] = self._a[start:stop] * r[modes] + self._b[start:stop]
        return out

    # ----- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain numpy arrays and ints (copies). Before the fit, the snapshots kept so far."""
        empty_f, empty_i, empty_m = np.zeros(0, np.float64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
        state = {"n_params": self.n_params, "n_observed": self.n_observed}
        if self.ready:
            state.update(
                buffer=np.zeros((0, self.n_params), dtype=np.float32),
                modes=self._modes.copy(),
                reference_index=self._reference_index.copy(),
                a=self._a.copy(),
                b=self._b.copy(),
                frozen_mask=self._frozen.copy(),
                ref_mean=self._ref_mean.copy(),
                ref_m2=self._ref_m2.copy(),
            )
        else:
            buffer = (
                self._snapshots()[:, : self.n_observed].T.copy()
                if self._block is not None
                else np.zeros((0, self.n_params), dtype=np.float32)
            )
            state.update(
                buffer=buffer,
                modes=empty_m,
                reference_index=empty_i,
                a=empty_f,
                b=empty_f,
                frozen_mask=np.zeros(0, dtype=bool),
                ref_mean=empty_f,
                ref_m2=empty_f,
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict` taken from an OnlineCMD built with the same arguments."""
        missing = {
            "n_params",
            "n_observed",
            "buffer",
            "modes",
            "reference_index",
            "a",
            "b",
            "frozen_mask",
            "ref_mean",
            "ref_m2",
        } - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        if int(state["n_params"]) != self.n_params:
            raise ValueError(f"state n_params is {int(state['n_params'])}, this OnlineCMD has {self.n_params}")
        n_observed = int(state["n_observed"])
        n, fitted = self.n_params, n_observed > self.warmup
        buffer = np.asarray(state["buffer"])
        expected = {"buffer": (0 if fitted else n_observed, n)}
        if fitted:
            m = np.asarray(state["reference_index"]).size
            expected.update(
                modes=(n,), reference_index=(m,), a=(n,), b=(n,), frozen_mask=(n,), ref_mean=(m,), ref_m2=(m,)
            )
        for key, shape in expected.items():
            if np.shape(state[key]) != shape:
                raise ValueError(
                    f"state[{key!r}] has shape {np.shape(state[key])}, expected {shape} "
                    f"(n_observed={n_observed}, warmup={self.warmup})"
                )
        if not fitted and not np.isfinite(buffer).all():  # the fit overwrites it in place: checked first
            raise ValueError("state['buffer'] holds non-finite snapshots")
        self.n_observed = n_observed
        self._pairs = self._modes = self._reference_index = self._a = self._b = self._frozen = None
        self._ref_mean = self._ref_m2 = None
        self._block = None
        if fitted:
            modes = np.asarray(state["modes"])
            if modes.dtype.kind not in "iu":
                raise ValueError(f"state['modes'] must hold integers, got {modes.dtype}")
            if modes.size and (modes.min() < 0 or modes.max() >= m):
                raise ValueError(f"state['modes'] must lie in [0, {m})")
            reference_index = _check_index(state["reference_index"], n, "state['reference_index']").copy()
            frozen = np.array(state["frozen_mask"], dtype=bool)
            if frozen[reference_index].any():
                raise ValueError("state['frozen_mask'] freezes a reference weight; references are never embedded")
            self._modes = modes.astype(_uint_for(m))
            self._reference_index = reference_index
            pairs = np.empty((n, 2), dtype=np.float64)
            pairs[:, 0], pairs[:, 1] = state["a"], state["b"]
            self._set_pairs(pairs)
            self._frozen = frozen
            self._ref_mean = np.array(state["ref_mean"], dtype=np.float64)
            self._ref_m2 = np.array(state["ref_m2"], dtype=np.float64)
        elif n_observed:
            self._allocate_snapshots(np.result_type(buffer.dtype, np.float32))
            self._snapshots()[:, :n_observed] = buffer.T


def _check_index(index: Any, n_params: int, name: str) -> np.ndarray:
    index = np.asarray(index)
    if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be a 1-D integer array, got {index.dtype} of shape {index.shape}")
    index = index.astype(np.int64, copy=False)
    if index.size and (index.min() < 0 or index.max() >= n_params):
        raise ValueError(f"{name} must lie in [0, {n_params}), got values in [{index.min()}, {index.max()}]")
    return index


# -------------------------------------------------------------------------------------- embedding


class EmbeddingSchedule:
    """When and which weights to embed (paper 3.4, Eqs. 11-12).

    `step(online)` is called after each `online.observe`. The first call after warm-up records
    (a, b) as the baseline; then every `every` (L) snapshots it computes, for the weights neither
    embedded nor references, c_i = sqrt((a_i - a_i_old)^2 + (b_i - b_i_old)^2) since the previous
    event, embeds the `fraction` (P) with the smallest c_i (P of all N weights, or of the remaining
    candidates with of_remaining=True; at least one while any remain), freezes their coefficients
    in `online`, and returns their indices (int64, ascending). Otherwise it returns an empty array.

    State: the baseline (a_old, b_old) in float32, 8 bytes per weight. It only ranks the
    candidates: c_i^2 is computed in float64 against the float32-rounded baseline, which is off by
    at most 2^-24 of |a_old| and |b_old|, so only weights whose coefficients moved less than that
    rank on rounding (they are among the most stable either way). The ranking is by c_i^2, which
    orders the weights as c_i does (no square root per weight); of the weights whose c_i equals the
    P-th smallest, the ones with the lowest indices are taken. The embedded weights are `online`'s
    frozen weights: the schedule keeps no mask of its own, and `embedded_mask` is the
    `frozen_mask` of the OnlineCMD it last stepped.
    """

    def __init__(self, fraction: float, every: int, of_remaining: bool = False) -> None:
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)
        self.every = _positive_int(every, "every")
        self.of_remaining = bool(of_remaining)
        self._online: OnlineCMD | None = None  # the OnlineCMD last stepped (its frozen mask is the embedded one)
        self._a_old: np.ndarray | None = None  # float32 (N,)
        self._b_old: np.ndarray | None = None  # float32 (N,)
        self._last_event = -1  # snapshot index of the baseline or of the latest event

    @property
    def embedded_mask(self) -> np.ndarray:
        """bool (N,), read-only: the weights embedded so far (`frozen_mask` of the OnlineCMD last stepped)."""
        if self._online is None:
            raise RuntimeError("EmbeddingSchedule.embedded_mask exists once step(online) has been called")
        if not self._online.ready:
            return _read_only(np.zeros(self._online.n_params, dtype=bool))
        return self._online.frozen_mask

    def step(self, online: OnlineCMD) -> np.ndarray:
        nothing = np.zeros(0, dtype=np.int64)
        if self._a_old is not None and self._a_old.size != online.n_params:
            raise ValueError(f"online has {online.n_params} weights, this schedule tracks {self._a_old.size}")
        self._online = online
        if not online.ready:
            return nothing
        latest = online.n_observed - 1
        if self._a_old is None:
            self._a_old, self._b_old = online.a.astype(np.float32), online.b.astype(np.float32)
            self._last_event = latest
            return nothing
        if latest - self._last_event < self.every:
            return nothing
        frozen, refs = online.frozen_mask, np.sort(online.reference_index)
        n_candidates = int(kernels.count_free(frozen, refs, np.array([0, online.n_params]))[0])
        base = n_candidates if self.of_remaining else online.n_params
        count = min(n_candidates, max(1, round(self.fraction * base)))
        if 0 < count < n_candidates:
            chosen = self._most_stable(online, frozen, refs, n_candidates, count)
        else:
            chosen = np.setdiff1d(np.flatnonzero(~frozen), refs, assume_unique=True)
        online.freeze(chosen)
        np.copyto(self._a_old, online.a, casting="same_kind")
        np.copyto(self._b_old, online.b, casting="same_kind")
        self._last_event = latest
        return chosen.astype(np.int64, copy=False)

    def _most_stable(
        self, online: OnlineCMD, frozen: np.ndarray, refs: np.ndarray, n_candidates: int, count: int
    ) -> np.ndarray:
        """The `count` candidates with the smallest c_i, ascending. c_i^2 is computed once, in float64, for
        the candidates only (`fedcmd.kernels.coefficient_change`); its count-th smallest value is
        found by radix passes over those values (`kth_smallest`, no copy, no reordering), and one
        more pass takes every candidate below it and, of those equal to it, the first ones by
        index: the result does not depend on how a selection algorithm orders ties. Memory: 8 bytes
        per candidate and 8 per chosen weight."""
        change = np.empty(n_candidates + 1)  # one spare slot for the compiled walk
        kernels.coefficient_change(change, online.a, online.b, self._a_old, self._b_old, frozen, refs)
        change = change[:n_candidates]
        threshold, ties = kernels.kth_smallest(change, count)
        chosen = np.empty(count + 1, dtype=np.int64)
        written = kernels.select_free(chosen, change, threshold, ties, frozen, refs)
        if written != count:  # cannot happen: the threshold is the count-th value
            raise RuntimeError(f"selected {written} weights, expected {count}")
        return chosen[:count]

    def state_dict(self) -> dict[str, Any]:
        empty = np.zeros(0, dtype=np.float32)
        return {
            "fraction": self.fraction,
            "every": self.every,
            "of_remaining": self.of_remaining,
            "last_event": self._last_event,
            "a_old": empty if self._a_old is None else self._a_old.copy(),
            "b_old": empty if self._b_old is None else self._b_old.copy(),
        }

    def load_state_dict(self, state: dict[str, Any], n_params: int | None = None) -> None:
        """Restore a `state_dict` taken from a schedule with the same fraction, every, of_remaining
        (and, when n_params is given, over that many weights)."""
        missing = {"fraction", "every", "of_remaining", "last_event", "a_old", "b_old"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        for key in ("fraction", "every", "of_remaining"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state[{key!r}] is {state[key]!r}, this schedule has {getattr(self, key)!r}")
        last_event = state["last_event"]
        if isinstance(last_event, bool) or not isinstance(last_event, (int, np.integer)) or last_event < -1:
            raise ValueError(f"state['last_event'] must be an integer >= -1, got {last_event!r}")
        baseline = {}
        for key in ("a_old", "b_old"):
            value = np.asarray(state[key])
            if value.dtype != np.float32 or value.ndim != 1:
                raise ValueError(
                    f"state[{key!r}] must be a 1-D float32 array, got {value.dtype} of shape {value.shape}"
                )
            baseline[key] = value
        a_old, b_old = baseline["a_old"], baseline["b_old"]
        sizes = {0, n_params} if n_params is not None else {a_old.size}
        if a_old.shape != b_old.shape or a_old.size not in sizes or bool(a_old.size) != (last_event >= 0):
            raise ValueError(
                f"state a_old {a_old.shape} and b_old {b_old.shape} do not fit last_event {last_event}"
                + (f" and {n_params} weights" if n_params is not None else "")
            )
        self._online = None
        self._a_old = a_old.copy() if a_old.size else None
        self._b_old = b_old.copy() if b_old.size else None
        self._last_event = int(last_event)
