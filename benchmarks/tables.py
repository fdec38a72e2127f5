"""Generate the result tables from the committed result files (never re-running anything).

    python -m benchmarks tables           # make results: rewrite the generated files
    python -m benchmarks tables --check   # exit 1 if any generated file is stale

Writes

- ``docs/results.md``: one section per benchmark, one table per result file, each saying
  whether it was measured on the shipped model (its recorded weights fingerprint against
  the bundled model's) and where it came from (commit, command, date); an appendix lists
  the pilot runs (``benchmarks/results/pilots/``) with their command and headline number;
- ``docs/results/headline.md``: at most five headline numbers, a snippet for the README;
- ``docs/results/shipped_model.json``: the bundled model's weights fingerprint, with the
  sha256 of its weight files (the fingerprint is recomputed only when they change);
- the generated blocks (between ``<!-- results:KEY -->`` and ``<!-- /results:KEY -->``) of
  the README (only the short ``headline`` and ``discovery``: it is the entry point),
  ``docs/gpu.md`` (``gpu-memory``) and the hand-written notes
  ``benchmarks/results/PRESETS.md`` and ``model_recipes.md``.

Results measured on other models than the shipped one are described by what those models
are (``neutral``), not by their place in the project's history (that is CHANGELOG.md).

Everything is deterministic: files sorted by path, fixed float formats, no generation date.
This module imports neither torch nor conceptlab unless the weights changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SHIPPED_MODEL = ROOT / "data" / "models" / "shapes-ldm"
WEIGHT_FILES = ("text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.safetensors")
# generated files, relative to the repository root
RESULTS_MD = "docs/results.md"
HEADLINE_MD = "docs/results/headline.md"
SHIPPED_JSON = "docs/results/shipped_model.json"
NOTES = ("benchmarks/results/PRESETS.md", "benchmarks/results/model_recipes.md", "README.md",
         "docs/gpu.md")
ORDER = ("model_quality", "generation_sweep", "attention_speed", "mask_quality",
         "concept_fidelity", "concept_step_time", "em_suite", "background_channel",
         "editability", "multi_concept", "discovery", "discovery_learning", "gpu_memory",
         "notebook_runtimes")


# ----------------------------------------------------------------------------- the model
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weight_hashes(model_dir: Path = SHIPPED_MODEL) -> dict:
    return {f: _sha256(model_dir / f) for f in WEIGHT_FILES}


def shipped_model(stored: dict | None = None, model_dir: Path = SHIPPED_MODEL) -> dict:
    """{"model", "weights_fingerprint", "weight_files"}: the stored record if the weight
    files are unchanged, else the fingerprint computed afresh (loads the model)."""
    hashes = weight_hashes(model_dir)
    if stored and stored.get("weight_files") == hashes:
        return stored
    from conceptlab import load_pipeline
    from conceptlab.models import weights_fingerprint

    pipe = load_pipeline(str(model_dir), device="cpu", progress=False)
    return {"model": str(model_dir.relative_to(ROOT)),
            "weights_fingerprint": weights_fingerprint(pipe), "weight_files": hashes}


# ----------------------------------------------------------------------------- formatting
def f3(x, signed=False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def pct(x) -> str:
    return "" if x is None else f"{round(100 * x):d}%"


def table(head: list[str], rows: list[list]) -> list[str]:
    def cell(c) -> str:
        return str(c).replace("|", "\\|")   # a "|" inside a cell would end it
    out = ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return out


def ms(s: dict | None, key="sem") -> str:
    """'0.456 +- 0.064' from {"mean", "sem"/"ci95"}."""
    if not s or s.get("mean") is None:
        return ""
    err = s.get(key)
    return f3(s["mean"]) + (f" +- {err:.3f}" if err is not None else "")


def rel(path: Path) -> str:
    return path.relative_to(RESULTS).as_posix()


# ----------------------------------------------------------------------------- results
class Result:
    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text())
        self.prov = self.data.get("provenance") or {}
        self.name = rel(path)
        self.benchmark = self.prov.get("benchmark") or path.parent.name
        self.pilot = self.name.startswith("pilots/")

    def options(self) -> dict:
        """The recorded command's --options (value or True), for describing a setting."""
        cmd = self.prov.get("command") or ""
        try:
            words = shlex.split(cmd)
        except ValueError:
            words = cmd.split()
        opts, key = {}, None
        for w in words:
            if w.startswith("--"):
                key = w[2:]
                opts[key] = True
            elif key is not None:
                opts[key] = w if opts[key] is True else f"{opts[key]} {w}"
        return opts


def load_results() -> list[Result]:
    return [Result(p) for p in sorted(RESULTS.rglob("*.json"),
                                      key=lambda p: rel(p))
            if ".cache" not in p.relative_to(RESULTS).parts]


def model_line(r: Result, shipped: str) -> str:
    fp = r.prov.get("model_fingerprint")
    what = r.prov.get("model")
    if fp == shipped:
        return f"**Measured on the shipped model** (weights `{fp}`)."
    if fp:
        return (f"**Not the shipped model**: weights `{fp}`"
                + (f" ({what})." if what else "."))
    if "weights_fingerprint" in str(r.data.get("rows", "")):
        fps = sorted({x.get("weights_fingerprint") for x in r.data["rows"]} - {None})
        on = "; one row is the shipped model" if shipped in fps else ""
        return f"Several models, one weights fingerprint per row{on}."
    return ("**Model fingerprint not recorded**"
            + (f": {what}." if what else ": the shipped model cannot be confirmed."))


