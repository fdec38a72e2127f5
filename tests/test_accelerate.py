"""Several processes through accelerate, on the CPU: two gloo processes started by
``accelerate launch --multi_gpu --num_processes 2`` (CUDA hidden from them).

- ``train-model`` data-parallel equals one process with the same global batch: the same
  logged losses, and models that compute the same outputs to 1e-4 (measured: ~6e-6). The
  weights themselves may differ by up to a few learning rates where a weight's gradient is
  ~0 (a bias just before a GroupNorm, the attention's key bias): Adam turns a gradient of
  1e-10 into a step of one learning rate, and its sign is float noise. Also after a resume.
- ``learn-many`` writes one result per image, each what ``conceptlab learn`` writes; a
  second run skips them; a failed image loses nothing and resumes from its checkpoint.

The two launching tests are in the slow tier; the fast tier checks the same sums in one
process (the shards of a batch add up to the global batch) and learn-many's sharing,
failures and resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conceptlab.cli import main
from conceptlab.fileio import load_tensors
from conceptlab.shapes.model import TINY, build_components
from conceptlab.shapes.train import ModelTrainConfig, check_batches, train_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
#: how close the two runs' models compute (measured: ~6e-6 on outputs of size ~1-3)
OUTPUT_ATOL = 1e-4
#: how close the concept rows of a two-process and a one-process `learn` are
LEARN_ATOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args, timeout=300) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 -m conceptlab ARGS``: two CPU
    processes (gloo), one thread each."""
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "conceptlab", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ----------------------------------------------------------------------------- train-model
CFG = ModelTrainConfig(model="tiny", n_images=16, vae_steps=4, vae_batch=4, unet_steps=2,
                       batch=4, lr=0.02, checkpoint_every=2, log_every=1)


def _cli_args(cfg: ModelTrainConfig) -> list[str]:
    base = ModelTrainConfig()
    return [a for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(base, f.name)
            for a in ("--" + f.name.replace("_", "-"), str(getattr(cfg, f.name)))] + ["--quiet"]


@torch.no_grad()
def model_outputs(ckpt_path) -> dict:
    """What a checkpoint's models compute on fixed inputs: the text encoder and the U-Net
    (trained and EMA weights), and the VAE's reconstruction."""
    ck = load_tensors(ckpt_path)
    c = build_components(TINY, seed=0)
    for part in ("vae", "unet", "text_encoder"):
        c[part].load_state_dict(ck[part])
    g = torch.Generator().manual_seed(1)
    x = torch.rand((4, 3, 32, 32), generator=g) * 2 - 1
    ids = torch.randint(0, len(c["tokenizer"]), (4, 32), generator=g)
    zt, t = torch.randn((4, 4, 8, 8), generator=g), torch.tensor([10, 200, 500, 900])
    out = {"vae": c["vae"].decode(c["vae"].encode(x).latent_dist.mean).sample}
    for weights in ("trained", "ema"):
        if weights == "ema":
            params = list(c["unet"].parameters()) + list(c["text_encoder"].parameters())
            for p, s in zip(params, ck["ema"]["shadow_params"]):
                p.copy_(s)
        emb = c["text_encoder"](ids)[0]
        out[f"{weights} text"], out[f"{weights} unet"] = emb, c["unet"](zt, t, emb).sample
    return out


def max_weight_difference(a, b) -> float:
    A, B = load_tensors(a), load_tensors(b)
    return max(float((A[p][k] - B[p][k]).abs().max())
               for p in ("vae", "unet", "text_encoder") for k in A[p])


