"""Concept discovery: how many concepts an image holds and where they are, with no words given.

The method learns one token and one mask per concept, so it needs to know how many concepts
an image holds. `discover_concepts` finds them in the model's own attention:

    >>> d = discover_concepts(pipe, image)
    >>> d.k, d.masks.shape, d.background      # 3, (3, 64, 64), 0: two objects + background
    >>> d.labels_per_k[4]                     # the attention grid's clusters had K been 4
    >>> similar_concepts([d, d2])             # which concepts of two images look alike

What is clustered. The image is encoded, noised at ``n_timesteps`` random timesteps and run
through the U-Net with the empty prompt (no words). Every cell of the cross-attention grid
(the layers of `conceptlab.maps.default_attention_config`: 16x16 for the bundled model and
for Stable Diffusion at 512 px) gets a *profile*: the cross-attention its query gives to
each of the model's own vocabulary words (`probe_words`: whole-word tokens of the tokenizer,
each encoded alone by the text encoder), softmax over the words, averaged over heads,
layers and timesteps. A pixel of a red star attends to "red" and "star"; one of the
background to the background's words. ``features="self-attention"`` clusters the cells'
self-attention maps instead (the evidence of DiffSeg and ConceptExpress: layers at the
grid's resolution and below, upsampled, weighted by resolution), ``"both"`` the two side
by side.

How K is chosen (``method="agglomerative"``, the default). Neighbouring cells of the grid
merge, the closest pair first, under the average symmetric KL divergence between their
profiles (average linkage restricted to touching clusters). Each merge's distance is
divided by the largest one of the tree (the merge of the last two clusters, usually the
foreground into the background), and the tree is cut before the first merge whose relative
distance exceeds ``threshold``. Clusters under ``min_area`` of the grid join the closest
larger one; at most ``max_concepts`` remain. Two alternatives, measured beside it by
``python -m benchmarks discovery``: ``"spectral"`` (normalised spectral clustering of the
same distances, K by the largest eigengap) and ``"finch"`` (first-neighbour partitions,
FINCH, Sarfraz et al. 2019: the coarsest partition with two clusters or more).

Why these choices (measured on a development suite of shapes-world scenes, held-out figures
in ``docs/results.md``): in the bundled model's self-attention every object pixel attends
to all the foreground, so self-attention tells the foreground from the background well but
objects from each other poorly, while the vocabulary profiles differ by colour and shape
words. Restricting merges to touching clusters keeps two separate objects apart until they
join the background, and stops the cells on object edges from forming one "ring" cluster
around several objects. A threshold relative to the tree's largest merge adapts to each
image's scale of distances; the eigengap and FINCH's partitions track K far less well.

Masks. Every pixel's profile (bilinearly upsampled) is compared with each concept's mean
profile: probabilities ``softmax(-KL / temperature)``, refined by a DenseCRF on the image's
colours (`conceptlab.crf`, ``refine=True``), argmax. The masks are disjoint and cover the
image. The background is the concept that holds the most pixels of the image's border
(ties: the larger one).

K is 1 when nothing stands out (an empty image, or a model with random weights).

Why one module of about 870 lines (about half of it docstrings and argument checks): recording, clustering and
masks share the grid, the feature kinds and the evidence that `Discovery` keeps; split, each
part would import the others' private pieces.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import crf as _crf
from . import masks as _masks
from .attention import AttentionStore, plain_attention
from .fileio import check_number
from .maps import default_attention_config, resolve_layers
from .models import (
    conditioning,
    encode_pixels,
    native_size,
    num_train_timesteps,
    text_encoders,
    to_model_input,
    to_uint8,
)

__all__ = [
    "FEATURES",
    "METHODS",
    "ConceptMatch",
    "Discovery",
    "choose_k",
    "cluster_cells",
    "discover_concepts",
    "merge_tree",
    "probe_words",
    "similar_concepts",
    "symmetric_kl",
]

METHODS = ("agglomerative", "spectral", "finch")
FEATURES = ("cross-attention", "self-attention", "both")
EOW = "</w>"          # CLIP's end-of-word marker
MAX_WORK_SIDE = 128   # masks are computed (and CRF-refined) at most this many pixels a side
EPS = 1e-8


# ----------------------------------------------------------------------------- result
@dataclass(frozen=True, eq=False)
class Discovery:
    """The concepts `discover_concepts` found in one image, with the evidence behind them.

    Attributes:
        masks: (K, H, W) bool at image resolution, disjoint, covering the image; one per
            concept, the background among them.
        background: index (into ``masks``) of the background.
        labels: (H, W) int64, the concept of every pixel (``masks[k] == (labels == k)``).
        grid_labels: (h, w) int64, the concept of every cell of the attention grid.
        features: (h, w, D) float32, the timestep-averaged attention features that were
            clustered (see ``feature_kind``).
        feature_kind: ``"cross-attention"`` (each cell's profile over ``words``),
            ``"self-attention"`` (each cell's self-attention map over the grid, flattened)
            or ``"both"`` (the two side by side).
        words: the probe words of the cross-attention profiles.
        profiles: (h, w, V) float32, each cell's cross-attention profile over ``words``.
        concept_profiles: (K, V) float32, each concept's mean profile (what
            `similar_concepts` compares).
        labels_per_k: ``{k: (h, w) labels}``, the merge tree cut at k clusters (k = 1 ..
            ``max_concepts``; for "spectral" and "finch", their own partitions).
        scores: the numbers behind the choice of K: each merge's distance relative to the
            largest ("agglomerative", in merge order), the eigenvalues of the normalised
            affinity, largest first ("spectral"), or the number of clusters of each
            partition ("finch").
        threshold: the relative merge distance at which the tree was cut (None for
            "spectral" and "finch").
        method: the clustering method.
        timesteps: (n,) the timesteps the attention was averaged over.
        seed: the seed of the timesteps and noise.
    """

    masks: np.ndarray
    background: int
    labels: np.ndarray
    grid_labels: np.ndarray
    features: np.ndarray
    feature_kind: str
    words: tuple
    profiles: np.ndarray
    concept_profiles: np.ndarray
    labels_per_k: dict
    scores: np.ndarray
    threshold: float | None
    method: str
    timesteps: np.ndarray
    seed: int

    @property
    def k(self) -> int:
        """K, the number of concepts found (the background included)."""
        return len(self.masks)

    @property
    def attention_shape(self) -> tuple[int, int]:
        """(h, w) of the attention grid."""
        return tuple(self.features.shape[:2])

    def top_words(self) -> list[str]:
        """Per concept, the probe word its attention reads most (``concept_profiles``).

        An object never gets the background's own top word: it gets its next one, so that
        an object's word names what sets it apart. These are the words `learn_concepts`
        starts the discovered concepts' tokens from (the background's token starts from
        "background").

        Returns:
            One word per concept, in the order of ``masks``.
        """
        top = np.argsort(-self.concept_profiles, axis=1, kind="stable")
        bg_word = top[self.background, 0]
        return [self.words[top[k, 0] if k == self.background
                           else next(v for v in top[k] if v != bg_word)]
                for k in range(self.k)]

    def distances(self) -> np.ndarray:
        """(h*w, h*w) symmetric KL divergence between the grid cells' features.

        Returns:
            The matrix the clustering worked on (cells in raster order).
        """
        return symmetric_kl(self.features.reshape(-1, self.features.shape[-1]))

    def __repr__(self) -> str:
        return (f"Discovery(k={self.k}, background={self.background}, method={self.method!r}, "
                f"features={self.feature_kind!r}, grid={self.attention_shape})")


@dataclass(frozen=True)
class ConceptMatch:
    """Two discovered concepts of two images that look alike (`similar_concepts`).

    Attributes:
        image_a: index of the first image.
        concept_a: the concept's index in the first image.
        image_b: index of the second image (``image_b > image_a``).
        concept_b: the concept's index in the second image.
        similarity: Bhattacharyya coefficient of their profiles, in [0, 1] (1: identical).
    """

    image_a: int
    concept_a: int
    image_b: int
    concept_b: int
    similarity: float


# ----------------------------------------------------------------------------- distances
def _rows(p) -> np.ndarray:
    """(n, D) non-negative rows normalised to sum 1 (float64)."""
    p = np.asarray(p, np.float64)
    if p.ndim != 2:
        raise ValueError(f"expected an (n, D) array of distributions, got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("distributions must be finite and non-negative")
    return np.maximum(p, 0) / np.maximum(p.sum(1, keepdims=True), EPS)


def symmetric_kl(p, q=None) -> np.ndarray:
    """Symmetric KL divergence ``(KL(p||q) + KL(q||p)) / 2`` between rows, in nats.

    Rows are normalised to sum 1 first; a floor of 1e-8 keeps the logarithms finite.

    Args:
        p: (n, D) non-negative rows (distributions over D outcomes).
        q: (m, D) rows; ``p`` itself by default.

    Returns:
        (n, m) float64 divergences, >= 0, zero on identical rows.

    Raises:
        ValueError: not 2-D, negative or non-finite values, or different D.
    """
    p = _rows(p)
    q = p if q is None else _rows(q)
    if p.shape[1] != q.shape[1]:
        raise ValueError(f"rows of different lengths: {p.shape[1]} and {q.shape[1]}")
    lp, lq = np.log(p + EPS), np.log(q + EPS)
    d = ((p * lp).sum(1)[:, None] + (q * lq).sum(1)[None] - p @ lq.T - (q @ lp.T).T) / 2
    return np.maximum(d, 0.0)


def _grid_adjacency(h: int, w: int) -> np.ndarray:
    idx = np.arange(h * w).reshape(h, w)
    adj = np.zeros((h * w, h * w), bool)
    adj[idx[:, :-1].ravel(), idx[:, 1:].ravel()] = True
    adj[idx[:-1].ravel(), idx[1:].ravel()] = True
    return adj | adj.T


# ----------------------------------------------------------------------------- clustering
def merge_tree(features, shape) -> np.ndarray:
    """Average-linkage merges of touching clusters of a grid, under symmetric KL.

    Every cell starts as its own cluster; the pair of 4-connected clusters with the smallest
    mean pairwise `symmetric_kl` merges, until one cluster remains.

    Args:
        features: (h*w, D) non-negative features of the cells, in raster order.
        shape: (h, w) of the grid.

    Returns:
        (h*w - 1, 3) float64 rows ``[kept, absorbed, distance]``: cluster ``absorbed``
            joins ``kept`` (cluster ids are cell indices) at that distance.

    Raises:
        ValueError: ``features`` has not h*w rows, or as for `symmetric_kl`.
    """
    h, w = int(shape[0]), int(shape[1])
    f = np.asarray(features)
    if f.ndim != 2 or len(f) != h * w:
        raise ValueError(f"features must be (h*w, D) = ({h * w}, D), got {f.shape}")
    total = symmetric_kl(f)             # sum of pairwise distances between two clusters
    adj = _grid_adjacency(h, w)
    size = np.ones(h * w)
    avg = np.where(adj, total, np.inf)
    merges = []
    for _ in range(h * w - 1):
        i, j = divmod(int(np.argmin(avg)), h * w)
        merges.append((i, j, avg[i, j]))
        total[i] += total[j]
        total[:, i] = total[i]
        size[i] += size[j]
        adj[i] |= adj[j]
        adj[i, i] = adj[i, j] = False
        adj[:, i] = adj[i]
        adj[j] = adj[:, j] = False
        row = np.where(adj[i], total[i] / (size[i] * size), np.inf)
        avg[i], avg[:, i] = row, row
        avg[j] = avg[:, j] = np.inf
    return np.array(merges, np.float64).reshape(-1, 3)


def _replay(n: int, merges) -> np.ndarray:
    """Labels 0..K-1 (numbered in raster order of first appearance) after ``merges``."""
    parent = np.arange(n)
    for i, j, _ in merges:
        parent[parent == int(j)] = int(i)
    _, first, inv = np.unique(parent, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inv].astype(np.int64)


def choose_k(merges, threshold: float) -> int:
    """K from a merge tree: the clusters left before the first merge whose distance,
    relative to the tree's largest, exceeds ``threshold``.

    Args:
        merges: (n - 1, 3) rows ``[kept, absorbed, distance]`` of `merge_tree`.
        threshold: relative merge distance in (0, 1].

    Returns:
        K >= 1 (1 when ``threshold`` is 1).
    """
    d = np.asarray(merges, np.float64)[:, 2]
    n = len(d) + 1
    if len(d) == 0 or d.max() <= 0:
        return 1
    over = np.flatnonzero(d / d.max() > threshold)
    return n - (int(over[0]) if len(over) else len(d))


def _centroids(f, labels, k) -> np.ndarray:
    return np.stack([f[labels == c].mean(0) for c in range(k)])


def _renumber(labels) -> np.ndarray:
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inv].reshape(np.shape(labels)).astype(np.int64)


def _absorb_small(f, labels, min_cells: int, max_k: int) -> np.ndarray:
    """Clusters under ``min_cells`` join the closest larger one (KL to its mean feature);
    then the two closest clusters merge while more than ``max_k`` remain."""
    labels = _renumber(labels)
    sizes = np.bincount(labels)
    small = sizes < min_cells
    if small.any() and not small.all():
        big = np.flatnonzero(~small)
        moving = small[labels]
        d = symmetric_kl(f[moving], _centroids(f, labels, len(sizes))[big])
        labels = labels.copy()
        labels[moving] = big[d.argmin(1)]
        labels = _renumber(labels)
    while labels.max() + 1 > max_k:
        d = symmetric_kl(_centroids(f, labels, labels.max() + 1))
        np.fill_diagonal(d, np.inf)
        i, j = sorted(divmod(int(np.argmin(d)), len(d)))
        labels = _renumber(np.where(labels == j, i, labels))
    return labels


def _agglomerative(f, shape, threshold, max_k):
    merges = merge_tree(f, shape)
    n = len(f)
    k = choose_k(merges, threshold)
    labels = _replay(n, merges[:n - k])
    per_k = {kk: _replay(n, merges[:n - kk]).reshape(shape) for kk in range(1, min(max_k, n) + 1)}
    d = merges[:, 2]
    return labels, per_k, d / max(d.max(), EPS)


def _kmeans(x, k: int, seed: int, iters: int = 100) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding from ``np.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min(((x[:, None] - np.array(centres)[None]) ** 2).sum(-1), 1)
        centres.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0
                       else x[rng.integers(len(x))])
    c = np.array(centres)
    labels = np.zeros(len(x), np.int64)
    for _ in range(iters):
        labels = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        new = np.array([x[labels == j].mean(0) if (labels == j).any() else c[j]
                        for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return labels


def _spectral(f, max_k, seed):
    d = symmetric_kl(f)
    off = d[~np.eye(len(d), dtype=bool)]
    sigma = max(float(np.median(off)), EPS)
    w = np.exp(-d / sigma)
    deg = w.sum(1)
    ev, vec = np.linalg.eigh(w / np.sqrt(deg[:, None] * deg[None]))
    ev, vec = ev[::-1], vec[:, ::-1]
    top = min(max_k, len(f) - 1)
    gaps = ev[1:top] - ev[2:top + 1]          # gap after the k-th eigenvalue, k = 2 .. top
    k = int(np.argmax(gaps)) + 2 if len(gaps) else 1
    per_k = {}
    for kk in range(1, top + 1):
        u = vec[:, :kk] / np.maximum(np.linalg.norm(vec[:, :kk], axis=1, keepdims=True), EPS)
        per_k[kk] = _renumber(_kmeans(u, kk, seed))
    return per_k[k], per_k, ev[:top + 1]


def _finch(f, min_cells):
    """FINCH partitions: each cluster links to its nearest (KL) cluster; the connected
    components are the next, coarser partition."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    labels, levels = np.arange(len(f)), []
    while labels.max() > 0:
        c = _centroids(f, labels, labels.max() + 1)
        d = symmetric_kl(c)
        np.fill_diagonal(d, np.inf)
        m = len(c)
        graph = coo_matrix((np.ones(m), (np.arange(m), d.argmin(1))), shape=(m, m))
        _, comp = connected_components(graph, directed=True, connection="weak")
        labels = _renumber(comp[labels])
        levels.append(labels)
    counts = np.array([int((np.bincount(lv) >= min_cells).sum()) for lv in levels])
    ok = [i for i, c in enumerate(counts) if c >= 2]
    chosen = levels[ok[-1]] if ok else levels[0]
    return chosen, {int(lv.max()) + 1: lv for lv in levels}, counts