def provenance_line(r: Result) -> str:
    p = r.prov
    if p.get("reconstructed"):
        rec = p.get("recorded_in") or {}
        parts = ["Provenance reconstructed"]
        if rec:
            parts.append(f"recorded in commit `{rec['commit'][:7]}` ({rec['date'][:10]})")
        parts.append(f"command `{p['command']}`" if p.get("command") else "command not recorded")
        if p.get("command_now"):
            parts.append(f"today `{p['command_now']}`")
        return "; ".join(parts) + "."
    commit = (p.get("git_commit") or "unknown")[:7] + (" (dirty)" if p.get("git_dirty") else "")
    m = p.get("machine") or {}
    where = ", ".join(x for x in (
        f"{m['cpu_cores']} cores" if m.get("cpu_cores") else "",
        f"{m['torch_threads']} threads" if m.get("torch_threads") else "",
        m.get("device") or "") if x)
    wall = f", {p['wall_seconds']:.0f} s" if p.get("wall_seconds") is not None else ""
    done = "" if p.get("complete", True) else " **(partial)**"
    return (f"Commit `{commit}`; command `{p.get('command')}`; {(p.get('date') or '')[:10]}"
            f" ({where}{wall}){done}.")


# ----------------------------------------------------------------------------- per benchmark
def rises(r: Result, m: str):
    """Fraction of scenes whose curve ends above its start (computed where not recorded)."""
    s = r.data["summary"].get(m, {})
    if s.get("rises") is not None:
        return s["rises"]
    runs = r.data.get("per_scene", {}).get(m, {}).get("eval_iou") or []
    return round(sum(x[-1] > x[0] for x in runs) / len(runs), 4) if runs else None


def vs_fixed(r: Result) -> dict | None:
    """The summary's ``em_vs_fixed``, completed from the per-scene curves where an older
    result did not record a figure."""
    v = dict(r.data["summary"].get("em_vs_fixed") or {})
    per = r.data.get("per_scene", {})
    if "em" in per and "fixed" in per and ("wins_by_0.05" not in v or "em_wins" not in v):
        em = [x[-1] for x in per["em"]["eval_iou"]]
        fx = [x[-1] for x in per["fixed"]["eval_iou"]]
        d = [a - b for a, b in zip(em, fx)]
        v.setdefault("em_wins", sum(x > 0 for x in d))
        v.setdefault("n_scenes", len(d))
        v.setdefault("mean_difference", round(sum(d) / len(d), 4))
        v.setdefault("wins_by_0.05", sum(x > 0.05 for x in d))
        v.setdefault("losses_by_0.05", sum(x < -0.05 for x in d))
    return v or None


def em_suite_rows(r: Result) -> list[str]:
    s = r.data["summary"]
    methods = [m for m in ("em", "fixed", "given") if m in s]
    steps = s[methods[0]]["steps"]
    names = {"em": "EM (its masks, re-estimated)",
             "fixed": "fixed: trained on step-0 masks, re-estimated",
             "given": "given masks (oracle), re-estimated"}
    rows = [[names[m]] + [f3(v) for v in s[m]["mean"]]
            + [f3(s[m].get("final_used")), pct(rises(r, m)),
               f"{s[m]['seconds_per_run']:.0f}" if "seconds_per_run" in s[m] else ""]
            for m in methods]
    out = table(["method"] + [f"step {x}" for x in steps]
                + ["its own masks at the end", "rises on", "s per run"], rows)
    v = vs_fixed(r)
    if v:
        out += ["", f"EM vs the fixed run's re-estimates: above on {v['em_wins']} of "
                f"{v['n_scenes']} scenes, by > 0.05 on {v.get('wins_by_0.05', '?')}, below by "
                f"> 0.05 on {v.get('losses_by_0.05', '?')} (mean {f3(v['mean_difference'], True)})"
                + (f"; EM's final masks vs the fixed method's own (step-0) masks: "
                   f"{f3(v['mean_difference_vs_fixed_masks'], True)}"
                   if "mean_difference_vs_fixed_masks" in v else "") + "."]
    return out


def em_setting(r: Result) -> str:
    o = r.options()
    init = {"class": "class words", "shape": '"shape"', "random": "random rows"}[
        o.get("init", "class")]
    rule = o.get("competition", "max" if o.get("init", "class") != "class" else "")
    rule += " + fill_empty" if o.get("fill-empty") else ""
    loss = {"bce": "BCE", "raw": "raw MSE"}.get(o.get("attn-target"), "max-normalised")
    bits = [f"tokens from {init}", rule, f"{loss} loss",
            f"lambda_attn {o['lambda-attn']}" if "lambda-attn" in o else "",
            "no CRF" if o.get("no-crf") else "",
            f"T {o['temperature']}" if "temperature" in o else ""]
    return ", ".join(b for b in bits if b)


def em_overview(results: list[Result], shipped: str) -> list[str]:
    rows = []
    for r in results:
        s = r.data["summary"]
        fx, em, gv = s.get("fixed", {}), s.get("em", {}), s.get("given", {})
        rows.append([f"`{r.name}`", "yes" if r.prov.get("model_fingerprint") == shipped
                     else "no", r.data.get("n_scenes", ""), em_setting(r),
                     f3(em.get("mean", [None])[0]), f3(em.get("final")),
                     (f3(fx.get("final_used")) or "-") + " / " + f3(fx.get("final"))
                     if fx else "",
                     f3(gv.get("final")), pct(rises(r, "em"))])
    return table(["result", "shipped model", "scenes", "setting", "step 0", "EM final",
                  "fixed: own masks / re-estimated", "given", "EM rises on"], rows)


