"""New text tokens, one per concept: add them, train only their rows, save and load them.

A concept token such as ``[v1]`` is an *added token* of the pipeline's tokenizer (it is never
split, and it always tokenises to exactly one id) with its own row in the text encoder's
token-embedding table::

    concepts = add_concept_tokens(pipe, 2, init_words=["shape", None])
    concepts.names                     # ['[v1]', '[v2]']
    emb = pipe.text_encoder.get_input_embeddings().weight
    emb[concepts.token_ids]            # (2, D): the rows that training changes

Where the values live
    The *live* values are the rows ``concepts.token_ids`` of the pipeline's embedding table:
    that is what the text encoder reads, what training updates and what generation uses.
    ``concepts.embeddings`` is a detached snapshot (K, D) of those rows, refreshed by
    :meth:`ConceptTokens.update_from` (training does it at the end and at every checkpoint)
    and written by :func:`save_concepts`.

Training only those rows
    :func:`conceptlab.train.embedding.trainable_embedding` (the trainer's job).

Files (:func:`save_concepts`)
    ``concepts.safetensors``: tensor ``embeddings`` (K, D), metadata (all strings) ``names``
    and ``init_words`` (JSON lists), ``base_model``, ``hidden_size``, ``conceptlab_version``,
    ``format``. Optional ``unet_delta.safetensors`` beside it: phase-2 U-Net weights, either
    full deltas (``trained - base`` for every U-Net parameter; metadata ``mode=full``) or
    LoRA adapter weights (``mode=lora``, needs ``peft``).

Why one module of about 440 lines: adding, saving and loading tokens must apply the same
name and model rules both ways, so they live together; a third is docstrings.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field

import torch

from ._version import __version__
from .unet_delta import apply_unet_delta, read_unet_delta

CONCEPTS_FILE = "concepts.safetensors"
UNET_DELTA_FILE = "unet_delta.safetensors"
FORMAT = "conceptlab-concepts-1"


# ----------------------------------------------------------------------------- helpers
def embedding_weight(pipe) -> torch.nn.Parameter:
    """The text encoder's token-embedding table (V, D) of a pipeline."""
    return pipe.text_encoder.get_input_embeddings().weight


def model_name(pipe) -> str:
    """A human-readable name of the pipeline's base model (its folder / hub id if known)."""
    for obj in (pipe, getattr(pipe, "config", None)):
        name = getattr(obj, "name_or_path", None) or (
            obj.get("_name_or_path") if isinstance(obj, dict) else None)
        if name:
            return str(name)
    te = pipe.text_encoder.config
    base_vocab = len(pipe.tokenizer) - len(added_token_ids(pipe.tokenizer))  # without concepts
    return (f"unnamed pipeline ({type(pipe.text_encoder).__name__}, "
            f"hidden size {te.hidden_size}, vocabulary {base_vocab})")


