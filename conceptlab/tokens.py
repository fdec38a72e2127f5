"""Concept tokens: one new text token per concept, applied to a pipeline only while used.

A concept is a new token such as ``[v1]`` with its own row in the text encoder's
token-embedding table. :class:`ConceptTokens` holds the rows (and, after a phase 2, the
U-Net change); it never lives inside a pipeline. Applying is explicit and undone after use::

    concepts = new_concepts(pipe, 2, init_words=["star", None])   # pipe is not changed
    with concepts.applied(pipe) as ids:     # the tokens and rows are in pipe here...
        image = pipe("a photo of [v1]").images[0]
    # ...and gone here: tokenizer, text encoder and U-Net are as they were, bit for bit

How applying works: the pipeline's tokenizer is swapped for a copy with the tokens added;
the text encoder's embedding module is swapped for a larger copy with the concept rows;
a phase-2 U-Net change is applied as a LoRA adapter (removed after) or as swapped weight
tensors (put back after). The original objects are never written to. Applying the same
concepts again inside their own ``applied`` block does nothing (nested calls are free).

Files (:mod:`conceptlab.concept_files`, ``save_concepts``): one diffusers textual-inversion file per concept,
LoRA weights as ``pytorch_lora_weights.safetensors`` or a full U-Net as a diffusers
``unet/`` folder, and a small ``concepts.json`` sidecar.

Why one module of about 450 lines: a token is a row in every text encoder of the model (two
for SDXL) and an entry in every tokenizer; adding, applying, copying and checking them read
the same per-encoder tables, and split they would pass those tables between modules.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from .unet_delta import UNetChange, unet_change_applied

#: tokenizer copy -> {token name: the ConceptTokens applied through it}
_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: U-Net -> (id of the text encoder, weights fingerprint): a model's identity, computed once
_IDENTITY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_fingerprint(pipe) -> str:
    """Which model a pipeline is: the hash of its weights
    (:func:`conceptlab.models.weights_fingerprint`), computed once per pipeline."""
    from .models import weights_fingerprint

    known = _IDENTITY.get(pipe.unet)
    if known is None or known[0] != id(pipe.text_encoder):
        known = (id(pipe.text_encoder), weights_fingerprint(pipe))
        _IDENTITY[pipe.unet] = known
    return known[1]


# ----------------------------------------------------------------------------- helpers
def embedding_weight(pipe) -> torch.nn.Parameter:
    """The (first) text encoder's token-embedding table (V, D) of a pipeline."""
    return pipe.text_encoder.get_input_embeddings().weight


#: the (tokenizer, text encoder) attribute pairs of a pipeline, in the order of their rows
ENCODER_ATTRS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


def encoder_attrs(pipe) -> list[tuple[str, str]]:
    """The (tokenizer, text encoder) attribute names the pipeline has: one pair, or two for
    SDXL. A concept's row is the concatenation of its rows in each encoder's table."""
    return [a for a in ENCODER_ATTRS if getattr(pipe, a[1], None) is not None]


def embedding_tables(pipe) -> list[torch.nn.Parameter]:
    """Every text encoder's token-embedding table, in :func:`encoder_attrs` order."""
    return [getattr(pipe, te).get_input_embeddings().weight for _, te in encoder_attrs(pipe)]


def embedding_widths(pipe) -> list[int]:
    """The hidden size of each text encoder (SDXL: [768, 1280])."""
    return [int(w.shape[1]) for w in embedding_tables(pipe)]


def model_name(pipe) -> str:
    """A human-readable name of the pipeline's base model (its folder / hub id if known)."""
    for obj in (pipe, getattr(pipe, "config", None)):
        name = getattr(obj, "name_or_path", None) or (
            obj.get("_name_or_path") if isinstance(obj, dict) else None)
        if name:
            return str(name)
    te = pipe.text_encoder.config
    return (f"unnamed pipeline ({type(pipe.text_encoder).__name__}, "
            f"hidden size {te.hidden_size}, vocabulary {len(pipe.tokenizer)})")