def concept_fidelity_rows(r: Result) -> list[str]:
    cols = ("concept_fidelity", "identity", "prompt_fidelity", "pattern_ok", "attention_iou")
    rows = [[k] + [ms(v.get(c)) for c in cols] + [next(iter(v.values()))["n"]]
            for k, v in r.data["summary"].items()]
    return table(["variant | phase", "concept fidelity", "identity", "prompt fidelity",
                  "pattern", "attention IoU", "concepts"], rows)


def fidelity_subset(rows, baseline, images, variant="masked + attn") -> dict:
    """Mean figures of ``rows`` restricted to ``images`` (the same concepts as a pilot)."""
    def mean(xs):
        return sum(xs) / len(xs) if xs else None
    out = {}
    for phase in (1, 2):
        sel = [x for x in rows if x["image"] in images and x["variant"] == variant
               and x["phase"] == phase]
        if sel:
            out[phase] = {k: mean([x[k] for x in sel]) for k in
                          ("concept_fidelity", "identity", "prompt_fidelity")}
            out[phase]["n"] = len(sel)
    sel = [x for x in baseline if x["image"] in images]
    if sel:
        out["class words"] = {k: mean([x[k] for x in sel]) for k in
                              ("concept_fidelity", "identity")}
        out["class words"]["n"] = len(sel)
    return out


def lr(x) -> str:
    """1e-4, 3e-4, 0.005 -> '1e-4', '3e-4', '5e-3'."""
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{x:.0e}").replace("e+", "e")


def phase2_label(r: Result) -> str:
    cfg = r.data.get("config", {})
    return f"{cfg.get('phase2')}, {cfg.get('phase2_steps')} steps, lr {lr(cfg.get('phase2_lr'))}"


def pilot_vs_preset(pilot: Result, preset: Result | None, others=()) -> list[str]:
    """A phase-2 pilot beside the preset's run (and other pilots) on the same concepts."""
    images = sorted({x["image"] for x in pilot.data["rows"]})
    rows = []

    def row(label, fig):
        rows.append([label, fig["n"], f3(fig["concept_fidelity"]), f3(fig["identity"]),
                     f3(fig.get("prompt_fidelity"))])

    base = {}
    if preset is not None:
        base = fidelity_subset(preset.data["rows"], preset.data.get("baseline", []), images)
        if 2 in base:
            row(f"{phase2_label(preset)} (the preset, `{preset.name}`)", base[2])
    for other in others:
        if other is None or not set(images) <= {x["image"] for x in other.data["rows"]}:
            continue
        fig = fidelity_subset(other.data["rows"], [], images)
        if 2 in fig:
            row(f"{phase2_label(other)} (`{other.name}`)", fig[2])
    mine = fidelity_subset(pilot.data["rows"], [], images)
    if 1 in mine:
        row("phase 1 alone (this pilot's run)", mine[1])
    if 2 in mine:
        row(f"**{phase2_label(pilot)}** (`{pilot.name}`)", mine[2])
    if "class words" in base:
        row("class words, no learning", base["class words"])
    return ([f"Images: {', '.join(images)}; masked + attn; means over concepts.", ""]
            + table(["phase 2", "concepts", "concept fidelity", "identity",
                     "prompt fidelity"], rows))


def step_time_rows(r: Result) -> list[str]:
    rows = [[x.get("model"), x.get("phase"), x.get("image", ""), x.get("batch", ""),
             x.get("threads", ""), f3(x.get("seconds_per_step")),
             f"{x['first_step_s']:.2f}" if "first_step_s" in x else "",
             f"{x['peak_rss_gb']:.2f}" if "peak_rss_gb" in x else x.get("error", "")]
            for x in r.data["rows"]]
    return table(["model", "phase", "image px", "batch", "threads", "s / step",
                  "first step s", "peak RSS GB"], rows)


def sweep_rows(r: Result) -> list[str]:
    rows = [[f"`{x['model']}`", f"{x['guidance']:g}", f3(x["colour"]), f3(x["shape"]),
             f3(x["both"]), f3(x.get("background")), f3(x.get("shape_1")),
             f3(x.get("shape_2")), x["n_images"]] for x in r.data["rows"]]
    return table(["model", "guidance", "colour", "shape", "both", "background",
                  "shape, 1 object", "shape, 2 objects", "images"], rows)


