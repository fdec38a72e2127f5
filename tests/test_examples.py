"""Every usage example in the README and in the module docstrings runs as written.

An example is an indented block of a module docstring (``>>>`` prompts stripped) or a
```python block of README.md. The names an example takes from its prose (``pipe``, an
``image``, a ``scene``, ...) are given below in ``GIVEN``, once per module. A line ending in
``# not run here`` needs what this machine lacks (Stable Diffusion weights) and is skipped.
"""

from __future__ import annotations

import ast
import importlib
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# module -> which indented blocks of its docstring are examples (0 = the first block)
EXAMPLES = {
    "conceptlab.attention": [1],
    "conceptlab.models": [0],
    "conceptlab.maps": [0],
    "conceptlab.tokens": [0],
    "conceptlab.train.config": [0],
    "conceptlab.train.trainer": [0],
    "conceptlab.estep": [0],
    "conceptlab.em": [0],
    "conceptlab.generation": [0],
    "conceptlab.shapes.world": [0],
    "conceptlab.shapes.judge": [0],
}


def given(pipe):
    """The names the examples' prose introduces (``pipe``, ``image``, ...)."""
    from conceptlab.generation import generate
    from conceptlab.shapes.examples import load_example
    from conceptlab.shapes.world import render_scene, sample_scene
    from conceptlab.tokens import new_concepts
    from conceptlab.train import ConceptImage, TrainConfig

    ex = load_example("striped-star-and-heart")
    # the examples use the bundled model's latent and the U-Net's own inputs
    z = torch.randn(1, pipe.unet.config.in_channels, 16, 16,
                    generator=torch.Generator().manual_seed(0))
    return {
        "attention": dict(latents=z, t=torch.tensor([500]),
                          text_embeddings=pipe.text_encoder(
                              pipe.tokenizer(["a red star"], return_tensors="pt",
                                             padding="max_length").input_ids)[0]),
        "maps": dict(image=ex.image),
        "estep": lambda: dict(image=ex.image,
                              learned=new_concepts(pipe, 3, ["star", "heart", "background"])),
        "em": dict(image=ex.image),
        "generation": lambda: dict(concepts=new_concepts(pipe, 2, init_words=["star", "heart"])),
        "train.trainer": lambda: _trainer_names(pipe, ex, new_concepts, ConceptImage,
                                               TrainConfig),
        "shapes.judge": lambda: dict(images=np.stack(
            [render_scene(sample_scene(seed=s, n_objects=1)).image for s in (1, 2)]),
            pipe=pipe, generate=generate),
    }


def _trainer_names(pipe, ex, new_concepts, ConceptImage, TrainConfig):
    tokens = new_concepts(pipe, 2, init_words=["star", "heart"])
    data = [ConceptImage(ex.image, ex.masks[[0, 1]])]
    return dict(tokens=tokens, data=data, new_data=data,
                config=TrainConfig.for_bundled().replace(steps=6, batch_size=1, phase2="none"))


def docstring_blocks(text: str) -> list[str]:
    """The indented blocks of a docstring, dedented, ``>>>``/``...`` prompts removed."""
    blocks, cur = [], []
    for line in text.splitlines() + ["end"]:
        if line.startswith("    ") or (cur and not line.strip()):
            cur.append(line)
        else:
            if any(s.strip() for s in cur):
                blocks.append(textwrap.dedent("\n".join(cur)).strip("\n"))
            cur = []
    return [re.sub(r"^(>>>|\.\.\.) ?", "", b, flags=re.MULTILINE) for b in blocks]


def runnable(code: str) -> str:
    return "\n".join(line for line in code.splitlines() if not line.rstrip().endswith("# not run here"))


def run_example(code: str, names: dict, module):
    top = importlib.import_module("conceptlab")
    ns = {k: getattr(top, k) for k in top.__all__}  # what `from conceptlab import *` gives
    ns.update({k: v for k, v in vars(module).items() if not k.startswith("_")})
    ns.update(names)
    compiled = compile(runnable(code), f"<example of {module.__name__}>", "exec")
    exec(compiled, ns)  # noqa: S102 (the repository's own examples)
    return ns


# what each module's example must have done (an example is checked, not only run)
CHECKS = {
    "attention": lambda ns: all(v[0].ndim == 5 for v in ns["store"].maps.values()),
    "models": lambda ns: type(ns["pipe"]).__name__ == "StableDiffusionPipeline",
    "maps": lambda ns: "star" in ns["maps"].words
    and tuple(ns["maps"].for_word("star", size=(64, 64)).shape) == (64, 64),
    "tokens": lambda ns: ns["image"].size == (64, 64)
    and "[v1]" not in ns["pipe"].tokenizer.get_vocab(),
    "train.config": lambda ns: ns["cfg"].steps == 50,
    "train.trainer": lambda ns: ns["trainer"].step_count == ns["config"].total_steps,
    "estep": lambda ns: ns["est"].masks.shape == (3, 64, 64)
    and ns["est"].masks.sum(0).max() <= 1,
    "em": lambda ns: ns["learned"].complete and ns["learned"].masks[0].shape == (3, 64, 64),
    "generation": lambda ns: len(ns["images"]) == 4,
    "shapes.world": lambda ns: ns["scene"].image.shape == (64, 64, 3),
    "shapes.judge": lambda ns: ns["clf"] is not None,
}

# the examples that learn with the full preset on the bundled model take a minute each
SLOW_EXAMPLES = {"conceptlab.em"}


@pytest.mark.parametrize("modname", [pytest.param(m, marks=pytest.mark.slow)
                                     if m in SLOW_EXAMPLES else m for m in EXAMPLES])
def test_module_docstring_examples_run(modname, one_thread):
    from conceptlab.models import load_pipeline
    module = importlib.import_module(modname)
    blocks = docstring_blocks(module.__doc__)
    short = modname.removeprefix("conceptlab.")
    for i in EXAMPLES[modname]:
        code = blocks[i]
        ast.parse(runnable(code))  # an example is Python, not pseudo-code
        p = load_pipeline(device="cpu", progress=False)  # each example gets a fresh pipeline
        extra = given(p).get(short, {})
        extra = extra() if callable(extra) else extra
        ns = run_example(code, {"pipe": p, **extra}, module)
        assert CHECKS[short](ns), f"the example of {modname} did not do what it says"


@pytest.mark.slow
def test_readme_examples_run(one_thread):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks, "README.md has no python example"
    import conceptlab
    for code in blocks:
        ns = run_example(code, {}, conceptlab)
        if isinstance(ns.get("result"), conceptlab.LearnedConcepts):  # learn_concepts found masks
            assert ns["result"].masks[0].shape[0] == 3
            assert ns["result"].masks[0].any(axis=(1, 2)).all()


def test_block_extraction():
    doc = "Title.\n\n    a = 1\n    >>> b = a + 1\n\nProse.\n\n    c = 3  # not run here\n"
    blocks = docstring_blocks(doc)
    assert blocks == ["a = 1\nb = a + 1", "c = 3  # not run here"]
    assert runnable(blocks[1]) == ""


def test_files_named_in_docstrings_exist():
    """A docstring that sends the reader to a file (``docs/cheatsheet.md``) names a real one."""
    named = set()
    for f in (ROOT / "conceptlab").rglob("*.py"):
        named |= {(f, m) for m in re.findall(r"``((?:docs|benchmarks|data|notebooks)/[^`\s]+)``",
                                             f.read_text())}
    assert named
    missing = [f"{f.relative_to(ROOT)}: {m}" for f, m in named if not (ROOT / m).exists()]
    assert not missing, missing