def added_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens added to ``tokenizer`` after it was built (concept tokens of this or
    earlier runs), special tokens excluded."""
    special = set(tokenizer.all_special_tokens)
    return sorted(i for t, i in tokenizer.get_added_vocab().items() if t not in special)


def vocabulary_mean_norm(pipe, exclude_ids=()) -> float:
    """Mean L2 norm of the model's OWN embedding rows: every added token (the concepts of
    this run and of any earlier run in the same pipeline) and ``exclude_ids`` are left
    out, so the reference does not depend on what was learned before."""
    w = embedding_weight(pipe).detach().float()
    keep = torch.ones(w.shape[0], dtype=torch.bool)
    drop = list(exclude_ids) + added_token_ids(pipe.tokenizer)
    drop = [i for i in drop if i < w.shape[0]]
    if drop:
        keep[torch.as_tensor(drop, dtype=torch.long)] = False
    return float(w[keep].norm(dim=1).mean())


def single_token_id(tokenizer, name: str) -> int | None:
    """The id of ``name`` if it tokenises to exactly one token, else None."""
    ids = tokenizer(name, add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 else None


def _in_vocab(tokenizer, name: str) -> bool:
    return name in tokenizer.get_vocab()


def _is_existing_token(tokenizer, name: str) -> bool:
    """True if ``name`` already is a token: in the vocabulary, or a word that tokenises to
    one known (non-unknown) token, e.g. 'circle' -> 'circle</w>'."""
    if _in_vocab(tokenizer, name):
        return True
    i = single_token_id(tokenizer, name)
    return i is not None and i != tokenizer.unk_token_id


# ----------------------------------------------------------------------------- concept tokens
@dataclass
class ConceptTokens:
    """The new tokens of a set of concepts and a snapshot of their embeddings.

    names        token strings, e.g. ``['[v1]', '[v2]']`` (concept k is ``names[k]``)
    init_words   the word each row was initialised from (None: random)
    token_ids    ids of the tokens in the pipeline they were added to
    embeddings   (K, D) float32 snapshot of the rows (see :meth:`update_from`)
    base_model   name of the model they belong to (:func:`model_name`)
    hidden_size  D, the text encoder's hidden size
    """

    names: list[str]
    init_words: list[str | None]
    token_ids: list[int]
    embeddings: torch.Tensor
    base_model: str = ""
    hidden_size: int = 0
    unet_delta: dict | None = field(default=None, repr=False)  # phase-2 weights, if any
    unet_mode: str = "none"  # "none" | "full" | "lora"
    lora_config: dict | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """Concept index of a token name."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"{name!r} is not one of the concept tokens {self.names}") from None

    def prompt(self, concepts=None, template: str = "a photo of {}", joiner: str = " and ") -> str:
        """Prompt naming the given concepts (indices or names; default all):
        ``template.format(joiner.join(tokens))``, e.g. 'a photo of [v1] and [v2]'."""
        concepts = range(len(self)) if concepts is None else concepts
        toks = [c if isinstance(c, str) else self.names[c] for c in concepts]
        return template.format(joiner.join(toks))

    def update_from(self, pipe) -> ConceptTokens:
        """Copy the live rows from ``pipe``'s embedding table into :attr:`embeddings`."""
        w = embedding_weight(pipe)
        self.embeddings = w.detach()[list(self.token_ids)].float().cpu().clone()
        return self

    def write_to(self, pipe) -> ConceptTokens:
        """Copy :attr:`embeddings` into ``pipe``'s rows (the tokens must be present)."""
        w = embedding_weight(pipe)
        with torch.no_grad():
            w[list(self.token_ids)] = self.embeddings.to(w.dtype).to(w.device)
        return self

    def present_in(self, pipe) -> bool:
        """True when every name is a single token of ``pipe`` with the recorded id."""
        return all(single_token_id(pipe.tokenizer, n) == i
                   for n, i in zip(self.names, self.token_ids))

    def norms(self) -> list[float]:
        return [float(v) for v in self.embeddings.float().norm(dim=1)]


def _add_tokens(pipe, names: list[str]) -> list[int]:
    """Add ``names`` as tokens, resize the embedding table and return their ids."""
    tok = pipe.tokenizer
    n_added = tok.add_tokens(list(names))
    if n_added != len(names):
        raise ValueError(f"the tokenizer added {n_added} of the tokens {names}")
    try:  # rows are set by the caller: skip transformers' mean/covariance initialisation
        pipe.text_encoder.resize_token_embeddings(len(tok), mean_resizing=False)
    except TypeError:  # transformers < 4.46
        pipe.text_encoder.resize_token_embeddings(len(tok))
    ids = []
    for name in names:
        i = single_token_id(tok, name)
        if i is None or i != tok.convert_tokens_to_ids(name):
            got = tok.convert_ids_to_tokens(tok(name, add_special_tokens=False).input_ids)
            raise ValueError(
                f"after adding, {name!r} tokenises to {got}, not to one token: choose a name "
                "without spaces and in lower case (the tokenizer lower-cases text), "
                "e.g. '[v1]'")
        ids.append(i)
    return ids