def quality_rows(q: dict) -> list[str]:
    p, loc = q["vae_psnr"], q["localisation"]
    b = loc["best"]
    rows = [["VAE PSNR (plain / textured)", f"{p['all']:.1f} dB ({p.get('plain', 0):.1f} / "
             f"{p.get('textured', 0):.1f})"],
            [f"shape-word attention IoU (layers {b['res']}, t {b['bin']})", f3(b["iou"])],
            ["by caption position", " / ".join(f3(v) for v in loc["best_by_position"].values())],
            ["baselines: centred disc / union", f3(loc["baselines"]["disc"]["all"]) + " / "
             + f3(loc["baselines"]["union"]["all"])]]
    jv = q.get("judge_validation") or {}
    for kind in ("clean", "vae"):
        if kind in jv:
            v = jv[kind]
            rows.append([f"judge on {kind} renders: shape / colour / pair / background",
                         " / ".join(f3(v[k]) for k in ("shape", "colour", "pair",
                                                        "background"))])
    g = q.get("generation")
    if g:
        rows.append([f"generation ({g.get('n_images')} images): colour / shape / both / "
                     "background", " / ".join(f3(g[k]) for k in ("colour", "shape", "both",
                                                                 "background"))])
        for k, v in g.get("by_count", {}).items():
            rows.append([f"generation, {k} object(s): colour / shape / both",
                         " / ".join(f3(v[x]) for x in ("colour", "shape", "both"))])
    return table(["figure", "value"], rows)


def multi_concept_rows(r: Result) -> list[str]:
    s = r.data["summary"]
    measures = [k for k in next(iter(s.values())) if k != "n_scenes"]
    rows = [[m] + [ms(v.get(k), "ci95") for k in measures] + [v.get("n_scenes", "")]
            for m, v in s.items()]
    return (["Mean over images and its 95% interval (each image: the mean over its "
             "concepts, prompts and samples)."
             f" {r.data.get('n_samples', '?')} samples per prompt.", ""]
            + table(["method"] + [k.replace("_", " ") for k in measures] + ["images"], rows))


def runtimes_rows(r: Result) -> list[str]:
    rows = [[f"`{k}`", f"{v:.0f}"] for k, v in sorted(r.data["seconds"].items())]
    return ([f"Machine: {r.data.get('machine', '')}.", ""]
            + table(["notebook", "seconds"], rows))


def background_rows(r: Result) -> list[str]:
    rows = [[k, f3(v["objects"]), f3(v["background"]), f3(v["all"])]
            for k, v in r.data["summary"].items()]
    return ([f"Step-0 mask IoU, {r.data['n_scenes']} suite scenes.", ""]
            + table(["background concept's masks", "objects", "background", "all"], rows))


def mask_quality_rows(r: Result) -> list[str]:
    d = r.data
    ns = list(d["by_n_objects"])
    rows = [[m, f3(v)] + [f3(d["by_n_objects"][n][m]) for n in ns]
            for m, v in d["table"].items()]
    return ([f"{d['n_scenes']} held-out scenes, {d['n_objects']} objects (CRF backend "
             f"{d['crf_backend']}).", ""]
            + table(["method", "mean IoU"] + [f"{n} objects" for n in ns], rows))


def discovery_rows(r: Result) -> list[str]:
    d = r.data
    ns = sorted({n for v in d["summary"].values() for n in v["iou_by_n_objects"]})
    rows = [[("**" + name + "** (default)") if name == d.get("default") else name,
             pct(v["k_accuracy"]), f3(v["iou"])]
            + [f3(v["iou_by_n_objects"].get(n)) for n in ns]
            + [pct(v["background_right"]), f"{v['seconds_per_image']:.2f}"]
            for name, v in d["summary"].items()]
    out = [f"Suite `{d['suite']}` (seeds {d['seeds']}), {d['n_timesteps']} timesteps; "
           "K right = objects + background; IoU: discovered masks matched one to one to the "
           "true masks, averaged over the true masks.", ""]
    out += table(["setting", "K right", "matched IoU"] + [f"IoU, {n} object(s)" for n in ns]
                 + ["background right", "s / image"], rows)
    best = d["summary"].get(d.get("default"), {})
    if best:
        found = sorted({f for row in best["confusion"].values() for f in row}, key=int)
        conf = [[t] + [row.get(f, 0) for f in found] for t, row in best["confusion"].items()]
        out += ["", f"K found by the default, **{d['default']}** (rows: true K):", ""]
        out += table(["true K"] + [f"found {f}" for f in found], conf)
    if d.get("threshold_sweep"):
        ts = list(next(iter(d["threshold_sweep"].values())))
        out += ["", "K right per threshold (relative merge distance), chosen: "
                + ", ".join(f"{k} {v}" for k, v in d["chosen_thresholds"].items()) + ":", ""]
        out += table(["features"] + ts, [[k] + [pct(v[t]) for t in ts]
                                          for k, v in d["threshold_sweep"].items()])
    if d.get("similar_concepts"):
        sc = d["similar_concepts"]
        out += ["", f"`similar_concepts`: the top match pairs the shared object in "
                f"{pct(sc['top_match_right'])} of {sc['pairs']} scene pairs."]
    return out


def scalar_rows(r: Result) -> list[str]:
    rows = [[k, f3(v) if isinstance(v, float) else v] for k, v in r.data.items()
            if k != "provenance" and isinstance(v, (int, float, str))]
    return table(["figure", "value"], rows)


def phase2_files_rows(r: Result) -> list[str]:
    rows = []
    for name, m in r.data.get("models", {}).items():
        for mode in ("lora", "full"):
            rows.append([name, f"{m['unet_parameters'] / 1e6:.1f} M", mode,
                         f"{m[mode]['bytes'] / 1e6:.2f} MB", m[mode]["tensors"]])
    return table(["model", "U-Net parameters", "phase 2 saved as", "folder size",
                  "U-Net tensors"], rows)