def assert_same_training(one: Path, two: Path, ckpt: str = "checkpoint.pt"):
    """The runs logged the same losses and their models compute the same outputs."""
    def losses(folder):
        log = [json.loads(x) for x in (folder / "train_log.jsonl").read_text().splitlines()]
        return [(r["stage"], r["step"], r["loss"], r.get("grounding", 0.0)) for r in log
                if r["stage"] in ("vae", "unet")]
    l1, l2 = losses(one), losses(two)
    assert [r[:2] for r in l1] == [r[:2] for r in l2]
    assert np.allclose([r[2:] for r in l1], [r[2:] for r in l2], atol=2e-5, rtol=0)
    o1, o2 = model_outputs(one / ckpt), model_outputs(two / ckpt)
    diffs = {k: float((o1[k] - o2[k]).abs().max()) for k in o1}
    assert max(diffs.values()) < OUTPUT_ATOL, diffs
    return diffs


@pytest.mark.slow  # two launched processes: ~45 s and ~20 s on 2 cores
def test_train_model_in_two_processes_equals_one_process_and_resumes(tmp_path):
    """Two processes with a global batch of 4 (2 rows each) train what one process trains
    with a batch of 4: VAE stage, U-Net stage with the grounding loss, then a resume."""
    one, two = tmp_path / "one", tmp_path / "two"
    train_model(dataclasses.replace(CFG, out=str(one)), progress=False)
    shutil.copy(one / "checkpoint.pt", tmp_path / "one-step2.pt")
    r = launch("train-model", "--out", str(two), *_cli_args(CFG))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("saved the pipeline") == 1 and "(2 processes)" in r.stdout  # main only
    assert (two / "model" / "model_index.json").exists()
    shutil.copy(two / "checkpoint.pt", tmp_path / "two-step2.pt")
    assert_same_training(one, two)
    # resume both to 4 U-Net steps (unet_steps may grow on resume)
    longer = dataclasses.replace(CFG, unet_steps=4)
    train_model(dataclasses.replace(longer, out=str(one)), progress=False)
    r = launch("train-model", "--out", str(two), *_cli_args(longer))
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(x) for x in (two / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if x["stage"] == "unet"] == [0, 1, 2, 3]  # resumed at 2
    assert not [x for x in log[len(log) // 2:] if x["stage"] == "vae"]
    diffs = assert_same_training(one, two)
    print("outputs' max difference:", diffs, "weights':",
          max_weight_difference(one / "checkpoint.pt", two / "checkpoint.pt"))


def _shard(n: int, index: int):
    """Stands for process ``index`` of ``n`` (no process group: the test adds up by hand)."""
    from conceptlab.shapes.train import _Processes

    procs = _Processes()
    procs.n, procs.index = n, index
    return procs


def test_the_shards_of_a_batch_add_up_to_the_global_batch():
    """The fast check of what DDP averages: two processes' rows are the two halves of the
    one-process batch, and their gradients average (their grounding losses add up) to the
    global batch's, in the U-Net stage and the VAE stage."""
    import copy

    from conceptlab.shapes.train import _UNetStage, build_dataset, vae_loss

    cfg = dataclasses.replace(CFG, out="unused", n_images=8)
    comps = build_components(TINY, seed=0)
    data = build_dataset(cfg, comps["tokenizer"], TINY.image_size)
    z = torch.randn((8, 8, 8, 8), generator=torch.Generator().manual_seed(0))

    def unet_step(n, index):
        stage = _UNetStage(cfg, copy.deepcopy(comps), data, z, None, _shard(n, index))
        b = stage.batch()
        l_diff, l_g, loss = stage.losses(0, b)
        loss.backward()
        return b, l_diff.item(), l_g.item(), torch.cat([p.grad.flatten() for p in stage.params])

    full, halves = unet_step(1, 0), [unet_step(2, i) for i in (0, 1)]
    assert [len(h[0].idx) for h in halves] == [2, 2]
    assert torch.equal(torch.cat([h[0].idx for h in halves]), full[0].idx)
    assert torch.equal(torch.cat([h[0].noise for h in halves]), full[0].noise)
    assert abs(np.mean([h[1] for h in halves]) - full[1]) < 1e-6       # diffusion: mean
    assert abs(sum(h[2] for h in halves) - full[2]) < 1e-6 and full[2] > 0  # grounding: sum
    grad = (halves[0][3] + halves[1][3]) / 2                            # what DDP computes
    assert float((grad - full[3]).norm() / full[3].norm()) < 1e-5
    # the VAE stage: the posterior noise of the global batch, the shard's rows of it
    x = torch.rand((4, 3, 16, 16), generator=torch.Generator().manual_seed(2)) * 2 - 1

    def vae_grad(rows=None):
        vae = copy.deepcopy(comps["vae"])
        torch.manual_seed(3)
        loss, _ = vae_loss(vae, x if rows is None else x[rows], rows=rows, batch=4)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in vae.parameters() if p.grad is not None])
    g_full = vae_grad()
    g_ddp = (vae_grad(slice(0, 2)) + vae_grad(slice(2, 4))) / 2
    assert float((g_ddp - g_full).norm() / g_full.norm()) < 1e-5


