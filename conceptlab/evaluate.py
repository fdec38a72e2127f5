"""Evaluating multi-concept generations: the paper's three measures, offline or with CLIP.

The paper (and Break-a-Scene) judge generations by three numbers:

- **identity** (concept fidelity): how much each generated concept looks like its masked
  source; paper: CLIP-I, Break-a-Scene: DINO on images with the non-concept pixels
  blacked out;
- **prompt fidelity**: does the image match the prompt with every learned token replaced
  by its class words ("a photo of [v1] on a red background" -> "a photo of a blue striped
  star on a red background"); paper: CLIP-T;
- **diversity**: mean pairwise distance between samples of one prompt; paper: LPIPS.

Two judges give them behind the same calls:

- :class:`ShapesJudge` (offline, the default): the shapes world's judge
  (:mod:`conceptlab.shapes.judge`) and pattern reader (:mod:`conceptlab.shapes.identity`).
  It can also say whether a concept is *present* (its colour and shape, by the judge's
  pair head), whether it shows all its attributes (colour AND shape AND pattern), and
  where it is (for "[v2] above [v1]").
- :class:`ClipJudge` (a local CLIP folder, e.g. ``openai/clip-vit-base-patch32`` saved with
  ``save_pretrained``): ``transformers.CLIPModel`` image and text embeddings. It has no
  attributes: ``present`` and friends return None and the table leaves them blank.

LPIPS is not offered: its backbones come from torchvision's hub downloads, which this
project neither depends on nor can fetch; the shapes judge's diversity is an LPIPS-style
distance on its own feature maps (unit-normalised channels, squared difference, averaged
over positions and two depths, no learned weights).

    specs = concept_specs_of_example(load_example("striped-star-and-heart"), result.names)
    ev = evaluate(pipe, result, specs, n=8)          # ShapesJudge unless judge=...
    ev["summary"]  # {'concept_fidelity': .., 'identity': .., 'prompt_fidelity': .., ...}

Every sample uses ``torch.Generator("cpu").manual_seed(seed + i)`` (see
:func:`conceptlab.generation.generate`), so an evaluation repeats exactly.

Why one module of about 580 lines: everything here serves one call, ``evaluate``: the
concept specs it reads, the prompts it generates, the two judges behind its measures (they
must keep one interface, so they live side by side) and the tables of its results.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .generation import concept_tokens_in, ensure_concepts, generate
from .masks import iou
from .shapes import world
from .shapes.judge import as_uint8_batch

RELATIONS = ("above", "below", "left of", "right of", "next to")


@dataclass
class ConceptSpec:
    """What a judge needs to know about one learned concept.

    name      its token, e.g. "[v1]"
    words     its class words WITH the article, e.g. "a blue striped star" or
              "a dotted background": what the token stands for in a prompt
    image     (H, W, 3) uint8, the source image it was learned from
    mask      (H, W) bool, its true region in that image (for identity: the source,
              masked; never used for learning)
    attributes  for the shapes judge: {"colour", "shape", "pattern"} of an object, or
              {"background": name} of a background; empty for other worlds
    """
    name: str
    words: str
    image: np.ndarray
    mask: np.ndarray
    attributes: dict = field(default_factory=dict)

    @property
    def is_background(self) -> bool:
        return "background" in self.attributes or self.words.endswith(" background")


def _article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def concept_specs(image, masks, objects, background: str, names) -> list[ConceptSpec]:
    """Specs for a shapes-world image: ``objects`` (world.ShapeObject, one per object
    mask) then, if ``names`` is one longer, the background as the last concept."""
    masks = np.asarray(masks, bool)
    objects = list(objects)
    names = list(names)
    if len(names) not in (len(objects), len(objects) + 1):
        raise ValueError(f"{len(names)} concept names for {len(objects)} objects: give one "
                         "name per object, and one more for the background if it was learned")
    if len(masks) != len(names):
        raise ValueError(f"{len(masks)} masks for {len(names)} concepts")
    out = [ConceptSpec(n, o.phrase(with_pattern=True), np.asarray(image), masks[k],
                       {"colour": o.colour, "shape": o.shape, "pattern": o.pattern})
           for k, (n, o) in enumerate(zip(names, objects))]
    if len(names) > len(objects):
        out.append(ConceptSpec(names[-1], _article(f"{background} background"),
                               np.asarray(image), masks[-1], {"background": background}))
    return out


def concept_specs_of_example(example, names) -> list[ConceptSpec]:
    """Specs for a bundled example (:func:`conceptlab.shapes.examples.load_example`)."""
    from .shapes.examples import example_spec

    sc = example_spec(example.name)
    return concept_specs(example.image, example.masks, sc.objects, sc.background, names)


def attributes_of(words: str) -> dict:
    """What the shapes judge can read from class words: "a blue striped star" ->
    {"colour": "blue", "pattern": "striped", "shape": "star"}; "a dotted background" ->
    {"background": "dotted"}; {} when the words name no colour-and-shape or background."""
    m = re.search(r"\b(\w+) background\b", words)
    if m and m.group(1) in world.BACKGROUNDS:
        return {"background": m.group(1)}
    objs = objects_named(words)
    if len(objs) != 1:
        return {}
    pats = [p for p in world.PATTERNS if p != "solid" and re.search(rf"\b{p}\b", words)]
    return {"colour": objs[0][0], "shape": objs[0][1], "pattern": pats[0] if pats else "solid"}


def specs_from_result(result, words=None, image: int = 0) -> list[ConceptSpec]:
    """Specs for the concepts of ``result`` (a LearnedConcepts) shown in image ``image``,
    with its LEARNED masks as the sources' masks (no ground truth needed). ``words``: the
    class words per concept of that image ("a blue striped star", "a dotted background");
    default: the init words ("star" -> "a star"; the shapes judge then reads no colour)."""
    ids = result.concept_ids[image]
    names = [result.names[k] for k in ids]
    words = list(words) if words is not None else [
        _article(result.tokens.init_words[k] or "concept") for k in ids]
    if len(words) != len(names):
        raise ValueError(f"{len(words)} class words for the {len(names)} concepts {names} of "
                         f"image {image}: give one per concept, e.g. 'a blue striped star'")
    return [ConceptSpec(n, w, result.images[image], result.masks[image][j], attributes_of(w))
            for j, (n, w) in enumerate(zip(names, words))]


def class_prompt(prompt: str, specs) -> str:
    """The prompt with each learned token replaced by its class words:
    "a photo of [v1] on [v3]" -> "a photo of a blue striped star on a dotted background".
    A token not in ``specs`` is an error."""
    by_name = {s.name: s for s in specs}
    out = prompt
    for tok in concept_tokens_in(prompt):
        if tok not in by_name:
            raise ValueError(f"{tok} is not among the concepts {list(by_name)}")
        out = out.replace(tok, by_name[tok].words)
    return re.sub(r"\s+", " ", out).strip()


def objects_named(prompt: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a shapes-world prompt names: "a red star and a blue
    striped heart" -> [("red", "star"), ("blue", "heart")]."""
    colours = "|".join(world.COLOURS)
    shapes = "|".join(world.SHAPES)
    pats = "|".join(p for p in world.PATTERNS if p != "solid")
    return [(m.group(1), m.group(3)) for m in
            re.finditer(rf"\b({colours})\s+(?:({pats})\s+)?({shapes})\b", prompt)]