def discovery_learning_rows(r: Result) -> list[str]:
    d = r.data
    rows = [[name, pct(v["k_accuracy"]), f3(v["iou_before_em"]), f3(v["iou_after_em"]),
             f"{v['concept_fidelity']:.3f} ± {v['fidelity_sem']:.3f}", v["n_objects"]]
            for name, v in d["summary"].items()]
    out = [f"Held-out scenes (seeds {d['seeds']}), EM phase 1, {d['n_samples']} samples per "
           "concept; matched IoU over the true masks (objects and background).", ""]
    out += table(["concepts", "K right", "matched IoU before EM", "after EM",
                  "concept fidelity", "objects"], rows)
    if "fidelity_gap" in d:
        out += ["", f"Concept fidelity gap, named minus discovered: {d['fidelity_gap']:.3f}."]
    w = d.get("when_k_right")
    if w and w["n_scenes"]:
        out[-1] += (f" On the {w['n_scenes']} scenes where discovery found the right K: "
                    f"discovered {w['discovered']:.3f}, named {w['named']:.3f}.")
    return out


def editability_rows(r: Result) -> list[str]:
    d = r.data
    rows = [[f"{x['lambda_attn']:g}", x["phase2_steps"], ms(x["identity"]),
             ms(x["prompt_fidelity"]), ms(x["concept_fidelity"]), x["identity"]["n"]]
            for x in d["summary"]]
    return ([f"Identity against editability (prompt fidelity) over phase-2 steps and "
             f"lambda_attn, given masks, {d['n_samples']} samples per prompt; mean ± standard "
             "error over concepts.", ""]
            + table(["lambda_attn", "phase-2 steps", "identity", "prompt fidelity",
                     "concept fidelity", "concepts"], rows))


def block_discovery(results) -> list[str]:
    """The README's line on discovery: the held-out figures of the library's defaults."""
    found = [r for r in results if r.benchmark == "discovery" and not r.pilot
             and r.data.get("suite") == "held_out"]
    learned = [r for r in results if r.benchmark == "discovery_learning" and not r.pilot]
    if not found:
        return ["(no result yet: `python -m benchmarks discovery`)"]
    d = found[0].data
    v = d["summary"][d["default"]]
    out = [f"On {v['n_scenes']} held-out shapes-world scenes (1 to 3 objects, plain and "
           f"textured backgrounds, patterned objects) it finds the right number of concepts "
           f"in {pct(v['k_accuracy'])} of them, with a matched mask IoU of {f3(v['iou'])}, "
           f"in {v['seconds_per_image']:.2f} s per image on this CPU."]
    s = learned[0].data["summary"] if learned else {}
    if "discovered" in s:      # a partial run (still going) may lack the other settings
        d = s["discovered"]
        out[0] += (f" Learning the discovered concepts (EM, phase 1; each object's token starts "
                   f"from the word its attention reads most) on {d['n_scenes']} of those "
                   f"scenes: mask IoU {f3(d['iou_before_em'])} before EM and "
                   f"{f3(d['iou_after_em'])} after, concept fidelity "
                   f"{f3(d['concept_fidelity'])}")
        others = [f"{f3(s[k]['concept_fidelity'])} {how}" for k, how in (
            ("shared word", "when every object token starts from one shared word (the "
                            "paper's setting)"),
            ("named", "with the true count and class words")) if k in s]
        out[0] += (", against " + " and ".join(others) if others else "") + "."
    return out + ["", "Measured by `python -m benchmarks discovery` and `python -m benchmarks "
                  "discovery_learning`; all settings tried are in `docs/results.md`."]


def gpu_memory_rows(r: Result) -> list[str]:
    from benchmarks.gpu_memory import table as memory_table

    return memory_table(r.data).splitlines()


def block_gpu_memory(results) -> list[str]:
    rs = [r for r in results if r.benchmark == "gpu_memory" and not r.pilot]
    if not rs:
        return ["(no result yet: `python -m benchmarks gpu_memory`)"]
    out = []
    for r in rs:
        m = r.prov.get("machine") or {}
        where = (f"a {m.get('cpu_cores')}-core {m.get('processor')} CPU, torch {m.get('torch')}, "
                 f"diffusers {m.get('diffusers')}" if isinstance(m, dict) and m.get("cpu_cores")
                 else str(m or "this machine"))
        out += [f"Measured by `{r.prov.get('command')}` on {where} "
                f"(`benchmarks/results/{r.name}`):", ""] + gpu_memory_rows(r) + [""]
    return out[:-1]


FORMATTERS = {
    "em_suite": em_suite_rows, "concept_fidelity": concept_fidelity_rows,
    "concept_step_time": step_time_rows, "generation_sweep": sweep_rows,
    "model_quality": lambda r: quality_rows(r.data), "multi_concept": multi_concept_rows,
    "notebook_runtimes": runtimes_rows, "background_channel": background_rows,
    "mask_quality": mask_quality_rows, "attention_speed": scalar_rows,
    "phase2_files": phase2_files_rows, "discovery": discovery_rows,
    "gpu_memory": gpu_memory_rows, "discovery_learning": discovery_learning_rows,
    "editability": editability_rows,
}