def cluster_cells(features, shape, *, method: str = "agglomerative", threshold: float = 0.4,
                  min_area: float = 0.01, max_concepts: int = 8, seed: int = 0):
    """Cluster the cells of an attention grid; the number of clusters is chosen too.

    Args:
        features: (h*w, D) non-negative features (distributions) of the cells.
        shape: (h, w) of the grid.
        method: one of `METHODS` (see the module docstring).
        threshold: relative merge distance at which "agglomerative" cuts its tree.
        min_area: clusters under this fraction of the grid join the closest larger one.
        max_concepts: at most this many clusters.
        seed: seeds the k-means of "spectral".

    Returns:
        ``(labels (h, w) int64, labels_per_k {k: (h, w)}, scores)``: see `Discovery`.

    Raises:
        ValueError: an unknown method, or as for `merge_tree`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    f = _rows(features)
    h, w = int(shape[0]), int(shape[1])
    if len(f) != h * w:
        raise ValueError(f"features must be (h*w, D) = ({h * w}, D), got {f.shape}")
    if method == "agglomerative":
        labels, per_k, scores = _agglomerative(f, (h, w), threshold, max_concepts)
    elif method == "spectral":
        labels, per_k, scores = _spectral(f, max_concepts, seed)
    else:
        labels, per_k, scores = _finch(f, max(1, math.ceil(min_area * h * w)))
    labels = _absorb_small(f, labels.ravel(), max(1, math.ceil(min_area * h * w)),
                           max_concepts)
    per_k = {k: np.asarray(v).reshape(h, w) for k, v in sorted(per_k.items())}
    return labels.reshape(h, w), per_k, np.asarray(scores, np.float64)


# ----------------------------------------------------------------------------- recording
def probe_words(tokenizer, max_words: int = 1024) -> list[tuple[str, int]]:
    """The model's own vocabulary words whose cross-attention profiles `discover_concepts`
    clusters.

    Whole-word tokens (ending in CLIP's ``</w>``) of three letters or more, in token-id
    order (for a BPE vocabulary, about the order of frequency), at most ``max_words``.

    Args:
        tokenizer: a CLIP-style tokenizer.
        max_words: the most words to keep.

    Returns:
        ``[(word, token id), ...]``.

    Raises:
        ValueError: the vocabulary has fewer than two such words.
    """
    out = []
    for tok, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        word = tok.removesuffix(EOW)
        if tok.endswith(EOW) and len(word) >= 3 and word.isalpha():
            out.append((word, int(i)))
            if len(out) >= max_words:
                break
    if len(out) < 2:
        raise ValueError("the tokenizer has fewer than two whole-word tokens to probe the "
                         "cross-attention with: use features='self-attention'")
    return out


@torch.no_grad()
def _probe_embeddings(pipe, words) -> torch.Tensor:
    """(V, D) text conditioning of each probe word, encoded alone: the hidden state of the
    word's token in [BOS, word, EOS] (a causal encoder's state does not depend on the
    padding after it; SDXL: both encoders, with their full padded prompts)."""
    tok = pipe.tokenizer
    single = len(text_encoders(pipe)) == 1
    out = []
    for start in range(0, len(words), 256):
        chunk = words[start:start + 256]
        ids = torch.tensor([[tok.bos_token_id, i, tok.eos_token_id] for _, i in chunk])
        cond = conditioning(pipe, [w for w, _ in chunk], ids=ids if single else None)
        out.append(cond.hidden[:, 1].float())
    return torch.cat(out)


class _Accumulator:
    """Sums over timesteps of head-averaged attention, per layer."""

    def __init__(self, latent_shape):
        self.shapes = AttentionStore(latent_shape=latent_shape)
        self.probe: dict[str, torch.Tensor] = {}
        self.self_attn: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}

    def add(self, table, name, value, batch):
        table[name] = table[name] + value if name in table else value
        self.count[name] = self.count.get(name, 0) + batch


class _DiscoveryProcessor:
    """Plain attention (as diffusers' ``AttnProcessor``) that also keeps what discovery
    needs: at a cross-attention layer, each query's softmax over the probe words' keys; at
    a self-attention layer of at most ``max_pixels`` queries, the attention map itself."""

    def __init__(self, acc: _Accumulator, name: str, probe=None, max_pixels: int = 0):
        self.acc, self.name, self.probe, self.max_pixels = acc, name, probe, max_pixels

    def _keep(self, attn, query, probs, batch, is_cross):
        n = query.shape[1]
        if is_cross and self.probe is not None:
            ctx = self.probe.to(query.device, query.dtype)[None]
            if attn.norm_cross:
                ctx = attn.norm_encoder_hidden_states(ctx)
            key = attn.head_to_batch_dim(attn.to_k(ctx))                # (heads, V, d)
            q = query.reshape(batch, attn.heads, n, -1)
            p = (torch.einsum("bhnd,hvd->bhnv", q, key) * attn.scale).softmax(-1)
            self.acc.add(self.acc.probe, self.name, p.float().mean(1).sum(0), batch)
        if not is_cross and n <= self.max_pixels:
            p = probs.reshape(batch, attn.heads, n, n).float().mean(1).sum(0)
            self.acc.add(self.acc.self_attn, self.name, p, batch)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        is_cross = encoder_hidden_states is not None
        return plain_attention(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb,
            on_probs=lambda query, probs, batch: self._keep(attn, query, probs, batch, is_cross))


@contextlib.contextmanager
def _recording(unet, acc, cross_layers, probe, max_pixels):
    """Install `_DiscoveryProcessor` on the chosen cross-attention layers and on every
    self-attention layer (through ``set_attn_processor``); restore the originals on exit."""
    original = dict(unet.attn_processors)
    new = {}
    for name, proc in original.items():
        if name in cross_layers:
            new[name] = _DiscoveryProcessor(acc, name, probe=probe)
        elif name.endswith("attn1.processor") and max_pixels:
            new[name] = _DiscoveryProcessor(acc, name, max_pixels=max_pixels)
        else:
            new[name] = proc
    unet.set_attn_processor(new)
    try:
        yield acc
    finally:
        unet.set_attn_processor(original)


def _upsample_cells(x: torch.Tensor, src, dst) -> torch.Tensor:
    """(n_src, D) features of the cells of an ``src`` grid -> (n_dst, D) on a ``dst`` grid
    (bilinear)."""
    if tuple(src) == tuple(dst):
        return x
    img = x.T.reshape(1, -1, *src)
    return torch.nn.functional.interpolate(img, size=tuple(dst), mode="bilinear",
                                           align_corners=False)[0].reshape(x.shape[1], -1).T


@dataclass
class _Evidence:
    """What one U-Net pass gives discovery (see `_attend`)."""

    profiles: torch.Tensor        # (n, V) cross-attention over the probe words
    self_attention: torch.Tensor | None   # (n, n), rows: queries
    grid: tuple                   # (h, w)
    words: list
    timesteps: torch.Tensor


def _grid_of(pipe, layers, latent_hw) -> tuple[int, int]:
    """(h, w) of the largest chosen cross-attention layer for a latent of ``latent_hw``."""
    from .attention import layer_resolutions

    side = max(layer_resolutions(pipe.unet, min(latent_hw))[n] for n in layers)
    f = min(latent_hw) / side
    return round(latent_hw[0] / f), round(latent_hw[1] / f)


def _average_self_attention(acc, grid) -> torch.Tensor:
    """Self-attention of every layer on the grid, averaged with weights proportional to
    the layer's resolution (DiffSeg): keys and queries upsampled bilinearly."""
    total, weight = 0.0, 0.0
    for name, s in acc.self_attn.items():
        shp = acc.shapes.spatial(s.shape[0])
        a = s / acc.count[name]
        a = _upsample_cells(a.T, shp, grid).T             # keys onto the grid
        a = _upsample_cells(a, shp, grid).clamp_min(0)    # queries onto the grid
        a = a / a.sum(1, keepdim=True).clamp_min(EPS)
        total, weight = total + shp[0] * a, weight + shp[0]
    return total / weight


@torch.no_grad()
def _attend(pipe, image, *, n_timesteps, t_range, layers, seed, want_self, max_words):
    """One U-Net pass over ``n_timesteps`` noised copies of the image, empty prompt."""
    from diffusers import DDPMScheduler

    unet = pipe.unet
    words = probe_words(pipe.tokenizer, max_words)
    probe = _probe_embeddings(pipe, words)
    latent = encode_pixels(pipe.vae, to_model_input(image, native_size(pipe)))
    latent = latent.to(unet.device, unet.dtype)
    hw = tuple(latent.shape[-2:])
    grid = _grid_of(pipe, layers, hw)
    cond = conditioning(pipe, [""])
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(t_range[0], t_range[1], (n_timesteps,), generator=g).sort().values
    noise = torch.randn((n_timesteps, *latent.shape[1:]), generator=g).to(latent)
    noiser = DDPMScheduler.from_config(pipe.scheduler.config)   # x_t = sqrt(a) x_0 + ...
    acc = _Accumulator(hw)
    max_pixels = grid[0] * grid[1] if want_self else 0
    with _recording(unet, acc, set(layers), probe, max_pixels):
        for start in range(0, n_timesteps, 16):
            tt = t[start:start + 16]
            z = noiser.add_noise(latent.expand(len(tt), -1, -1, -1),
                                 noise[start:start + 16], tt)
            unet(z, tt.to(unet.device), **cond.unet_kwargs(len(tt), unet.dtype),
                 return_dict=False)
    prof = torch.stack([_upsample_cells((acc.probe[n] / acc.count[n]).cpu(),
                                        acc.shapes.spatial(acc.probe[n].shape[0]), grid)
                        for n in layers]).mean(0).clamp_min(0)
    prof = prof / prof.sum(1, keepdim=True).clamp_min(EPS)
    sa = _average_self_attention(acc, grid).cpu() if want_self else None
    return _Evidence(prof, sa, grid, [w for w, _ in words], t)


# ----------------------------------------------------------------------------- masks
def _pixel_labels(image, features, centroids, temperature, refine, backend) -> np.ndarray:
    """(H, W) concept of every pixel: softmax(-KL(pixel profile, concept) / temperature),
    DenseCRF-refined on the image's colours, argmax. Computed at most `MAX_WORK_SIDE` a
    side, then upsampled."""
    H, W = image.shape[:2]
    s = min(1.0, MAX_WORK_SIDE / max(H, W))
    h, w = max(1, round(H * s)), max(1, round(W * s))
    up = _masks.resize_map(torch.as_tensor(features).permute(2, 0, 1).float(), (h, w))
    rows = up.clamp_min(0).reshape(up.shape[0], -1).T.numpy()
    d = np.concatenate([symmetric_kl(r, centroids) for r in np.array_split(
        rows, max(1, len(rows) // 4096))])
    probs = torch.softmax(torch.from_numpy(-d / temperature).float(), 1).T.reshape(-1, h, w)
    if refine and len(centroids) > 1:
        small = image if (h, w) == (H, W) else np.asarray(
            Image.fromarray(image).resize((w, h), Image.BICUBIC))
        probs = torch.as_tensor(_crf.dense_crf(small, probs, backend=backend).probs)
    if (h, w) != (H, W):
        probs = _masks.resize_map(probs, (H, W))
    return probs.argmax(0).numpy().astype(np.int64)


def _background(labels: np.ndarray, k: int) -> int:
    """The concept holding the most border pixels (ties: the larger concept)."""
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    on_border = np.bincount(border, minlength=k)
    area = np.bincount(labels.ravel(), minlength=k)
    return int(max(range(k), key=lambda c: (on_border[c], area[c])))


def _drop_empty(labels, grid_labels):
    """Renumber the concepts the pixels kept; a lost concept's cells go to the concept of
    their centre pixel."""
    H, W = labels.shape
    h, w = grid_labels.shape
    kept = np.unique(labels)
    if len(kept) == grid_labels.max() + 1:
        return labels, grid_labels
    ys = ((np.arange(h) + 0.5) * H / h).astype(int).clip(0, H - 1)
    xs = ((np.arange(w) + 0.5) * W / w).astype(int).clip(0, W - 1)
    centre = labels[np.ix_(ys, xs)]
    grid = np.where(np.isin(grid_labels, kept), grid_labels, centre)
    new = {old: i for i, old in enumerate(kept)}
    remap = np.vectorize(new.get)
    return remap(labels).astype(np.int64), remap(grid).astype(np.int64)


# ----------------------------------------------------------------------------- discovery
def _check_settings(pipe, method, features, threshold, min_area, max_concepts, n_timesteps,
                    temperature, seed, max_probe_words, t_range):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    check_number("threshold", threshold, 0, 1, lo_open=True)
    check_number("min_area", min_area, 0, 0.5, hi_open=True)
    check_number("max_concepts", max_concepts, 2, integer=True)
    check_number("n_timesteps", n_timesteps, 1, integer=True)
    check_number("temperature", temperature, 0, lo_open=True)
    check_number("seed", seed, 0, integer=True)
    check_number("max_probe_words", max_probe_words, 2, integer=True)
    if t_range is None:
        return None
    n_train = num_train_timesteps(pipe)
    if (not isinstance(t_range, (tuple, list)) or len(t_range) != 2):
        raise ValueError(f"t_range must be a pair (lo, hi), got {t_range!r}")
    lo = check_number("t_range[0]", t_range[0], 0, n_train - 1, integer=True)
    hi = check_number("t_range[1]", t_range[1], lo + 1, n_train, integer=True)
    return lo, hi


def discover_concepts(pipe, image, *, method: str = "agglomerative",
                      features: str = "cross-attention", threshold: float = 0.4,
                      min_area: float = 0.01, max_concepts: int = 8, n_timesteps: int = 16,
                      t_range=None, layers=None, seed: int = 0, refine: bool = True,
                      temperature: float = 1.0, max_probe_words: int = 1024,
                      resize: bool = False, crf_backend: str = "auto") -> Discovery:
    """The concepts of ``image`` (their number and masks), from the model's own attention.

    See the module docstring for the method. The model is not changed: attention is
    recorded through ``unet.set_attn_processor`` and the original processors are restored.

    Args:
        pipe: a Stable-Diffusion-style pipeline (``vae``, ``text_encoder``, ``tokenizer``,
            ``unet``, ``scheduler``).
        image: a path, PIL image, (H, W, 3) array or tensor at the pipeline's native size
            (`conceptlab.models.to_uint8`).
        method: how the grid's cells are clustered and K chosen: one of `METHODS`.
        features: what is clustered: one of `FEATURES`.
        threshold: relative merge distance in (0, 1] at which "agglomerative" cuts its
            tree (chosen on a development suite of the shapes world; higher: fewer
            concepts).
        min_area: a cluster under this fraction of the grid joins the closest larger one.
        max_concepts: at most this many concepts (the background included).
        n_timesteps: noised copies the attention is averaged over.
        t_range: (lo, hi) timesteps, hi exclusive; default: the model's
            (`conceptlab.maps.default_attention_config`).
        layers: cross-attention layers (as for `conceptlab.maps.resolve_layers`); default:
            the model's.
        seed: seeds the timesteps, the noise and the k-means of "spectral": same seed,
            same result.
        refine: refine the masks with a DenseCRF on the image's colours.
        temperature: of the pixel probabilities ``softmax(-KL / temperature)``, in nats.
        max_probe_words: at most this many vocabulary words in the profiles.
        resize: resize an image of another size (with a warning) instead of refusing it.
        crf_backend: as for `conceptlab.crf.dense_crf`.

    Returns:
        The `Discovery`: ``.masks`` (K, H, W), ``.background``, ``.k`` and the evidence.

    Raises:
        ValueError: a setting out of range, an unknown method or feature kind, or an image
            of the wrong size (without ``resize``).
        TypeError: ``image`` is not an image.
    """
    t_range = _check_settings(pipe, method, features, threshold, min_area, max_concepts,
                              n_timesteps, temperature, seed, max_probe_words, t_range)
    img = to_uint8(image, native_size(pipe), resize)
    cfg = default_attention_config(pipe) if layers is None or t_range is None else {}
    names = cfg["layers"] if layers is None else resolve_layers(pipe.unet, layers)
    t_range = cfg["t_range"] if t_range is None else t_range
    ev = _attend(pipe, img, n_timesteps=n_timesteps, t_range=t_range, layers=names, seed=seed,
                 want_self=features != "cross-attention", max_words=max_probe_words)
    feats = {"cross-attention": ev.profiles, "self-attention": ev.self_attention}.get(
        features)
    if feats is None:
        feats = torch.cat([ev.profiles, ev.self_attention], 1) / 2
    f = feats.double().numpy()
    grid_labels, per_k, scores = cluster_cells(
        f, ev.grid, method=method, threshold=threshold, min_area=min_area,
        max_concepts=max_concepts, seed=seed)
    k = int(grid_labels.max()) + 1
    cells = grid_labels.ravel()
    labels = _pixel_labels(img, f.reshape(*ev.grid, -1), _centroids(f, cells, k),
                           temperature, refine, crf_backend)
    labels, grid_labels = _drop_empty(labels, grid_labels)
    k = int(labels.max()) + 1
    prof = ev.profiles.numpy()
    return Discovery(
        masks=labels[None] == np.arange(k)[:, None, None], background=_background(labels, k),
        labels=labels, grid_labels=grid_labels,
        features=f.reshape(*ev.grid, -1).astype(np.float32), feature_kind=features,
        words=tuple(ev.words), profiles=prof.reshape(*ev.grid, -1).astype(np.float32),
        concept_profiles=_centroids(prof, grid_labels.ravel(), k).astype(np.float32),
        labels_per_k=per_k, scores=scores,
        threshold=float(threshold) if method == "agglomerative" else None, method=method,
        timesteps=ev.timesteps.numpy(), seed=int(seed))


# ----------------------------------------------------------------------------- similarity
def _profiles_of(item, i):
    if isinstance(item, Discovery):
        return item.concept_profiles, item.background
    p = np.asarray(item)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"item {i}: expected a Discovery or a (K, D) array of concept "
                         f"profiles, got shape {p.shape}")
    return p, None


def similar_concepts(discoveries_or_profiles, *, min_similarity: float = 0.5,
                     include_background: bool = False) -> list[ConceptMatch]:
    """Which discovered concepts of several images look alike.

    Two concepts are compared by their cross-attention profiles over the model's vocabulary
    (``Discovery.concept_profiles``: the words the model reads in them), with the
    Bhattacharyya coefficient ``sum_v sqrt(p_v q_v)`` (1: identical profiles, 0: disjoint).
    For each pair of images, the concepts are matched one to one (Hungarian matching, the
    largest total similarity) and the matches of at least ``min_similarity`` are kept.

    Args:
        discoveries_or_profiles: per image, a `Discovery` or a (K, D) array of
            non-negative concept profiles (rows are normalised to sum 1).
        min_similarity: the smallest similarity reported, in [0, 1].
        include_background: also match the background concepts of `Discovery` items
            (arrays have no background).

    Returns:
        The matches, most similar first.

    Raises:
        ValueError: fewer than two images, an item of the wrong shape, profiles of
            different lengths, or ``min_similarity`` out of range.
    """
    from scipy.optimize import linear_sum_assignment

    check_number("min_similarity", min_similarity, 0, 1)
    items = list(discoveries_or_profiles)
    if len(items) < 2:
        raise ValueError(f"similar_concepts needs at least two images, got {len(items)}")
    parsed = [_profiles_of(x, i) for i, x in enumerate(items)]
    if len({p.shape[1] for p, _ in parsed}) > 1:
        raise ValueError("the profiles have different lengths: discover every image with "
                         "the same pipeline and max_probe_words")
    sq = [np.sqrt(_rows(p)) for p, _ in parsed]
    out = []
    for a, b in itertools.combinations(range(len(items)), 2):
        keep_a = [k for k in range(len(sq[a])) if include_background or k != parsed[a][1]]
        keep_b = [k for k in range(len(sq[b])) if include_background or k != parsed[b][1]]
        if not keep_a or not keep_b:
            continue
        sim = np.clip(sq[a][keep_a] @ sq[b][keep_b].T, 0, 1)
        for r, c in zip(*linear_sum_assignment(-sim)):
            if sim[r, c] >= min_similarity:
                out.append(ConceptMatch(a, keep_a[r], b, keep_b[c], float(sim[r, c])))
    return sorted(out, key=lambda m: (-m.similarity, m.image_a, m.concept_a, m.image_b))