def added_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens added to ``tokenizer`` after it was built, special tokens excluded."""
    special = set(tokenizer.all_special_tokens)
    return sorted(i for t, i in tokenizer.get_added_vocab().items() if t not in special)


def vocabulary_mean_norm(pipe, exclude_ids=()) -> float:
    """Mean L2 norm of the model's own embedding rows (added tokens and ``exclude_ids`` left
    out), the scale of a random initial row and of the norm penalty."""
    squares = 0.0
    for (tok_attr, _), table in zip(encoder_attrs(pipe), embedding_tables(pipe)):
        w = table.detach().float()
        keep = torch.ones(w.shape[0], dtype=torch.bool)
        drop = [i for i in list(exclude_ids) + added_token_ids(getattr(pipe, tok_attr))
                if i < w.shape[0]]
        if drop:
            keep[torch.as_tensor(drop, dtype=torch.long)] = False
        squares += float(w[keep].norm(dim=1).mean()) ** 2
    return squares ** 0.5  # one table: its mean norm; SDXL: that of the joined rows


def single_token_id(tokenizer, name: str) -> int | None:
    """The id of ``name`` if it tokenises to exactly one token, else None."""
    ids = tokenizer(name, add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 else None


def _is_existing_token(tokenizer, name: str) -> bool:
    """True if ``name`` already is a token: in the vocabulary, or a word that tokenises to
    one known (non-unknown) token, e.g. 'circle' -> 'circle</w>'."""
    if name in tokenizer.get_vocab():
        return True
    i = single_token_id(tokenizer, name)
    return i is not None and i != tokenizer.unk_token_id


#: the longest concept token name accepted (``[v1]``, ``<cat-toy>``: a few characters)
MAX_NAME_LENGTH = 64


def check_concept_names(tokenizer, names) -> list[str]:
    """The rules every concept token name follows, whether given in code or read from a file.

    Args:
        tokenizer: the pipeline's tokenizer.
        names: the token strings.

    Returns:
        The names as strings.

    Raises:
        ValueError: a name is empty, longer than ``MAX_NAME_LENGTH``, has spaces, repeats,
            does not begin and end with a sign such as a bracket, or is already a token of
            the vocabulary (so a concept can never redefine a word like 'star', nor match
            inside 'superstars').
    """
    names = [str(n) for n in names]
    if not names:
        raise ValueError("no concept names given")
    if len(set(names)) != len(names):
        raise ValueError(f"concept names must be distinct, got {names}")
    for n in names:
        if len(n) > MAX_NAME_LENGTH:
            raise ValueError(f"a concept token name has at most {MAX_NAME_LENGTH} characters, "
                             f"got one of {len(n)} ({n[:20]}...)")
        if not n or any(c.isspace() for c in n):
            raise ValueError(f"a concept token name must be one word without spaces, got {n!r}")
        if n[0].isalnum() or n[-1].isalnum():
            # an added token is matched inside any text: "stars" would take over "superstars"
            raise ValueError(f"a concept token name must begin and end with a bracket or other "
                             f"sign, like '[v1]' or '<cat-toy>', so that it never matches "
                             f"inside an ordinary word; got {n!r}")
        if _is_existing_token(tokenizer, n):
            raise ValueError(
                f"{n!r} is already a token of this pipeline's tokenizer (an ordinary word, or "
                "a token loaded by another tool): pick other names, e.g. '[v1]'")
    return names


def same_model(a: str, b: str) -> bool:
    """Whether two :func:`model_name` strings name the same model (equal, or the same
    folder name: a bundled model found through another path, a hub id and its download)."""
    a, b = str(a).rstrip("/"), str(b).rstrip("/")
    return a == b or os.path.basename(a) == os.path.basename(b)


# ----------------------------------------------------------------------------- concept tokens
@dataclass
class ConceptTokens:
    """The learned concepts: token names, their embedding rows and any U-Net change.

    Attributes:
        names: token strings, e.g. ``['[v1]', '[v2]']``; concept k is ``names[k]``.
        init_words: the word each row started from (None: a random row).
        embeddings: (K, D) float32 rows (SDXL: each row is its CLIP-L row, 768 wide,
            then its CLIP-G row, 1280 wide).
        base_model: name of the model they were learned on (:func:`model_name`).
        unet: the phase-2 U-Net change (:class:`~conceptlab.unet_delta.UNetChange`), or None.
        base_fingerprint: the weights fingerprint of the model they were learned on
            (:func:`model_fingerprint`); "" for concepts from elsewhere (no check).
        widths: the width of each text encoder's part of a row (:func:`embedding_widths`:
            ``[768, 1280]`` for SDXL); None: one text encoder, the whole row.
    """

    names: list[str]
    init_words: list[str | None]
    embeddings: torch.Tensor
    base_model: str = ""
    unet: UNetChange | None = field(default=None, repr=False)
    base_fingerprint: str = ""
    widths: list[int] | None = None

    def __len__(self) -> int:
        return len(self.names)

    @property
    def hidden_size(self) -> int:
        return int(self.embeddings.shape[1])

    def index(self, name: str) -> int:
        """Concept index of a token name."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"{name!r} is not one of the concept tokens {self.names}") from None

    def prompt(self, concepts=None, template: str = "a photo of {}", joiner: str = " and ") -> str:
        """``template.format(joiner.join(tokens))`` for the given concepts (indices or names;
        default all), e.g. 'a photo of [v1] and [v2]'."""
        concepts = range(len(self)) if concepts is None else concepts
        toks = [c if isinstance(c, str) else self.names[c] for c in concepts]
        return template.format(joiner.join(toks))

    def norms(self) -> list[float]:
        return [float(v) for v in self.embeddings.float().norm(dim=1)]

    def update_from(self, pipe) -> ConceptTokens:
        """Copy the live rows of an applied pipeline into :attr:`embeddings`."""
        rows = [table.detach()[ids].float().cpu()
                for table, ids in zip(embedding_tables(pipe), token_ids_per_encoder(pipe, self.names))]
        self.embeddings = torch.cat(rows, dim=1).clone()
        return self

    def applied(self, pipe):
        """Context manager: these concepts in ``pipe`` for the block, removed after.

        Yields the token ids. Inside the block of the same concepts it does nothing.

        Raises:
            ValueError: a name is already a token of ``pipe`` (an ordinary word, or a token
                applied by another tool), the hidden sizes differ, or the concepts were
                learned on another model.
        """
        return apply_concepts(pipe, self)


