"""The frame of ``python -m benchmarks``: registry, shared options, provenance, resume.

A benchmark is a module of this package with

- a docstring whose first line is its one-line description (``python -m benchmarks list``);
- ``add_arguments(parser)``: its own options;
- ``run(args, ctx) -> dict``: the result, which the frame writes with its provenance;
- optionally ``QUICK`` (option defaults for ``--quick``, a small smoke run), ``THREADS``
  (its default ``--threads``), ``result_name(args)`` (the result file's stem, named by
  what it measures; default: ``RESULT_NAME`` or the benchmark's name) and ``ITEM_OPTIONS``
  (options that choose which items run or how they are shown, not what they measure).

A result file is replaced only by a run of the same command (its options, less the shared
ones and ``ITEM_OPTIONS``) unless ``--overwrite`` says so.

The frame owns what every benchmark shares: ``--threads``, ``--out`` (a folder, default
``benchmarks/results/NAME/``; ``--quick`` defaults to ``outputs/benchmarks/NAME/`` so a smoke
run never touches a committed result), ``--name``, ``--resume``/``--overwrite`` and
``--quick``. It writes every result atomically with a ``provenance`` block
(:func:`provenance`), and resumes through :meth:`Context.cached`: a finished item (a scene,
a run, a model) is stored under ``OUT/.cache/`` keyed by everything it depends on, so an
interrupted or extended run computes only what is missing.

Benchmarks import the public library (``conceptlab...``) and this module, nothing else.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
QUICK_RESULTS = ROOT / "outputs" / "benchmarks"   # git-ignored: where --quick writes

# name -> module. One line each; the description is the module docstring's first line.
REGISTRY = {
    "attention_speed": "benchmarks.attention_speed",
    "background_channel": "benchmarks.background_channel",
    "concept_fidelity": "benchmarks.concept_fidelity",
    "concept_step_time": "benchmarks.concept_step_time",
    "discovery": "benchmarks.discovery",
    "discovery_learning": "benchmarks.discovery_learning",
    "editability": "benchmarks.editability",
    "em_suite": "benchmarks.em_suite",
    "generation_sweep": "benchmarks.generation_sweep",
    "gpu_memory": "benchmarks.gpu_memory",
    "mask_quality": "benchmarks.mask_quality",
    "model_quality": "benchmarks.model_quality",
    "multi_concept": "benchmarks.multi_concept",
    "notebook_runtimes": "benchmarks.notebook_runtimes",
    "phase2_files": "benchmarks.phase2_files",
}

# every provenance block has these keys (tests/test_results_tables.py checks them)
PROVENANCE_KEYS = ("benchmark", "command", "git_commit", "git_dirty", "conceptlab_version",
                   "model", "model_fingerprint", "date", "machine", "wall_seconds",
                   "reconstructed")
# options that say where and how a run goes, not what it measures
SHARED_OPTIONS = ("threads", "out", "name", "json", "resume", "overwrite", "quick")


# ----------------------------------------------------------------------------- models
def sd15_pipeline():
    """A StableDiffusionPipeline with SD 1.5's architecture and random weights."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from conceptlab.shapes.model import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(77)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.5's defaults
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        sample_size=512)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- registry
def module_file(name: str) -> Path:
    spec = importlib.util.find_spec(REGISTRY[name])
    return Path(spec.origin)


def description(name: str) -> str:
    """The first line of a benchmark's docstring, read without importing it."""
    doc = ast.get_docstring(ast.parse(module_file(name).read_text())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def load(name: str):
    return importlib.import_module(REGISTRY[name])


def usage() -> str:
    width = max(len(n) for n in REGISTRY)
    lines = ["usage: python -m benchmarks NAME [options]   (python -m benchmarks NAME --help)",
             "       python -m benchmarks list | tables [--check]", "",
             "One tool for every benchmark. Each result is written to "
             "benchmarks/results/NAME/ with its provenance;",
             "`python -m benchmarks tables` (make results) regenerates docs/results.md from "
             "those files.", "", "benchmarks:"]
    lines += [f"  {n:<{width}}  {description(n)}" for n in REGISTRY]
    lines += ["", "shared options (every benchmark): --threads N, --out FOLDER, --name STEM, "
              "--resume (default) | --overwrite, --quick"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- provenance
def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked or untracked files differ from it). Changes under
    benchmarks/results/ (what benchmarks write) do not count as dirty."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain")
    if commit is None or status is None:
        return None, None
    dirty = any(line[3:].strip('"').split(" -> ")[-1].split("/")[:2] != ["benchmarks", "results"]
                for line in status.splitlines() if line.strip())
    return commit.strip(), dirty


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine(device: str | None = None) -> dict:
    """CPU cores, torch threads, device and the versions that decide the numbers."""
    torch = sys.modules.get("torch")
    return {"cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads() if torch is not None else None,
            "device": device,
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": _version("torch"), "diffusers": _version("diffusers"),
            "transformers": _version("transformers")}


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def conceptlab_version() -> str | None:
    try:
        return importlib.import_module("conceptlab").__version__
    except (ImportError, AttributeError):
        return _version("conceptlab")