def headline_of(r: Result) -> str:
    """One number that says what a result found (the pilots' appendix)."""
    s = r.data.get("summary", {})
    if r.benchmark == "em_suite":
        fx = s.get("fixed", {})
        return (f"EM final {f3(s['em']['final'])} (fixed: own masks {f3(fx.get('final_used'))}"
                f", re-estimated {f3(fx.get('final'))}) on {r.data.get('n_scenes')} scenes")
    if r.benchmark == "concept_fidelity":
        k = max((k for k in s if k.startswith("masked + attn")), default=None)
        if k:
            v = s[k]
            return (f"{k}: concept fidelity {ms(v['concept_fidelity'])}, identity "
                    f"{f3(v['identity']['mean'])}, prompt fidelity "
                    f"{f3(v['prompt_fidelity']['mean'])} ({v['concept_fidelity']['n']} concepts)")
    return ""


# ----------------------------------------------------------------------------- documents
# How a result's recorded model and notes read in docs/results.md: what the model IS (its
# architecture, its step count), not where it stood in the project's history (CHANGELOG.md).
NEUTRAL = (
    ("model v1: the bundled model shipped before model v2 (4-channel VAE, U-Net (48, 96))",
     "a smaller shapes model (4-channel VAE, U-Net (48, 96), solid objects only)"),
    ("its run warm-restarted from 1600 to 2000 steps", "trained 2000 U-Net steps instead of 1600"),
    ("shapes-ldm: model v2 at 9000 U-Net steps (the shipped model)", "shapes-ldm, the shipped model"),
    ("the bundled model of the day; checkpoint not recorded",
     "a bundled shapes model, its weights not recorded"),
    ("judge v1 (solid objects only)", "scored by a judge trained on solid objects only"),
    ("; judge v2", ""),
    ("fill_empty before its threshold was mended", "fill_empty with another threshold"),
)
NEUTRAL_RE = ((re.compile(r"shapes-ldm: model v2 at (\d+) U-Net steps \(an earlier checkpoint\)"),
               r"the shipped model's run at \1 U-Net steps (a snapshot)"),)


def neutral(text: str) -> str:
    """``text`` with the recorded descriptions of models and judges put as what they are."""
    for old, new in NEUTRAL:
        text = text.replace(old, new)
    for pattern, new in NEUTRAL_RE:
        text = pattern.sub(new, text)
    return text