def add_concept_tokens(pipe, concepts=1, init_words=None, *, init: str = "mean",
                       prefix: str = "v", seed: int = 0) -> ConceptTokens:
    """Add one new token per concept to ``pipe`` and initialise its embedding row.

    concepts    number of concepts K (names ``[v1]`` .. ``[vK]``, or ``[{prefix}1]`` ..),
                or a list of token names.
    init_words  None, one word for every concept, or a list of K words / None. A row is
                initialised from its word's embedding: ``init="mean"`` averages the
                embeddings of the word's sub-tokens (a multi-token word like 'person' in a
                small vocabulary), ``init="first"`` takes its first sub-token. A None word
                gives a random row: Gaussian direction (seeded with ``seed + k``) scaled to
                the vocabulary's mean norm.
    Raises ValueError for a name already in the vocabulary or an init word that
    tokenises to nothing or to the tokenizer's unknown token; warns when an init word splits
    into several sub-tokens.
    """
    tok = pipe.tokenizer
    if isinstance(concepts, int):
        if concepts < 1:
            raise ValueError(f"need at least one concept, got {concepts}")
        names = [f"[{prefix}{i}]" for i in range(1, concepts + 1)]
    else:
        names = [str(n) for n in concepts]
    names = check_concept_names(tok, names)
    K = len(names)
    if init_words is None or isinstance(init_words, str):
        init_words = [init_words] * K
    init_words = list(init_words)
    if len(init_words) != K:
        raise ValueError(f"got {len(init_words)} init words for {K} concepts {names}")
    if init not in ("mean", "first"):
        raise ValueError(f"init must be 'mean' or 'first', got {init!r}")
    sub_ids = []
    for w in init_words:
        if w is None:
            sub_ids.append(None)
            continue
        ids = tok(str(w), add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"init word {w!r} tokenises to nothing: pass a real word or None")
        if tok.unk_token_id is not None and tok.unk_token_id in ids:
            raise ValueError(
                f"init word {w!r} has characters this model's tokenizer cannot represent (they "
                f"become the unknown token {tok.unk_token!r}): pass a word of its vocabulary "
                "(the bundled model knows the shapes world's words: star, heart, ...) or None")
        if len(ids) > 1:
            pieces = tok.convert_ids_to_tokens(ids)
            warnings.warn(f"init word {w!r} is not one token of this vocabulary: it splits into "
                          f"{pieces}, and the row starts from "
                          f"{'their mean' if init == 'mean' else 'the first'} (init={init!r})",
                          stacklevel=2)
        sub_ids.append(ids)

    old = embedding_weight(pipe).detach().clone()
    ref_norm = float(old.float().norm(dim=1).mean())
    ids = _add_tokens(pipe, names)
    w = embedding_weight(pipe)
    rows = []
    for k, sid in enumerate(sub_ids):
        if sid is None:
            g = torch.Generator().manual_seed(seed + k)
            v = torch.randn(old.shape[1], generator=g)
            rows.append(v / v.norm() * ref_norm)
        elif init == "mean":
            rows.append(old[sid].float().mean(0))
        else:
            rows.append(old[sid[0]].float())
    emb = torch.stack(rows)
    with torch.no_grad():
        w[ids] = emb.to(w.dtype).to(w.device)
    return ConceptTokens(names=names, init_words=init_words, token_ids=ids,
                         embeddings=emb.clone(), base_model=model_name(pipe),
                         hidden_size=int(old.shape[1]))