def test_a_global_batch_must_split_between_the_processes():
    check_batches(CFG, 2)
    with pytest.raises(ValueError, match="--batch 6 does not split between 4 processes"):
        check_batches(dataclasses.replace(CFG, batch=6, vae_batch=8), 4)
    with pytest.raises(ValueError, match="--vae-batch 4 does not split between 3"):
        check_batches(CFG, 3)


# ----------------------------------------------------------------------------- learn-many
@pytest.fixture
def image_folder(tmp_path):
    from conceptlab.shapes import world

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        scene = world.render_scene(world.sample_scene(seed=i, n_objects=1), size=32)
        Image.fromarray(scene.image).save(folder / f"scene{i}.png")
    (folder / "notes.txt").write_text("not an image: ignored")
    return folder


LEARN = ["--concepts", "star,background", "--steps", "3", "--quiet", "--threads", "1"]


def _same_result(a: Path, b: Path):
    for name in ("v1.safetensors", "v2.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow  # two launched processes: ~45 s and ~20 s on 2 cores
def test_learn_many_in_two_processes_one_result_per_image_then_skips(
        image_folder, tiny_model_folder, tmp_path, capsys):
    out = tmp_path / "out"
    r = launch("learn-many", str(image_folder), "--out", str(out), "--model",
               tiny_model_folder, *LEARN)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 images in 2 processes: 3 done, 0 skipped, 0 failed" in r.stdout
    assert r.stdout.count("images in 2 processes") == 1            # the main process prints
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["scene0", "scene1", "scene2"]
    assert all((out / f"scene{i}" / "concepts.json").exists() for i in range(3))
    # each result is what `conceptlab learn` writes for that image alone
    assert main(["learn", str(image_folder / "scene1.png"), "--out", str(tmp_path / "alone"),
                 "--model", tiny_model_folder, *LEARN]) == 0
    _same_result(out / "scene1", tmp_path / "alone")
    capsys.readouterr()
    # a second run finds every result and skips it, without loading the model
    assert main(["learn-many", str(image_folder), "--out", str(out), "--model", "no-such-model",
                 *LEARN]) == 0
    assert "3 images: 0 done, 3 skipped, 0 failed" in capsys.readouterr().out


class Killed(Exception):
    """Stands for a crash in the middle of a run (nothing saved on the way out)."""


def test_learn_many_keeps_going_after_a_failure_and_resumes_it(
        image_folder, tiny_model_folder, tmp_path, monkeypatch, capsys):
    from conceptlab.many import learn_many
    from conceptlab.train.trainer import ConceptTrainer

    (image_folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    # process 1 of 3 takes images 1, 4, ...: scene0 alone (broken.png sorts first)
    report = learn_many(tiny_model_folder, image_folder, out, ["star", "background"],
                        process_index=1, num_processes=3, steps=3)
    assert [(Path(o.image).name, o.status) for o in report.outcomes] == [("scene0.png", "done")]
    real_step, steps = ConceptTrainer.step, []

    def dying_step(self, *a, **k):
        steps.append(self.step_count)
        if len(steps) == 2:                       # the first run to learn dies at step 2
            raise Killed("the machine went down")
        return real_step(self, *a, **k)
    monkeypatch.setattr(ConceptTrainer, "step", dying_step)
    args = ["learn-many", str(image_folder), "--out", str(out), "--model", tiny_model_folder,
            *LEARN]
    assert main(args) == 2                        # some failed: exit non-zero
    text = capsys.readouterr()
    assert "4 images: 1 done, 1 skipped, 2 failed" in text.out
    assert "failed      broken:" in text.out and "Killed: the machine went down" in text.out
    assert "2 of 4 images failed" in text.err
    assert (out / "scene2" / "concepts.json").exists()          # learned after the failure
    assert not (out / "scene1" / "concepts.json").exists()
    assert (out / "scene1" / "checkpoint" / "run.json").exists()
    steps.clear()
    monkeypatch.setattr(ConceptTrainer, "step", lambda self, *a, **k: (
        steps.append(self.step_count), real_step(self, *a, **k))[1])
    assert main(args) == 2                        # broken.png still fails
    assert "4 images: 1 done, 2 skipped, 1 failed" in capsys.readouterr().out
    assert steps == [1, 2]                        # scene1 resumed from its checkpoint
    monkeypatch.undo()
    assert main(["learn", str(image_folder / "scene1.png"), "--out", str(tmp_path / "alone"),
                 "--model", tiny_model_folder, *LEARN]) == 0
    _same_result(out / "scene1", tmp_path / "alone")  # the resumed run = an uninterrupted one


def test_learn_many_stops_at_ctrl_c_and_says_what_is_left(image_folder, tiny_model_folder,
                                                          tmp_path, monkeypatch, capsys):
    from conceptlab.train.trainer import ConceptTrainer

    def ctrl_c(self, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ConceptTrainer, "step", ctrl_c)
    out = tmp_path / "out"
    assert main(["learn-many", str(image_folder), "--out", str(out), "--model",
                 tiny_model_folder, *LEARN]) == 130
    text = capsys.readouterr()
    assert "3 images: 0 done, 0 skipped, 0 failed, 1 interrupted, 2 not started" in text.out
    assert "run the same command again to resume" in text.err
    assert not (out / "scene0" / "concepts.json").exists()           # nothing half-saved
    assert (out / "scene0" / "checkpoint" / "run.json").exists()     # but resumable
    assert not (out / "scene1").exists()


def test_learn_many_stops_at_once_when_the_model_does_not_load(image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["learn-many", str(image_folder), "--out", str(out), "--model",
                 str(tmp_path / "no-model"), *LEARN]) == 2
    assert "no model folder at" in capsys.readouterr().err      # one line, not one per image
    assert not any(p.is_dir() for p in out.glob("*"))            # no result folder begun


# ----------------------------------------------------------------------------- learn
@pytest.mark.slow  # two launched processes: ~30 s on 2 cores
def test_learn_in_two_processes_equals_one_process_with_the_same_batch(
        image_folder, tiny_model_folder, tmp_path):
    """One run, data-parallel: each process takes half of every batch of 4 and the
    gradients are averaged; the learned rows equal a one-process run's to float rounding,
    and only the main process writes."""
    from conceptlab.concept_files import load_concepts

    image = str(image_folder / "scene0.png")
    args = ["learn", image, "--model", tiny_model_folder, "--concepts", "star,background",
            "--steps", "4", "--em-every", "2", "--quiet"]
    r = launch(*args, "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("learned [v1], [v2]") == 1                 # the main process prints
    assert main([*args, "--threads", "1", "--out", str(tmp_path / "one")]) == 0
    one = load_concepts(tmp_path / "one").embeddings
    two = load_concepts(tmp_path / "two").embeddings
    assert float((two - one).abs().max()) <= LEARN_ATOL, float((two - one).abs().max())
    hist = [json.loads((tmp_path / f / "history.json").read_text())["loss"]
            for f in ("one", "two")]
    assert np.allclose(hist[0], hist[1], atol=1e-5)