# ----------------------------------------------------------------------------- the cache
def _key_json(key) -> str:
    return json.dumps(key, sort_keys=True, default=str, separators=(",", ":"))


def _encode(value, arrays: dict):
    """JSON-able copy of ``value``; numpy arrays go to ``arrays`` and leave a reference."""
    import numpy as np

    if isinstance(value, np.ndarray):
        name = f"a{len(arrays)}"
        arrays[name] = value
        return {"__ndarray__": name}
    if isinstance(value, dict):
        return {str(k): _encode(v, arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, arrays) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(value, arrays):
    if isinstance(value, dict):
        if set(value) == {"__ndarray__"}:
            return arrays[value["__ndarray__"]]
        return {k: _decode(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    return value


def save_npz(path, arrays: dict) -> str:
    """Atomically write ``arrays`` (name -> array) as a compressed .npz (no pickle)."""
    import numpy as np

    from conceptlab.fileio import atomic_save

    def write(tmp):
        with open(tmp, "wb") as f:   # a file object: np.savez would append ".npz" to a name
            np.savez_compressed(f, **arrays)

    return atomic_save(write, path)


# ----------------------------------------------------------------------------- the context
class Context:
    """What a benchmark's ``run(args, ctx)`` gets from the frame."""

    def __init__(self, name: str, args, argv: list[str], result_path: Path,
                 resume: bool = True, quick: bool = False, log=print):
        self.name = name
        self.args = args
        self.argv = list(argv)
        self.command = "python -m benchmarks " + shlex.join([name, *argv])
        self.result_path = Path(result_path)
        self.out = self.result_path.parent
        self.resume = resume
        self.quick = quick
        self.log = log
        self.model: str | None = None
        self.model_fingerprint: str | None = None
        self.device: str | None = "cpu"
        self.extra_provenance: dict = {}
        self.started = time.time()
        self.date = utc_now()
        self.git_commit, self.git_dirty = git_state()
        self.cache_dir = self.out / ".cache"

    # -- the model the numbers were measured on
    def set_model(self, pipe=None, *, name: str | None = None,
                  fingerprint: str | None = None) -> str | None:
        """Record the model: its name or path and its weights fingerprint (computed from
        ``pipe`` with ``conceptlab.models.weights_fingerprint`` unless given)."""
        if pipe is not None and fingerprint is None:
            from conceptlab.models import weights_fingerprint

            fingerprint = weights_fingerprint(pipe)
        if pipe is not None:
            self.device = str(getattr(pipe, "device", "cpu"))
        self.model = name if name is not None else self.model
        self.model_fingerprint = fingerprint
        return fingerprint

    # -- files beside the result
    def path(self, suffix: str) -> Path:
        """``OUT/NAME.suffix``: a figure (".png") or arrays (".npz") beside the result."""
        return self.result_path.with_suffix(suffix)

    def previous(self) -> dict | None:
        """The result file this run will replace, if there is one."""
        if not self.result_path.exists():
            return None
        return json.loads(self.result_path.read_text())

    # -- resume
    def cached(self, key, fn):
        """``fn()``, or its value from an earlier run with the same ``key`` (JSON-able: put
        in it everything the item depends on; the benchmark's name and the recorded model
        fingerprint are added). Values are JSON plus numpy arrays. ``--overwrite``
        recomputes every item."""
        full = {"benchmark": self.name, "model": self.model_fingerprint, "key": key}
        text = _key_json(full)
        digest = hashlib.sha256(text.encode()).hexdigest()[:24]
        meta, npz = self.cache_dir / f"{digest}.json", self.cache_dir / f"{digest}.npz"
        if self.resume and meta.exists():
            stored = json.loads(meta.read_text())
            if _key_json(stored["key"]) == text:
                arrays = {}
                if stored.get("arrays"):
                    import numpy as np

                    with np.load(npz, allow_pickle=False) as z:
                        arrays = {k: z[k] for k in z.files}
                return _decode(stored["value"], arrays)
        value = fn()
        self._store(meta, npz, full, value)
        return value

    def _store(self, meta: Path, npz: Path, key, value) -> None:
        from conceptlab.fileio import atomic_write_json

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        ignore = self.cache_dir / ".gitignore"
        if not ignore.exists():   # the cache is local: never committed
            ignore.write_text("*\n")
        arrays: dict = {}
        encoded = _encode(value, arrays)
        if arrays:
            save_npz(npz, arrays)
        atomic_write_json(meta, {"key": key, "value": encoded, "arrays": bool(arrays)})

    # -- the result
    def provenance(self, complete: bool = True) -> dict:
        opts = {k: v for k, v in sorted(vars(self.args).items()) if k not in SHARED_OPTIONS}
        return {"benchmark": self.name, "command": self.command,
                "options": json.loads(json.dumps(opts, default=str)),
                "quick": self.quick,
                "git_commit": self.git_commit, "git_dirty": self.git_dirty,
                "conceptlab_version": conceptlab_version(),
                "model": self.model, "model_fingerprint": self.model_fingerprint,
                "date": self.date, "machine": machine(self.device),
                "wall_seconds": round(time.time() - self.started, 1),
                "complete": complete, "reconstructed": False, **self.extra_provenance}

    def write(self, result, complete: bool = True) -> Path:
        """Write ``result`` (a dict; a list is stored as ``{"rows": [...]}``) atomically,
        with its provenance first. ``complete=False``: a partial result (after each item)."""
        from conceptlab.fileio import atomic_write_text

        if not isinstance(result, dict):
            result = {"rows": result}
        body = {"provenance": self.provenance(complete),
                **{k: v for k, v in result.items() if k != "provenance"}}
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.result_path, json.dumps(body, indent=1, default=_jsonable) + "\n")
        return self.result_path


def _jsonable(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-able: {type(o).__name__}")


# ----------------------------------------------------------------------------- options
def add_shared_arguments(ap: argparse.ArgumentParser, name: str, module) -> None:
    g = ap.add_argument_group("shared options (every benchmark)")
    g.add_argument("--threads", type=int, default=getattr(module, "THREADS", 2),
                   help="torch CPU threads (default %(default)s)")
    g.add_argument("--out", default=None,
                   help=f"output folder (default benchmarks/results/{name}/; with --quick "
                        f"outputs/benchmarks/{name}/); a path ending in .json names the "
                        "result file itself")
    g.add_argument("--name", default=None,
                   help="the result file's stem, named by what it measures (default: the "
                        "benchmark's own, e.g. from its setting)")
    g.add_argument("--json", default=None, help=argparse.SUPPRESS)   # old spelling of --out
    r = g.add_mutually_exclusive_group()
    r.add_argument("--resume", dest="overwrite", action="store_false",
                   help="reuse the finished items of an earlier run (default)")
    r.add_argument("--overwrite", "--restart", dest="overwrite", action="store_true",
                   help="recompute every item; replace a result made by another command")
    ap.set_defaults(overwrite=False)   # resume unless told (the first action's default is True)
    g.add_argument("--quick", action="store_true",
                   help="a small setting for a smoke run (written under outputs/)")


def result_path(name: str, module, args) -> Path:
    explicit = args.json or args.out
    if explicit and str(explicit).endswith(".json"):
        return Path(explicit).resolve()
    folder = Path(explicit) if explicit else (QUICK_RESULTS if args.quick else RESULTS) / name
    if args.name:
        stem = args.name
    elif hasattr(module, "result_name"):
        stem = module.result_name(args)
    else:
        stem = getattr(module, "RESULT_NAME", name)
    return (folder / f"{stem}.json").resolve()


def _comparable(options: dict | None, module) -> dict | None:
    if options is None:
        return None
    skip = set(SHARED_OPTIONS) | set(getattr(module, "ITEM_OPTIONS", ()))
    return {k: v for k, v in options.items() if k not in skip}


def run_benchmark(name: str, argv: list[str]) -> int:
    module = load(name)
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks {name}",
                                 description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(ap)
    add_shared_arguments(ap, name, module)
    pre, _ = ap.parse_known_args(argv)
    if pre.quick:
        ap.set_defaults(**getattr(module, "QUICK", {}))
    args = ap.parse_args(argv)
    path = result_path(name, module, args)
    ctx = Context(name, args, argv, path, resume=not args.overwrite, quick=args.quick)
    old = ctx.previous() if path.exists() else None
    if old is not None and not args.overwrite:
        prov = old.get("provenance") or {}
        before = _comparable(prov.get("options"), module)
        now = _comparable(ctx.provenance()["options"], module)
        if before is None:
            raise SystemExit(
                f"{path} holds a result recorded before this tool (its provenance is "
                f"reconstructed; command {prov.get('command')!r}): pass --overwrite to "
                "measure it again, or --name NEW to write beside it")
        if before != now:
            raise SystemExit(
                f"{path} exists and was made by another command ({prov.get('command')!r}); "
                "pass --name NEW to write beside it, or --overwrite to replace it")
    import torch

    torch.set_num_threads(args.threads)
    result = module.run(args, ctx)
    if result is not None:
        written = ctx.write(result)
        try:
            shown = written.relative_to(ROOT)
        except ValueError:
            shown = written
        print(f"wrote {shown} ({ctx.provenance()['wall_seconds']:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help", "list"):
        print(usage())
        return 0
    if argv[0] == "tables":
        from benchmarks import tables

        return tables.main(argv[1:])
    if argv[0] not in REGISTRY:
        print(usage(), file=sys.stderr)
        print(f"\nunknown benchmark {argv[0]!r}", file=sys.stderr)
        return 2
    return run_benchmark(argv[0], argv[1:])