# ----------------------------------------------------------------------------- judges
class ShapesJudge:
    """The offline judge of the shapes world (see the module doc)."""

    name = "shapes"

    def __init__(self, classifier=None, pattern_net=None):
        from .shapes.identity import load_pattern_net
        from .shapes.judge import load_classifier

        self.clf = classifier or load_classifier()
        self.pnet = pattern_net or load_pattern_net()

    # the paper's three measures --------------------------------------------------------
    def identity(self, spec: ConceptSpec, images) -> np.ndarray:
        """(N,) identity similarity of the main object of each image with the masked
        source (:func:`conceptlab.shapes.identity.identity_similarity`); for a background
        concept, 1.0 where the image shows that background, else 0.0."""
        from .shapes.identity import identity_similarity
        from .shapes.judge import judge_background

        images = as_uint8_batch(images)
        if spec.is_background:
            if not spec.attributes:
                return np.full(len(images), np.nan)
            return judge_background(images, spec.attributes["background"]).astype(float)
        return identity_similarity(spec.image, spec.mask, images, net=self.pnet,
                                   judge_model=self.clf)

    def prompt_fidelity(self, images, prompt: str) -> np.ndarray:
        """(N,) fraction of what the class-word prompt names that each image shows: each
        named (colour, shape) by the judge's pair head, and the named background."""
        from .shapes.judge import judge, judge_background, named_background

        images = as_uint8_batch(images)
        objs = objects_named(prompt)
        bg = named_background(prompt)
        parts = []
        if objs:
            rec = judge(images, [objs] * len(images), self.clf)
            parts.append(np.array([r["both_ok"] for r in rec], float).reshape(len(images), -1))
        if bg is not None:
            parts.append(judge_background(images, bg).astype(float)[:, None])
        if not parts:     # nothing this judge can check ("a photo of a star")
            return np.full(len(images), np.nan)
        return np.concatenate(parts, 1).mean(1)

    @torch.no_grad()
    def diversity(self, images) -> float:
        """Mean pairwise LPIPS-style distance on the judge's feature maps (16x16 and
        8x8: each position's channels unit-normalised, squared difference summed over
        channels, averaged over positions and the two depths); 0 = identical images."""
        from .shapes.judge import to_tensor

        images = as_uint8_batch(images)
        if len(images) < 2:
            raise ValueError("diversity needs at least 2 images of one prompt")
        x = (to_tensor(images) - 0.5) / 0.25
        feats, h = [], x
        for i, layer in enumerate(self.clf.features):
            h = layer(h)
            if i in (4, 6):              # after the 16x16 block, after the 8x8 block
                feats.append(F.normalize(h, dim=1))
        d = []
        for a, b in itertools.combinations(range(len(images)), 2):
            d.append(np.mean([float(((f[a] - f[b]) ** 2).sum(0).mean()) for f in feats]))
        return float(np.mean(d))

    # what only an attribute judge can say ------------------------------------------------
    def _judged(self, spec: ConceptSpec, images):
        """(images, background verdicts or None, the judge's records or None); both None
        when the spec has no attributes this judge can check."""
        from .shapes.judge import judge, judge_background

        images = as_uint8_batch(images)
        a = spec.attributes
        if spec.is_background:
            return images, (judge_background(images, a["background"]) if a else None), None
        if "colour" not in a:
            return images, None, None
        return images, None, judge(images, [[(a["colour"], a["shape"])]] * len(images),
                                   self.clf)

    def concept_fidelity(self, spec: ConceptSpec, images) -> np.ndarray:
        """(N,) bool: the image shows the concept's colour AND shape AND pattern (objects),
        or its background (backgrounds)."""
        from .shapes.identity import read_pattern

        images, bg, rec = self._judged(spec, images)
        if rec is None:
            return bg
        pat = read_pattern(images, self.pnet)
        return np.array([r["colour_ok"] and r["shape_ok"] and p == spec.attributes["pattern"]
                         for r, p in zip(rec, pat)])

    def present(self, spec: ConceptSpec, images) -> np.ndarray:
        """(N,) bool: the concept is in the image (objects: the pair head sees its
        colour-and-shape; backgrounds: the background is shown)."""
        _, bg, rec = self._judged(spec, images)
        return bg if rec is None else np.array([r["both_ok"] for r in rec])

    def position(self, spec: ConceptSpec, images, min_pixels: int = 12) -> list:
        """Per image, the (y, x) centroid (fractions of the image) of the pixels nearest to
        the object's colour among the world's colours and within 60 RGB of it, or None
        where fewer than ``min_pixels`` such pixels are found."""
        images = as_uint8_batch(images)
        if "colour" not in spec.attributes:
            return None
        palette = np.array(list(world.COLOURS.values()), np.float32)
        k = list(world.COLOURS).index(spec.attributes["colour"])
        out = []
        for im in images:
            px = im.astype(np.float32)
            d = np.linalg.norm(px[..., None, :] - palette, axis=-1)
            sel = (d.argmin(-1) == k) & (d[..., k] < 60)
            if sel.sum() < min_pixels:
                out.append(None)
                continue
            ys, xs = np.nonzero(sel)
            out.append((float(ys.mean() / im.shape[0]), float(xs.mean() / im.shape[1])))
        return out