def render_results_md(results: list[Result], shipped: dict, descriptions: dict) -> str:
    fp = shipped["weights_fingerprint"]
    main = [r for r in results if not r.pilot]
    pilots = [r for r in results if r.pilot]
    out = ["# Benchmark results", "",
           "<!-- generated by `python -m benchmarks tables` (make results) from the files in "
           "benchmarks/results/: do not edit -->", "",
           f"Every table below is read from a committed result file in `benchmarks/results/`."
           f" The shipped model is `{shipped['model']}`, weights fingerprint `{fp}`; each table "
           "says whether its result was measured on it (by the fingerprint the result "
           "recorded). A result without a recorded provenance carries a reconstructed one: the "
           "commit that recorded it and the command it names. "
           "Run a benchmark with `python -m benchmarks NAME` (`python -m benchmarks list`); "
           "the hand-written notes on the numbers are `benchmarks/results/PRESETS.md` and "
           "`benchmarks/results/model_recipes.md`.", ""]
    names = sorted({r.benchmark for r in main} | set(descriptions),
                   key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    for name in names:
        out += [f"## {name}", "", f"{descriptions.get(name, '')}", ""]
        mine = [r for r in main if r.benchmark == name]
        if not mine:
            out += [f"No result committed: `python -m benchmarks {name}`.", ""]
            continue
        if name == "em_suite" and len(mine) > 1:
            out += ["Final mean mask IoU of every suite run (details below):", ""]
            out += em_overview(mine, fp) + [""]
        for r in mine:
            out += [f"### `{r.name}`", "", model_line(r, fp), "", provenance_line(r), ""]
            notes = [n for n in (r.prov.get("notes") or "").split("; ")
                     if n and not n.startswith("reconstructed from")]
            if notes:
                out += [f"Note: {'; '.join(notes)}.", ""]
            out += FORMATTERS.get(name, scalar_rows)(r) + [""]
            png = r.path.with_suffix(".png")
            if png.exists():
                out += [f"![{r.name}](../benchmarks/results/{rel(png)})", ""]
    out += ["## Appendix: pilot runs", "",
            "Short runs that chose the settings above (`benchmarks/results/pilots/`), written "
            "up in `benchmarks/results/PRESETS.md`.", ""]
    preset = next((r for r in main if r.name == "concept_fidelity/preset.json"), None)
    fidelity_pilots = [r for r in pilots if r.benchmark == "concept_fidelity"]
    rows = []
    for r in pilots:
        rows.append([f"`{r.name}`", "yes" if r.prov.get("model_fingerprint") == fp else
                     f"no (`{r.prov.get('model_fingerprint')}`)", headline_of(r),
                     f"`{r.prov.get('command_now') or r.prov.get('command')}`"])
    out += table(["pilot", "shipped model", "headline", "command"], rows) + [""]
    for r in fidelity_pilots:
        others = [x for x in fidelity_pilots if x is not r]
        out += [f"### `{r.name}` beside the preset on the same concepts", "",
                model_line(r, fp), ""] + pilot_vs_preset(r, preset, others) + [""]
    return neutral("\n".join(out).rstrip("\n") + "\n")


def find(results, name) -> Result | None:
    return next((r for r in results if r.name == name), None)


def render_headline(results: list[Result], shipped: dict) -> str:
    fp = shipped["weights_fingerprint"]
    lines = ["<!-- generated by `python -m benchmarks tables` from benchmarks/results/; "
             "see docs/results.md -->"]

    def mark(r):
        got = r.prov.get("model_fingerprint")
        if got == fp:
            return ""
        return (f" (measured on another model, `{got}`)" if got
                else " (model fingerprint not recorded)")

    r = find(results, "em_suite/shared_word.json")
    if r:
        s = r.data["summary"]
        lines.append(f"- **EM in the paper's setting** (object tokens from one word, "
                     f"{r.data['n_scenes']} held-out scenes): final mask IoU "
                     f"**{f3(s['em']['final'])}**, against {f3(s['fixed']['final_used'])} for "
                     f"the fixed method's masks and {f3(s['given']['final'])} for given masks"
                     f"{mark(r)} (`{r.name}`).")
    r = find(results, "em_suite/class_words.json")
    if r:
        s = r.data["summary"]
        lines.append(f"- **EM with class-word tokens** ({r.data['n_scenes']} scenes): final mask "
                     f"IoU {f3(s['em']['final'])}, against {f3(s['fixed']['final_used'])} for "
                     f"the fixed method's (step-0) masks; EM's curve rises on "
                     f"{pct(s['em']['rises'])} of scenes{mark(r)} (`{r.name}`).")
    r = find(results, "concept_fidelity/preset.json")
    if r:
        v = r.data["summary"].get("masked + attn | phase 2")
        if v:
            lines.append(f"- **Concept fidelity** of the preset (given masks, phase 2): "
                         f"**{f3(v['concept_fidelity']['mean'])}**, identity "
                         f"{f3(v['identity']['mean'])}, prompt fidelity "
                         f"{f3(v['prompt_fidelity']['mean'])} over "
                         f"{v['concept_fidelity']['n']} concepts{mark(r)} (`{r.name}`).")
    r = find(results, "multi_concept/methods.json")
    if r:
        s = r.data["summary"]
        lines.append("- **Multi-concept generation**, concept fidelity: " + ", ".join(
            f"{m} {f3(s[m]['concept_fidelity']['mean'])}" for m in ("em", "fixed", "none",
                                                                     "given") if m in s)
            + f"{mark(r)} (`{r.name}`).")
    r = find(results, "concept_step_time/bundled.json")
    if r:
        p1 = next((x for x in r.data["rows"] if x.get("phase") == "phase 1"), None)
        if p1:
            lines.append(f"- **Training speed**: {p1['seconds_per_step']:.3f} s per phase-1 "
                         f"step (batch {p1['batch']}, {p1['threads']} threads, CPU){mark(r)} "
                         f"(`{r.name}`).")
    return "\n".join(lines[:6]) + "\n"


# ----------------------------------------------------------------------------- note blocks
def block_em_lambda(results) -> list[str]:
    rows = []
    for name, label in (("class_words", "0.1 (the preset)"), ("lambda_attn_1", "1.0"),
                        ("no_attention_loss", "0"), ("no_crf", "0.1, no CRF")):
        r = find(results, f"em_suite/model_v1/{name}.json")
        if r:
            s = r.data["summary"]
            rows.append([label, r.data["n_scenes"], f3(s["em"]["final"]),
                         f3(s["fixed"]["final"]), f3(s.get("given", {}).get("final")),
                         pct(rises(r, "em")), f"`{r.name}`"])
    return table(["lambda_attn", "scenes", "EM", "fixed", "given", "EM rises on", "file"], rows)


def block_em_pilots(results, names) -> list[str]:
    rows = []
    for name in names:
        r = find(results, name)
        if r:
            s = r.data["summary"]
            em, fx = s["em"], s["fixed"]
            rows.append([em_setting(r), r.data["n_scenes"]] + [f3(v) for v in em["mean"]]
                        + [f3(fx["final"]), f3(fx.get("final_used")), pct(rises(r, "em")),
                           f"`{r.name}`"])
    steps = find(results, names[0]).data["summary"]["em"]["steps"]
    return table(["setting", "scenes"] + [f"EM step {x}" for x in steps]
                 + ["fixed final (re-estimated)", "fixed's own masks", "EM rises on", "file"],
                 rows)


def block_class_words(results) -> list[str]:
    rows = []
    for name, label in (("class_words", "max-normalised (the preset)"),
                        ("class_words_bce_loss", "BCE")):
        r = find(results, f"em_suite/{name}.json")
        if r:
            s = r.data["summary"]
            v = vs_fixed(r) or {}
            rows.append([label, f3(s["em"]["mean"][0]), f3(s["em"]["final"]),
                         f3(s["fixed"]["final_used"]) + " / " + f3(s["fixed"]["final"]),
                         f3(s["given"]["final"]), pct(s["em"]["rises"]),
                         f"{v.get('wins_by_0.05')} / {v.get('losses_by_0.05')}", f"`{r.name}`"])
    return table(["attention loss", "step 0", "EM final", "fixed: own masks / re-estimated",
                  "given", "EM rises on", "EM vs fixed run, > 0.05 above / below", "file"], rows)


def block_quick_recipe(results) -> list[str]:
    r = find(results, "model_quality/quick_recipe.json")
    qpath = SHIPPED_MODEL / "quality.json"
    if r is None or not qpath.exists():
        return ["(missing: model_quality/quick_recipe.json or the shipped quality.json)"]
    q, s = r.data, json.loads(qpath.read_text())

    def psnr(d):
        p = d["vae_psnr"]
        return f"{p['all']:.1f} dB (plain {p['plain']:.1f}, textured {p['textured']:.1f})"

    def gen(d, k):
        return f3(d["generation"][k])

    def shape(d):
        bc = d["generation"]["by_count"]
        return (f"{f3(d['generation']['shape'])} (1 object {f3(bc['1']['shape'])}, "
                f"2 objects {f3(bc['2']['shape'])})")

    rows = [["VAE PSNR", psnr(q), psnr(s), ">= 28"],
            ["judge on VAE reconstructions, shape", f3(q["judge_validation"]["vae"]["shape"]),
             f3(s["judge_validation"]["vae"]["shape"]), ">= 0.97"],
            ["shape-word IoU (best layers and timesteps)", f3(q["localisation"]["best"]["iou"]),
             f3(s["localisation"]["best"]["iou"]), ">= 0.72"],
            ["generation colour", gen(q, "colour"), gen(s, "colour"), ">= 0.95"],
            ["generation shape", shape(q), shape(s), ">= 0.85"],
            ["pair head (\"both\")", gen(q, "both"), gen(s, "both"), ""],
            ["named background kept", gen(q, "background"), gen(s, "background"), ">= 0.9"]]
    return table(["figure", f"quick recipe (`{r.name}`)",
                  "shipped model (`data/models/shapes-ldm/quality.json`)",
                  "goal (shipped model)"], rows)


P2_LONG = "pilots/concept_fidelity/phase2_300_steps.json"
P2_LORA = "pilots/concept_fidelity/phase2_lora.json"
P2_FAST = "pilots/concept_fidelity/phase2_fast_hard_concepts.json"


def note_blocks(results) -> dict:
    preset = find(results, "concept_fidelity/preset.json")
    return {
        "em-lambda-model-v1": lambda: block_em_lambda(results),
        "em-shared-word-pilots-7000": lambda: block_em_pilots(results, [
            "pilots/em_suite/shared_word_max_fill_before_mend.json",
            "pilots/em_suite/shared_word_max_fill_paper_loss.json",
            "pilots/em_suite/shared_word_max_fill.json"]),
        "em-shared-word-pilots": lambda: block_em_pilots(results, [
            "pilots/em_suite/shared_word_centered.json",
            "pilots/em_suite/random_init_max_fill.json",
            "pilots/em_suite/shared_word_max.json"]),
        "em-shared-word-suite": lambda: em_suite_rows(find(results, "em_suite/shared_word.json")),
        "em-class-words": lambda: block_class_words(results),
        "phase2-longer": lambda: pilot_vs_preset(find(results, P2_LONG), preset),
        "phase2-lora": lambda: pilot_vs_preset(find(results, P2_LORA), preset,
                                               [find(results, P2_LONG)]),
        "phase2-fast": lambda: pilot_vs_preset(find(results, P2_FAST), preset,
                                               [find(results, P2_LONG)]),
        "quick-recipe": lambda: block_quick_recipe(results),
        "gpu-memory": lambda: block_gpu_memory(results),
        "discovery": lambda: block_discovery(results),
    }


BLOCK = re.compile(r"(<!-- results:([\w-]+) -->\n)(.*?)(<!-- /results:\2 -->)", re.DOTALL)


def fill_blocks(text: str, blocks: dict, where: str) -> str:
    def sub(m):
        key = m.group(2)
        if key not in blocks:
            raise SystemExit(f"{where}: unknown generated block {key!r}")
        body = "\n".join(blocks[key]())
        return (f"{m.group(1)}<!-- generated by `python -m benchmarks tables` from "
                f"benchmarks/results/: do not edit -->\n\n{body}\n\n{m.group(4)}")
    return BLOCK.sub(sub, text)


# ----------------------------------------------------------------------------- main
def descriptions() -> dict:
    from benchmarks.frame import REGISTRY, description

    return {n: description(n) for n in REGISTRY}


def render_all(shipped: dict, root: Path = ROOT) -> dict:
    """{relative path: text} of every generated file (``root``: where the notes are read)."""
    results = load_results()
    out = {RESULTS_MD: render_results_md(results, shipped, descriptions()),
           HEADLINE_MD: render_headline(results, shipped),
           SHIPPED_JSON: json.dumps(shipped, indent=1, sort_keys=True) + "\n"}
    blocks = note_blocks(results)
    headline = out[HEADLINE_MD].splitlines()[1:]      # without its own "generated" line
    blocks["headline"] = lambda: [line for line in headline if line.strip()]
    for note in NOTES:
        src = root / note
        if src.exists():
            out[note] = fill_blocks(src.read_text(), blocks, note)
    return out


def stored_shipped(root: Path = ROOT) -> dict | None:
    p = root / SHIPPED_JSON
    return json.loads(p.read_text()) if p.exists() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks tables",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None,
                    help="write the generated files under this folder instead of the "
                         "repository (same relative paths)")
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 if a generated file differs")
    args = ap.parse_args(argv)
    shipped = shipped_model(stored_shipped())
    files = render_all(shipped)
    target = Path(args.out) if args.out else ROOT
    stale = []
    for path, text in files.items():
        dest = target / path
        if args.check:
            if not (ROOT / path).exists() or (ROOT / path).read_text() != text:
                stale.append(path)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists() or dest.read_text() != text:
            dest.write_text(text)
            print(f"wrote {dest.relative_to(target) if args.out else path}")
    if stale:
        print("stale (run `make results`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0