# ----------------------------------------------------------------------------- save / load
def save_concepts(concepts: ConceptTokens, directory, pipe=None) -> str:
    """Write ``concepts.safetensors`` (and ``unet_delta.safetensors`` if the concepts carry
    phase-2 U-Net weights) into ``directory``; returns the directory.

    Pass ``pipe`` to first refresh the snapshot from the pipeline's live rows.
    """
    from safetensors.torch import save_file

    if pipe is not None:
        concepts.update_from(pipe)
    os.makedirs(directory, exist_ok=True)
    meta = {
        "format": FORMAT,
        "names": json.dumps(list(concepts.names)),
        "init_words": json.dumps(list(concepts.init_words)),
        "base_model": str(concepts.base_model),
        "hidden_size": str(int(concepts.hidden_size or concepts.embeddings.shape[1])),
        "conceptlab_version": __version__,
        "unet_mode": concepts.unet_mode,
    }
    emb = concepts.embeddings.detach().float().cpu().contiguous()
    save_file({"embeddings": emb}, os.path.join(directory, CONCEPTS_FILE), metadata=meta)
    delta_path = os.path.join(directory, UNET_DELTA_FILE)
    if concepts.unet_delta:
        dmeta = {"format": FORMAT, "mode": concepts.unet_mode,
                 "base_model": str(concepts.base_model), "conceptlab_version": __version__,
                 "lora_config": json.dumps(concepts.lora_config or {})}
        tensors = {k: v.detach().cpu().contiguous() for k, v in concepts.unet_delta.items()}
        save_file(tensors, delta_path, metadata=dmeta)
    elif os.path.exists(delta_path):
        os.remove(delta_path)  # a stale delta from an earlier save would be loaded by mistake
    return str(directory)


class ConceptsFileError(ValueError):
    """A concepts folder or file that is missing pieces, truncated or not conceptlab's."""


def read_concepts_file(directory) -> tuple[torch.Tensor, dict]:
    """(embeddings, metadata) of a saved concepts folder (or a .safetensors file).

    Raises FileNotFoundError when there is nothing saved there and
    :class:`ConceptsFileError` (a ValueError) when the file is truncated, corrupt, partial
    (names and rows disagree) or holds non-finite values. Never unpickles anything.
    """
    from safetensors import SafetensorError, safe_open

    path = str(directory)
    if os.path.isdir(path):
        path = os.path.join(path, CONCEPTS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no saved concepts at {path}: save them with save_concepts "
                                "(or `conceptlab learn --out FOLDER`)")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            if "embeddings" not in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                raise ConceptsFileError(f"{path} has no 'embeddings' tensor: not a concepts file")
            emb = f.get_tensor("embeddings")
    except (SafetensorError, OSError) as e:
        raise ConceptsFileError(f"{path} is truncated or corrupt ({e}): save the concepts "
                                "again") from None
    if meta.get("format") != FORMAT:
        raise ConceptsFileError(f"{path} is not a conceptlab concepts file (format "
                                f"{meta.get('format')!r}, expected {FORMAT!r})")
    try:
        meta["names"] = json.loads(meta.get("names", "[]"))
        meta["init_words"] = json.loads(meta.get("init_words", "[]"))
        meta["hidden_size"] = int(meta.get("hidden_size", emb.shape[-1]))
    except (ValueError, TypeError) as e:
        raise ConceptsFileError(f"{path} has unreadable metadata ({e})") from None
    names = meta["names"]
    if (not isinstance(names, list) or not names
            or not all(isinstance(n, str) for n in names)):
        raise ConceptsFileError(f"{path}: 'names' must be a non-empty list of token strings, "
                                f"got {names!r}")
    if emb.ndim != 2 or emb.shape[0] != len(names):
        raise ConceptsFileError(f"{path} is partial: {len(names)} names but embeddings of "
                                f"shape {tuple(emb.shape)}")
    if not torch.isfinite(emb).all():
        bad = [names[i] for i in range(len(names)) if not torch.isfinite(emb[i]).all()]
        raise ConceptsFileError(f"{path}: the rows of {bad} contain NaN or infinite values")
    return emb, meta


def check_concept_names(tokenizer, names, *, reloading: bool = False) -> list[str]:
    """The rules every concept token name follows (when added and when loaded): distinct,
    one word, not an ordinary token of the model's vocabulary (so learning or loading a
    concept can never redefine a word like 'star'). With ``reloading=True`` a name that is
    already an *added* token (an earlier load of the same concepts) is allowed."""
    names = [str(n) for n in names]
    if not names:
        raise ValueError("no concept names given")
    if len(set(names)) != len(names):
        raise ValueError(f"concept names must be distinct, got {names}")
    added = set(tokenizer.get_added_vocab()) - set(tokenizer.all_special_tokens)
    for n in names:
        if not n or any(c.isspace() for c in n):
            raise ValueError(f"a concept token name must be one word without spaces, got {n!r}")
        if reloading and n in added:
            continue
        if _is_existing_token(tokenizer, n):
            raise ValueError(
                f"{n!r} is already in the tokenizer's vocabulary (this pipeline already has "
                "it, or it is an ordinary token): build a fresh pipeline, load saved concepts "
                "with load_concepts, or pick other names (e.g. prefix='w')")
    return names