class ClipJudge:
    """CLIP-I, CLIP-T and an embedding-distance diversity from a LOCAL CLIP folder
    (``transformers.CLIPModel`` + ``CLIPProcessor``; nothing is downloaded)."""

    name = "clip"

    def __init__(self, folder, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise ValueError(f"{folder} is not a CLIP folder (no config.json): save one with "
                             "CLIPModel.from_pretrained(...).save_pretrained(folder) and "
                             "CLIPProcessor(...).save_pretrained(folder) on a machine that "
                             "has the weights")
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        self.device = device

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        x = self.processor(images=list(as_uint8_batch(images)), return_tensors="pt")
        e = self.model.get_image_features(pixel_values=x["pixel_values"].to(self.device))
        return F.normalize(_tensor(e).float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeddings(self, texts) -> torch.Tensor:
        x = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        e = self.model.get_text_features(**{k: v.to(self.device) for k, v in x.items()})
        return F.normalize(_tensor(e).float(), dim=-1).cpu()

    def identity(self, spec: ConceptSpec, images) -> np.ndarray:
        """CLIP-I: cosine of each image with the source, non-concept pixels black."""
        src = (spec.image * np.asarray(spec.mask, bool)[..., None]).astype(np.uint8)
        ref = self.image_embeddings([src])[0]
        return (self.image_embeddings(images) @ ref).numpy()

    def prompt_fidelity(self, images, prompt: str) -> np.ndarray:
        """CLIP-T: cosine of each image with the class-word prompt."""
        t = self.text_embeddings([prompt])[0]
        return (self.image_embeddings(images) @ t).numpy()

    def diversity(self, images) -> float:
        """Mean pairwise 1 - cosine of the image embeddings."""
        e = self.image_embeddings(images)
        if len(e) < 2:
            raise ValueError("diversity needs at least 2 images of one prompt")
        s = e @ e.T
        iu = torch.triu_indices(len(e), len(e), 1)
        return float((1 - s[iu[0], iu[1]]).mean())

    def concept_fidelity(self, spec, images):
        return None

    def present(self, spec, images):
        return None

    def position(self, spec, images):
        return None


def _tensor(out):
    """get_*_features returns a tensor (transformers < 5) or a model output (>= 5)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("image_embeds", "text_embeds", "pooler_output"):
        v = getattr(out, key, None)
        if v is not None:
            return v
    raise TypeError(f"unexpected CLIP output {type(out).__name__}")


# ----------------------------------------------------------------------------- relations
def relation_holds(relation: str, a, b) -> bool | None:
    """Does "a {relation} b" hold for centroids (y, x) (fractions, y down)? None if
    either object was not found. "next to": side by side more than above each other."""
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    if a is None or b is None:
        return None
    dy, dx = float(a[0] - b[0]), float(a[1] - b[1])
    return {"above": dy < 0, "below": dy > 0, "left of": dx < 0, "right of": dx > 0,
            "next to": abs(dx) > abs(dy)}[relation]


def interaction_prompt(a: ConceptSpec, b: ConceptSpec, relation: str,
                       background: ConceptSpec | str | None = None) -> str:
    """"a photo of [v2] above [v1]" (optionally "... on [v3]" or "... on a red background")."""
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    p = f"a photo of {a.name} {relation} {b.name}"
    if isinstance(background, ConceptSpec):
        p += f" on {background.name}"
    elif background:
        p += f" on {_article(background + ' background')}"
    return p


# ----------------------------------------------------------------------------- evaluation
def default_prompts(specs, new_background: str | None = None, relation: str = "above") -> dict:
    """The evaluation prompts for one image's concepts (objects k, l in consecutive pairs):

    - ``single``: "a photo of [vk]" per object: fidelity, identity, diversity;
    - ``pair``: "a photo of [vk] and [vl]": both present, prompt fidelity;
    - ``recombined``: "a photo of [vk] and [vl] on a {new_background} background" (a plain
      background other than the source's, when it has none) or "... on [vbg]" for a
      learned background: both present, prompt fidelity;
    - ``interaction``: "a photo of [vl] {relation} [vk]": both present, the relation.

    With one object, ``recombined`` puts it on the new and the learned background and
    there is no pair. "both present" means: every concept the prompt names is present.
    """
    objs = [s for s in specs if not s.is_background]
    bgs = [s for s in specs if s.is_background]
    pairs = list(itertools.pairwise(objs))
    if new_background is None:
        used = {s.attributes.get("background") for s in bgs}
        new_background = next(b for b in world.PLAIN_BACKGROUNDS if b not in used)
    out = {"single": [(f"a photo of {s.name}", [s]) for s in objs], "pair": [],
           "recombined": [], "interaction": []}
    if len(objs) == 1:                # one object: recombine it with new backgrounds only
        a = objs[0]
        out["recombined"].append(
            (f"a photo of {a.name} on {_article(new_background + ' background')}", [a]))
        if bgs:
            out["recombined"].append((f"a photo of {a.name} on {bgs[0].name}", [a, bgs[0]]))
    for a, b in pairs:
        out["pair"].append((f"a photo of {a.name} and {b.name}", [a, b]))
        out["recombined"].append(
            (f"a photo of {a.name} and {b.name} on {_article(new_background + ' background')}",
             [a, b]))
        if bgs:
            out["recombined"].append((f"a photo of {a.name} and {b.name} on {bgs[0].name}",
                                      [a, b, bgs[0]]))
        out["interaction"].append((interaction_prompt(b, a, relation), [b, a], relation))
    return out


def _mean(values) -> float | None:
    v = [x for x in values if x is not None and not (isinstance(x, float) and np.isnan(x))]
    return float(np.mean(v)) if v else None


def evaluate(pipe, concepts, specs, *, judge=None, n: int = 8, seed: int = 0,
             prompts: dict | None = None, gt_masks=None, return_images: bool = False,
             **generate_kwargs) -> dict:
    """Generate and judge: the paper's measures for one set of learned concepts.

    concepts  what :func:`conceptlab.generation.generate` takes (the LearnedConcepts of
              ``learn_concepts``, ConceptTokens or a saved folder)
    specs     one :class:`ConceptSpec` per concept to judge (their ``name`` must be tokens
              of ``concepts``)
    judge     :class:`ShapesJudge` (default) or :class:`ClipJudge`
    prompts   :func:`default_prompts` of ``specs`` unless given (same layout)
    gt_masks  per image, true (K, H, W) masks: ``mask_iou`` of ``concepts.masks``
    Returns {"summary": {...}, "prompts": [per-prompt records], "images": {prompt: uint8}
    (with ``return_images``)}. Summary keys: concept_fidelity, identity, diversity (over
    the single prompts), prompt_fidelity (pair and recombined), both_present (pair,
    recombined, interaction), relation (interaction, where both objects were found),
    mask_iou; None where the judge cannot say.
    """
    judge = judge or ShapesJudge()
    specs = list(specs)
    if not specs:
        raise ValueError("specs is empty: give one ConceptSpec per concept to evaluate")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2 (diversity compares samples), got {n!r}")
    ensure_concepts(pipe, concepts)
    prompts = prompts or default_prompts(specs)
    records, images = [], {}

    def sample(prompt):
        imgs = generate(pipe, concepts, prompt, n=n, seed=seed, output_type="np",
                        **generate_kwargs)
        if return_images:
            images[prompt] = imgs
        return imgs

    for prompt, (spec,) in prompts.get("single", []):
        imgs = sample(prompt)
        cf = judge.concept_fidelity(spec, imgs)
        records.append({"kind": "single", "prompt": prompt, "concept": spec.name,
                        "identity": _mean(judge.identity(spec, imgs).tolist()),
                        "concept_fidelity": None if cf is None else float(np.mean(cf)),
                        "diversity": judge.diversity(imgs)})
    for kind in ("pair", "recombined", "interaction"):
        for item in prompts.get(kind, []):
            prompt, group = item[0], item[1]
            imgs = sample(prompt)
            rec = {"kind": kind, "prompt": prompt, "class_prompt": class_prompt(prompt, specs)}
            if kind != "interaction":
                rec["prompt_fidelity"] = _mean(judge.prompt_fidelity(
                    imgs, rec["class_prompt"]).tolist())
            pres = [judge.present(s, imgs) for s in group]
            rec["both_present"] = None if any(p is None for p in pres) else \
                float(np.mean(np.all(np.stack(pres), 0)))
            if kind == "interaction":
                a, b = group
                pa, pb = judge.position(a, imgs), judge.position(b, imgs)
                held = None if pa is None or pb is None else \
                    [relation_holds(item[2], x, y) for x, y in zip(pa, pb)]
                rec["relation"] = None if held is None else _mean(
                    [float(h) for h in held if h is not None])
                rec["relation_measured"] = None if held is None else \
                    sum(h is not None for h in held)
            records.append(rec)
    summary = {
        "concept_fidelity": _mean(r.get("concept_fidelity") for r in records
                                  if r["kind"] == "single"),
        "identity": _mean(r["identity"] for r in records if r["kind"] == "single"),
        "diversity": _mean(r["diversity"] for r in records if r["kind"] == "single"),
        "prompt_fidelity": _mean(r.get("prompt_fidelity") for r in records
                                 if r["kind"] in ("pair", "recombined")),
        "both_present": _mean(r.get("both_present") for r in records if r["kind"] != "single"),
        "relation": _mean(r.get("relation") for r in records if r["kind"] == "interaction"),
        "mask_iou": None,
    }
    if gt_masks is not None:
        learned = getattr(concepts, "masks", None)
        if learned is None:
            raise ValueError("gt_masks given but the concepts hold no masks (pass the "
                             "LearnedConcepts of learn_concepts)")
        ious = [float(iou(m, g)) for ms, gs in zip(learned, gt_masks) for m, g in zip(ms, gs)]
        summary["mask_iou"] = float(np.mean(ious))
    out = {"judge": judge.name, "n": n, "seed": seed, "summary": summary, "prompts": records}
    if return_images:
        out["images"] = images
    return out


MEASURES = ("concept_fidelity", "identity", "prompt_fidelity", "diversity", "both_present",
            "relation", "mask_iou")


def interval95(values) -> dict:
    """Mean and 95% t-interval half-width of per-unit values (None and NaN dropped)."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and not np.isnan(x)], float)
    if len(v) == 0:
        return {"mean": None, "ci95": None, "n": 0}
    if len(v) == 1:
        return {"mean": float(v[0]), "ci95": None, "n": 1}
    q = float(stats.t.ppf(0.975, len(v) - 1))
    return {"mean": float(v.mean()), "ci95": float(q * v.std(ddof=1) / np.sqrt(len(v))),
            "n": len(v)}


def format_table(rows: dict, measures=MEASURES) -> str:
    """rows: {method: {measure: {"mean", "ci95"}}} -> a fixed-width text table."""
    head = f"{'method':<22}" + "".join(f"{m.replace('_', ' '):>18}" for m in measures)
    lines = [head]
    for method, r in rows.items():
        cells = []
        for m in measures:
            s = r.get(m) or {}
            if s.get("mean") is None:
                cells.append(f"{'-':>18}")
            elif s.get("ci95") is None:
                cells.append(f"{s['mean']:>18.3f}")
            else:
                cells.append(f"{s['mean']:>11.3f} +-{s['ci95']:.2f}")
        lines.append(f"{method:<22}" + "".join(cells))
    return "\n".join(lines)


__all__ = [
    "MEASURES",
    "RELATIONS",
    "ClipJudge",
    "ConceptSpec",
    "ShapesJudge",
    "attributes_of",
    "class_prompt",
    "concept_specs",
    "concept_specs_of_example",
    "default_prompts",
    "evaluate",
    "format_table",
    "interaction_prompt",
    "interval95",
    "objects_named",
    "relation_holds",
    "specs_from_result",
]