def token_ids_in(pipe, names) -> list[int]:
    """Ids of the concept tokens ``names`` in an applied pipeline."""
    ids = [single_token_id(pipe.tokenizer, n) for n in names]
    if any(i is None for i in ids):
        raise ValueError(f"the tokens {list(names)} are not in this pipeline: use them inside "
                         "`with concepts.applied(pipe):`")
    return ids


def token_ids_per_encoder(pipe, names) -> list[list[int]]:
    """The ids of ``names`` in each tokenizer of an applied pipeline (:func:`encoder_attrs`)."""
    out = []
    for tok_attr, _ in encoder_attrs(pipe):
        ids = [single_token_id(getattr(pipe, tok_attr), n) for n in names]
        if any(i is None for i in ids):
            raise ValueError(f"the tokens {list(names)} are not in this pipeline's {tok_attr}: "
                             "use them inside `with concepts.applied(pipe):`")
        out.append(ids)
    return out


def _check_fits(pipe, concepts: ConceptTokens):
    D = sum(embedding_widths(pipe))
    if concepts.widths is not None and list(concepts.widths) != embedding_widths(pipe):
        raise ValueError(
            f"these concepts have rows for text encoders of widths {list(concepts.widths)}, "
            f"but this pipeline's are {embedding_widths(pipe)}: use them with the model they "
            "were learned on")
    if concepts.hidden_size != D:
        where = f"were learned on {concepts.base_model!r}" if concepts.base_model else \
            "come from another model"
        raise ValueError(
            f"these concepts {where} (text hidden size {concepts.hidden_size}), but this "
            f"pipeline's text encoder has hidden size {D}: use them with the model they were "
            "learned on")
    if concepts.base_fingerprint:   # the model's identity is its weights, not its name
        here = model_fingerprint(pipe)
        if here != concepts.base_fingerprint:
            raise ValueError(
                f"these concepts were learned on {concepts.base_model!r} (weights "
                f"{concepts.base_fingerprint}), but this pipeline's weights are {here}: "
                "tokens learned on one model mean nothing to another. If it is the same "
                "model, load them with load_concepts(path, allow_other_model=True) (CLI: "
                "--allow-other-model)")
        return
    base, here = concepts.base_model, model_name(pipe)
    if base and not same_model(base, here):
        raise ValueError(f"these concepts were learned on {base!r}, but this pipeline is "
                         f"{here!r}: tokens learned on one model mean nothing to another")