def load_concepts(pipe, directory, *, load_unet: bool = False,
                  allow_other_model: bool = False) -> ConceptTokens:
    """Load saved concepts into ``pipe``: tokens that are missing are added, tokens added
    by an earlier load get their rows overwritten. ``load_unet=True`` also applies saved
    phase-2 U-Net weights.

    The same name rules as :func:`add_concept_tokens` apply: a file whose names include an
    ordinary word of the vocabulary is refused. Raises ValueError when the text encoder's
    hidden size differs from the model the concepts were trained on, and when the recorded
    base model differs from this pipeline's (pass ``allow_other_model=True`` to load
    anyway, with a warning: e.g. the same model copied to another folder).
    """
    import warnings

    emb, meta = read_concepts_file(directory)
    names = meta["names"]
    D = embedding_weight(pipe).shape[1]
    if meta["hidden_size"] != D or emb.shape != (len(names), meta["hidden_size"]):
        raise ValueError(
            f"these concepts were trained on {meta.get('base_model', '?')!r} (text hidden size "
            f"{meta['hidden_size']}), but this pipeline's text encoder has hidden size {D}: "
            "load them into that model")
    base, here = meta.get("base_model", ""), model_name(pipe)
    if base and not same_model(base, here):
        msg = (f"these concepts were trained on {base!r} but this pipeline is {here!r}: "
               "tokens learned on one model mean nothing to another")
        if not allow_other_model:
            raise ValueError(msg + "; pass allow_other_model=True if it is the same model "
                             "in another place")
        warnings.warn(msg, stacklevel=2)
    tok = pipe.tokenizer
    check_concept_names(tok, names, reloading=True)
    missing = [n for n in names if not _in_vocab(tok, n)]
    if missing:
        _add_tokens(pipe, missing)
    ids = []
    for n in names:
        i = single_token_id(tok, n)
        if i is None:
            raise ValueError(f"{n!r} does not tokenise to a single token in this pipeline")
        ids.append(i)
    concepts = ConceptTokens(names=list(names), init_words=list(meta["init_words"]),
                             token_ids=ids, embeddings=emb.float(),
                             base_model=meta.get("base_model", ""), hidden_size=D)
    concepts.write_to(pipe)
    delta_path = os.path.join(str(directory), UNET_DELTA_FILE) if os.path.isdir(
        str(directory)) else None
    if load_unet:
        if delta_path is None or not os.path.exists(delta_path):
            raise FileNotFoundError(f"load_unet=True but there is no {UNET_DELTA_FILE} in "
                                    f"{directory} (the concepts were trained without phase 2)")
        delta, dmeta = read_unet_delta(delta_path)
        concepts.unet_mode = dmeta.get("mode", "full")
        concepts.lora_config = json.loads(dmeta.get("lora_config", "{}")) or None
        concepts.unet_delta = delta
        apply_unet_delta(pipe.unet, delta, concepts.unet_mode, concepts.lora_config)
    return concepts


def same_model(a: str, b: str) -> bool:
    """Whether two :func:`model_name` strings name the same model: equal, or the same
    folder name (a bundled model found through another path, a hub id and its download)."""
    a, b = str(a).rstrip("/"), str(b).rstrip("/")
    return a == b or os.path.basename(a) == os.path.basename(b)


__all__ = [
    "CONCEPTS_FILE",
    "UNET_DELTA_FILE",
    "ConceptTokens",
    "ConceptsFileError",
    "add_concept_tokens",
    "added_token_ids",
    "check_concept_names",
    "embedding_weight",
    "load_concepts",
    "model_name",
    "read_concepts_file",
    "same_model",
    "save_concepts",
    "single_token_id",
    "vocabulary_mean_norm",
]
