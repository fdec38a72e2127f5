"""Reliability of inputs: images as a viewer shows them, prompts the tokenizer can read,
paths that are what they seem, seeds and numbers in range, and a model trainer that checks
its settings and never saves a diverged model."""

import contextlib
import dataclasses
import json
import os
import re
import signal
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conceptlab.fileio import check_number, check_regular_file, fingerprint, load_tensors
from conceptlab.models import (
    MAX_SEED,
    check_prompt,
    check_seed,
    load_pipeline,
    resolve_model,
    to_uint8,
    unrepresentable_characters,
)
from conceptlab.shapes.model import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def no_hang(seconds=10):
    """Fail (instead of hanging the test run) when the block blocks, e.g. on a FIFO."""
    def boom(*_):
        raise TimeoutError("the call blocked")
    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)  # again every second: code that
    try:                                                 # catches the first cannot hang
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def halves(h=16, w=24):
    """An image whose left half is red and right half blue (orientation is visible)."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2, 0] = 255
    a[:, w // 2:, 2] = 255
    return a


# ----------------------------------------------------------------------------- images
def test_exif_orientation_is_applied_to_files_and_pil_images(tmp_path):
    arr = halves()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display" (a phone held upright)
    path = tmp_path / "phone.png"
    Image.fromarray(arr).save(path, exif=exif)
    upright = np.rot90(arr, k=-1)  # clockwise: (24, 16, 3), red on top
    assert np.array_equal(to_uint8(path), upright)
    with Image.open(path) as im:
        assert np.array_equal(to_uint8(im), upright)
    plain = tmp_path / "plain.png"  # no orientation tag: unchanged
    Image.fromarray(arr).save(plain)
    assert np.array_equal(to_uint8(plain), arr)


def test_animated_and_multi_page_images_are_refused_with_the_frame_count(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue", "green")]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    tif = tmp_path / "pages.tif"
    frames[0].save(tif, save_all=True, append_images=frames[1:2])
    with pytest.raises(ValueError, match=r"3 frames.*seek\(k\)"):
        to_uint8(gif)
    with pytest.raises(ValueError, match="2 frames"):
        to_uint8(tif)
    with Image.open(gif) as im:
        with pytest.raises(ValueError, match="3 frames"):
            to_uint8(im)
        im.seek(1)  # the fix the message gives: one frame, copied
        assert tuple(to_uint8(im.copy())[0, 0]) == (0, 0, 255)


def test_32_bit_images_with_no_known_white_level_are_refused_not_darkened(tmp_path):
    """A 32-bit TIFF of values 0-1000 came out almost black (x / 65535 * 255)."""
    a = (np.arange(16 * 16).reshape(16, 16) * 1000 // 255).astype(np.int32)  # 0-1000
    Image.fromarray(a).save(tmp_path / "deep.tif")
    with pytest.raises(ValueError, match=r"values in \[0, 1000\].*not guessed"):
        to_uint8(tmp_path / "deep.tif")
    with pytest.raises(ValueError, match=r"values in \[0, 1000\]"):
        to_uint8(a)  # the same as an array (was read as 16-bit: x / 257)
    Image.fromarray(a.astype(np.float32)).save(tmp_path / "float.tif")  # mode F
    with pytest.raises(ValueError, match=r"32-bit float.*\[0, 1\]"):
        to_uint8(tmp_path / "float.tif")
    small = (a // 4).astype(np.int32)  # 0-250: 8-bit values in a 32-bit image, kept exactly
    Image.fromarray(small).save(tmp_path / "small.tif")
    assert np.array_equal(to_uint8(tmp_path / "small.tif")[..., 0], small)


def test_16_bit_images_are_scaled_by_the_16_bit_convention_and_say_their_range(tmp_path):
    a = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)  # 0-65535
    Image.fromarray(a).save(tmp_path / "x16.png")  # opens as mode I;16
    with pytest.warns(UserWarning, match=r"16-bit.*span 0-65535.*x / 257"):
        out = to_uint8(tmp_path / "x16.png")
    assert np.array_equal(out[..., 0], np.arange(256).reshape(16, 16))
    low = np.full((16, 16), 200, np.uint16)  # 8-bit values stored as uint16: said so
    with pytest.warns(UserWarning, match="8-bit values, convert it to uint8"):
        assert (to_uint8(low) == 1).all()


# ----------------------------------------------------------------------------- prompts
def test_spaced_concept_tokens_are_refused():
    pipe = tiny_pipeline()
    pipe.tokenizer.add_tokens(["[v1]"])
    assert check_prompt(pipe, "a photo of [v1]") == "a photo of [v1]"
    with pytest.raises(ValueError, match=r"spaces inside its brackets.*write \[v1\]"):
        check_prompt(pipe, "a photo of [ v1 ]")  # passed, and meant '[', 'v', '1', ']'
    with pytest.raises(ValueError, match="spaces inside its brackets"):
        check_prompt(pipe, "a photo of [my dog]")


def test_characters_the_tokenizer_cannot_represent_are_refused_by_name(pipe):
    tok = pipe.tokenizer
    assert unrepresentable_characters(tok, "a red star, on a gray background!") == []
    assert unrepresentable_characters(tok, "a red star 😀 é 😀") == ["😀", "é"]
    with pytest.raises(ValueError, match="cannot represent: 😀"):
        check_prompt(pipe, "a red star 😀")
    assert check_prompt(pipe, "A Red Star") == "A Red Star"  # lower-cased, not unknown


# ----------------------------------------------------------------------------- paths
def test_a_folder_given_as_an_image_is_called_a_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder, not an image"):
        to_uint8(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such image"):
        to_uint8(tmp_path / "missing.png")


@pytest.mark.parametrize("name", ["./models/sd15", "../sd15", "~/no-such-model-folder",
                                  "/no/such/model", "runs/bundled/model", "owner/name/",
                                  "my models/sd15"])
def test_a_mistyped_local_path_is_not_sent_to_the_hub(name):
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        resolve_model(name)
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        load_pipeline(name, progress=False)


def test_hub_ids_and_unknown_names_are_unchanged():
    assert resolve_model("someone/some-model") == "someone/some-model"
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model("no-such-model")


def test_fifos_and_devices_are_refused_at_once(tmp_path):
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)
    with no_hang():
        with pytest.raises(ValueError, match="FIFO"):
            to_uint8(fifo)
        with pytest.raises(ValueError, match="FIFO"):
            load_tensors(fifo)
        with pytest.raises(ValueError, match="character device"):
            to_uint8("/dev/null")
        with pytest.raises(ValueError, match="more than the 4 allowed"):
            check_regular_file(__file__, max_bytes=4)
    assert check_regular_file(__file__) == __file__


@pytest.mark.parametrize("victim", ["model_index.json", "unet/config.json"])
def test_a_fifo_in_a_model_folder_is_refused_before_loading(tmp_path, victim):
    folder = tmp_path / "model"
    tiny_pipeline().save_pretrained(folder)
    (folder / victim).unlink()
    os.mkfifo(folder / victim)
    with no_hang():
        with pytest.raises(ValueError, match="FIFO"):
            resolve_model(str(folder))
        with pytest.raises(ValueError, match="FIFO"):
            load_pipeline(str(folder), progress=False)


# ----------------------------------------------------------------------------- numbers
def test_check_seed_accepts_the_generators_range_only():
    assert check_seed(0) == 0
    assert check_seed(np.int64(7)) == 7 and type(check_seed(np.int64(7))) is int
    assert check_seed(MAX_SEED) == 2**32 - 1
    # 2**32 would give seed 0's pictures on the CPU generator; 2**64 overflowed in torch
    for bad in (2**32, 2**64, -1, True, 1.0, "3", None):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 4294967295\]"):
            check_seed(bad)


def test_check_number_names_the_field_its_value_and_the_range():
    assert check_number("g", 7.5, 0) == 7.5
    assert check_number("n", np.int32(3), 1, integer=True) == 3
    assert check_number("p", 1, 0, 1) == 1.0 and type(check_number("p", 1, 0, 1)) is float
    cases = [(dict(value=float("nan"), lo=0), r"g must be a finite number in \[0, inf\), got nan"),
             (dict(value=float("inf"), lo=0), "got inf"),
             (dict(value=True, lo=0), r"got True \(bool\)"),
             (dict(value="1", lo=0), r"got '1' \(str\)"),
             (dict(value=0.0, lo=0, lo_open=True), r"\(0, inf\), got 0.0"),
             (dict(value=1.0, lo=0, hi=1, hi_open=True), r"\[0, 1\), got 1.0"),
             (dict(value=2.5, lo=1, integer=True), r"an integer in \[1, inf\), got 2.5"),
             (dict(value=-3, hi=-4), r"\(-inf, -4\], got -3")]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            check_number("g", **kw)


# ----------------------------------------------------------------------------- train-model
BAD_SETTINGS = [("ema_decay", float("nan"), r"\[0, 1\)"), ("ema_decay", 1.0, r"\[0, 1\)"),
                ("p_uncond", 2.0, r"\[0, 1\]"), ("n_images", 0, r"\[1, inf\)"),
                ("lr", 0.0, r"\(0, inf\)"), ("vae_lr", float("inf"), r"\(0, inf\)"),
                ("min_snr_gamma", -1.0, r"\(0, inf\)"), ("grounding_every", 0, r"\[1, inf\)"),
                ("grounding_tmax", 1001, r"\[0, 1000\]"), ("checkpoint_every", 0, "inf"),
                ("batch", 1.5, "an integer"), ("threads", True, "bool"),
                ("seed", -1, "4294967295"), ("vae_crop", 30, "multiple of 4"),
                ("model", "huge", "unknown model size")]


@pytest.mark.parametrize(("field", "value", "rng"), BAD_SETTINGS)
def test_model_train_config_checks_every_number(field, value, rng):
    from conceptlab.shapes.train import ModelTrainConfig

    with pytest.raises(ValueError, match=rng):
        ModelTrainConfig(**{field: value})
    with pytest.raises(ValueError, match=rng):  # dataclasses.replace checks too
        dataclasses.replace(ModelTrainConfig(), **{field: value})


@pytest.mark.parametrize(("flag", "value", "msg"), [
    ("--ema-decay", "nan", r"ema_decay must be a finite number in \[0, 1\), got nan"),
    ("--p-uncond", "2", r"p_uncond must be a finite number in \[0, 1\], got 2.0"),
    ("--n-images", "0", r"n_images must be an integer in \[1, inf\), got 0")])
def test_cli_train_model_refuses_bad_numbers_before_writing(tmp_path, capsys, flag, value, msg):
    from conceptlab.cli import main

    out = tmp_path / "run"
    assert main(["train-model", "--out", str(out), "--model", "tiny", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert re.search(msg, err[0]), err[0]
    assert not out.exists()


def test_a_refused_resume_leaves_train_config_json_as_it_was(tmp_path):
    from conceptlab.fileio import torch_save
    from conceptlab.shapes.train import (
        ModelTrainConfig,
        run_fingerprint,
        run_settings,
        train_model,
    )

    out = tmp_path / "run"
    out.mkdir()
    first = ModelTrainConfig(out=str(out), model="tiny", n_images=16)
    torch_save({"stage": "vae", "step": 1, "vae": {}, "opt": {},
                "run": run_fingerprint(first, "vae"), "settings": run_settings(first, "vae")},
               out / "checkpoint.pt")
    (out / "train_config.json").write_text(json.dumps({"n_images": 16}))
    with pytest.raises(RuntimeError, match=r"different run .*'n_images': \(16, 32\)"):
        train_model(dataclasses.replace(first, n_images=32), progress=False)
    assert json.loads((out / "train_config.json").read_text()) == {"n_images": 16}
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "train_config.json"]


def test_a_model_with_non_finite_weights_is_not_saved(tmp_path):
    from conceptlab.shapes.model import TINY, build_components
    from conceptlab.shapes.train import new_ema, save_pipeline

    comps = build_components(TINY)
    ema = new_ema([comps["unet"], comps["text_encoder"]], 0.999)
    ok = save_pipeline(comps, ema, tmp_path / "ok")
    assert (tmp_path / "ok" / "model_index.json").exists() and ok == tmp_path / "ok"
    ema.shadow_params[3].fill_(float("nan"))
    with pytest.raises(RuntimeError, match="NaN or infinite weights"):
        save_pipeline(comps, ema, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


# ----------------------------------------------------------------------------- the trainer
def test_the_fingerprint_is_the_shared_one_and_ignores_int_versus_float():
    from conceptlab.shapes.train import ModelTrainConfig, run_fingerprint, run_settings

    cfg = ModelTrainConfig(lr=1)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert run_fingerprint(cfg) == fingerprint(run_settings(cfg))
    assert run_fingerprint(cfg) == run_fingerprint(ModelTrainConfig(lr=1.0))
    assert run_fingerprint(cfg) == run_fingerprint(ModelTrainConfig(lr=1.0, unet_steps=9))
    assert run_fingerprint(cfg) != run_fingerprint(ModelTrainConfig(lr=0.5))


def test_schedules_and_ema_are_the_recipe_and_resume_where_they_stopped(tmp_path, monkeypatch):
    """diffusers' EMAModel / get_scheduler reproduce the recipe's formulas; an interrupted
    run resumes with the EMA's update count and the learning rate where they were."""
    import math

    from conceptlab.shapes import train

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    train._warmup_cosine_schedule(opt, 0.1, 400, start=50)  # resumed at step 50
    assert opt.param_groups[0]["lr"] == pytest.approx(
        0.1 * min(1.0, 51 / 100) * 0.5 * (1 + math.cos(math.pi * 50 / 400)), rel=1e-12)
    train._cosine_schedule(opt, 0.1, 40, start=7)
    assert opt.param_groups[0]["lr"] == pytest.approx(
        0.1 * 0.5 * (1 + math.cos(math.pi * 7 / 40)), rel=1e-12)
    ema = train.new_ema([torch.nn.Linear(2, 2)], 0.999)
    assert [ema.get_decay(k) for k in (2, 3, 10**6)] == [2 / 11, 3 / 12, 0.999]

    cfg = train.ModelTrainConfig(out=str(tmp_path / "a"), model="tiny", n_images=16,
                                 vae_steps=2, vae_batch=4, unet_steps=4, batch=2,
                                 checkpoint_every=2, log_every=1)
    train.train_model(cfg, progress=False)
    saved = train._atomic_save

    class Cut(Exception):
        pass

    def interrupt_after_step_2(obj, path):
        saved(obj, path)
        if isinstance(obj, dict) and obj.get("stage") == "unet" and obj["step"] == 2:
            raise Cut
    cut = dataclasses.replace(cfg, out=str(tmp_path / "b"))
    monkeypatch.setattr(train, "_atomic_save", interrupt_after_step_2)
    with pytest.raises(Cut):
        train.train_model(cut, progress=False)
    monkeypatch.setattr(train, "_atomic_save", saved)
    train.train_model(cut, progress=False)

    def unet_log(run):
        lines = (tmp_path / run / "train_log.jsonl").read_text().splitlines()
        return {r["step"]: r for r in map(json.loads, lines) if r.get("stage") == "unet"}
    a, b = unet_log("a"), unet_log("b")
    assert [b[s]["lr"] for s in range(4)] == [a[s]["lr"] for s in range(4)]
    for run in ("a", "b"):
        ckpt = load_tensors(tmp_path / run / "checkpoint.pt")
        assert ckpt["ema"]["optimization_step"] == 4  # resumed from 2, not restarted
        assert ckpt["run"] == fingerprint(train.run_settings(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train.run_fingerprint(cfg) == train.run_fingerprint(cut)


@pytest.mark.parametrize(("args", "msg"), [
    (["--seed", str(2**32)], r"seed must be an integer in \[0, 4294967295\]"),
    (["--guidance", "inf"], r"--guidance.*must be a finite number >= 0, got inf")])
def test_cli_sample_refuses_out_of_range_seeds_and_guidance(tmp_path, capsys, args, msg):
    from conceptlab.cli import main

    try:   # refused by the argument parser (a usage error, exit 2) or by the command
        rc = main(["sample", "--out", str(tmp_path / "s"), *args])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert re.search(msg, capsys.readouterr().err)
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------ found by probing further
def test_an_empty_model_name_is_named_as_such():
    for name in ("", "  "):
        with pytest.raises(ValueError, match="the model name is empty"):
            resolve_model(name)


def test_concept_names_from_files_have_a_length_limit(tmp_path):
    from safetensors.torch import save_file

    from conceptlab.concept_files import load_concepts
    from conceptlab.generation import generate
    from conceptlab.shapes.model import tiny_pipeline

    long = "[" + "v" * 100 + "]"
    save_file({long: torch.zeros(1, 32)}, str(tmp_path / "long.safetensors"))
    c = load_concepts(tmp_path / "long.safetensors")
    with pytest.raises(ValueError, match="at most 64 characters"):
        generate(tiny_pipeline(0), c, f"a photo of {long}", n=1, num_inference_steps=1)


def test_the_same_picture_twice_is_warned(tmp_path):
    from conceptlab.em import check_inputs
    from conceptlab.shapes.model import tiny_pipeline

    pipe = tiny_pipeline(0)
    image = np.zeros((32, 32, 3), np.uint8)
    other = image.copy()
    other[0, 0] = 1
    with pytest.warns(UserWarning, match="image 2 is the same picture as image 0"):
        check_inputs(pipe, [image, other, image.copy()], ["star", "heart"])