@contextlib.contextmanager
def _tokens_added(pipe, names: list[str], rows: torch.Tensor):
    """Each tokenizer swapped for a copy with ``names`` added, each text encoder's embedding
    module for a copy with its part of ``rows`` at their ids; the originals put back
    afterwards. Yields the ids in the first tokenizer."""
    with contextlib.ExitStack() as stack:
        first_ids, start = None, 0
        for tok_attr, te_attr in encoder_attrs(pipe):
            te = getattr(pipe, te_attr)
            D = te.get_input_embeddings().weight.shape[1]
            ids = stack.enter_context(_tokens_added_to(pipe, tok_attr, te, names,
                                                       rows[:, start:start + D]))
            first_ids, start = first_ids or ids, start + D
        yield first_ids


@contextlib.contextmanager
def _tokens_added_to(pipe, tok_attr: str, te, names: list[str], rows: torch.Tensor):
    tok = getattr(pipe, tok_attr)
    new_tok = copy.deepcopy(tok)
    if new_tok.add_tokens(list(names)) != len(names):
        raise ValueError(f"the tokenizer did not add all of {names}")
    ids = [new_tok.convert_tokens_to_ids(n) for n in names]
    old = te.get_input_embeddings()
    V, D = old.weight.shape
    new = torch.nn.Embedding(max(V, max(ids) + 1), D, padding_idx=old.padding_idx,
                             device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight[:V] = old.weight
        new.weight[ids] = rows.to(new.weight)
    new.weight.requires_grad_(False)
    setattr(pipe, tok_attr, new_tok)
    te.set_input_embeddings(new)
    try:
        yield ids
    finally:
        te.set_input_embeddings(old)
        setattr(pipe, tok_attr, tok)


@contextlib.contextmanager
def apply_concepts(pipe, concepts: ConceptTokens):
    """See :meth:`ConceptTokens.applied`."""
    active = _ACTIVE.get(pipe.tokenizer, {})
    if all(active.get(n) is concepts for n in concepts.names):
        yield token_ids_in(pipe, concepts.names)  # nested inside its own block
        return
    taken = [n for n in concepts.names if n in active]
    if taken:
        raise ValueError(f"other concepts named {taken} are applied to this pipeline already: "
                         "rename one set (e.g. load_concepts(..., prefix='w'))")
    check_concept_names(pipe.tokenizer, concepts.names)
    _check_fits(pipe, concepts)
    with contextlib.ExitStack() as stack:
        ids = stack.enter_context(_tokens_added(pipe, concepts.names, concepts.embeddings))
        _ACTIVE[pipe.tokenizer] = {**active, **dict.fromkeys(concepts.names, concepts)}
        if concepts.unet is not None:
            stack.enter_context(unet_change_applied(pipe.unet, concepts.unet))
        yield ids


def new_concepts(pipe, concepts=1, init_words=None, *, init: str = "mean", prefix: str = "v",
                 seed: int = 0) -> ConceptTokens:
    """New concept tokens with their starting rows, read from ``pipe`` (which is not changed).

    Args:
        pipe: the pipeline whose embedding table gives the starting rows.
        concepts: the number of concepts K (names ``[v1]`` .. ``[vK]``, or with ``prefix``),
            or a list of token names.
        init_words: None, one word for every concept, or a list of K words / None. A word's
            row is the mean of its sub-tokens' rows (``init="mean"``) or its first
            sub-token's (``init="first"``). None gives a random row: a Gaussian direction
            (seeded with ``seed + k``) scaled to the vocabulary's mean norm.
        init: "mean" or "first".
        prefix: the letter of the default names.
        seed: seeds the random rows.

    Returns:
        ConceptTokens: the names, init words and starting rows.

    Raises:
        ValueError: a name is already a token, an init word tokenises to nothing or to the
            unknown token, or the counts disagree. A word that splits into several
            sub-tokens gives a warning.
    """
    tok = pipe.tokenizer
    if isinstance(concepts, int):
        if concepts < 1:
            raise ValueError(f"need at least one concept, got {concepts}")
        names = [f"[{prefix}{i}]" for i in range(1, concepts + 1)]
    else:
        names = [str(n) for n in concepts]
    names = check_concept_names(tok, names)
    if init_words is None or isinstance(init_words, str):
        init_words = [init_words] * len(names)
    init_words = list(init_words)
    if len(init_words) != len(names):
        raise ValueError(f"got {len(init_words)} init words for {len(names)} concepts {names}")
    if init not in ("mean", "first"):
        raise ValueError(f"init must be 'mean' or 'first', got {init!r}")
    parts = []  # the rows in each text encoder's table (SDXL: two), joined below
    for j, ((tok_attr, _), table) in enumerate(zip(encoder_attrs(pipe), embedding_tables(pipe))):
        table = table.detach().float().cpu()
        ref_norm = float(table.norm(dim=1).mean())
        rows = []
        for k, w in enumerate(init_words):
            if w is None:
                g = torch.Generator().manual_seed(seed + k + 7919 * j)
                v = torch.randn(table.shape[1], generator=g)
                rows.append(v / v.norm() * ref_norm)
            else:
                ids = _init_word_ids(getattr(pipe, tok_attr), w, init)
                rows.append(table[ids].mean(0) if init == "mean" else table[ids[0]])
        parts.append(torch.stack(rows))
    widths = embedding_widths(pipe)
    return ConceptTokens(names=names, init_words=init_words, embeddings=torch.cat(parts, 1),
                         widths=widths if len(widths) > 1 else None,
                         base_model=model_name(pipe), base_fingerprint=model_fingerprint(pipe))


def _init_word_ids(tok, word, init: str) -> list[int]:
    ids = tok(str(word), add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"init word {word!r} tokenises to nothing: pass a real word or None")
    if tok.unk_token_id is not None and tok.unk_token_id in ids:
        raise ValueError(
            f"init word {word!r} has characters this model's tokenizer cannot represent (they "
            f"become the unknown token {tok.unk_token!r}): pass a word of its vocabulary "
            "(the bundled model knows the shapes world's words: star, heart, ...) or None")
    if len(ids) > 1:
        warnings.warn(f"init word {word!r} is not one token of this vocabulary: it splits into "
                      f"{tok.convert_ids_to_tokens(ids)}, and the row starts from "
                      f"{'their mean' if init == 'mean' else 'the first'} (init={init!r})",
                      stacklevel=3)
    return ids


__all__ = [
    "ConceptTokens",
    "added_token_ids",
    "apply_concepts",
    "check_concept_names",
    "embedding_tables",
    "embedding_weight",
    "embedding_widths",
    "encoder_attrs",
    "model_fingerprint",
    "model_name",
    "new_concepts",
    "same_model",
    "single_token_id",
    "token_ids_in",
    "token_ids_per_encoder",
    "vocabulary_mean_norm",
]
