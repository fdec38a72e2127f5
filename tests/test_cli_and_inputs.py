"""Bad input gets one clear error: the CLI's exit codes, crafted concepts files, images."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conceptlab.cli import main
from conceptlab.concept_files import ConceptsFileError, load_concepts, save_concepts
from conceptlab.generation import generate
from conceptlab.models import to_uint8
from conceptlab.shapes.model import tiny_pipeline
from conceptlab.tokens import new_concepts


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["learn", str(tmp_path / "nope.png"), "--concepts", "star"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such image" in err[0]
    assert main(["generate", str(tmp_path), "a photo of [v1]"]) == 2
    assert "no learned concepts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # out of range: argparse's usage error
        main(["sample", "-n", "0"])
    assert e.value.code == 2


def test_cli_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "learn", str(tmp_path / "nope.png"), "--concepts", "star"])


def test_crafted_concepts_file_cannot_redefine_a_word(tmp_path):
    from safetensors.torch import save_file

    pipe = tiny_pipeline()
    save_file({"star": torch.zeros(1, 32)}, str(tmp_path / "star.safetensors"))
    evil = load_concepts(tmp_path / "star.safetensors")       # reading touches no pipeline
    with pytest.raises(ValueError, match="begin and end with a bracket"):
        generate(pipe, evil, "a photo of a star", n=1, num_inference_steps=1)
    save_file({"stars": torch.zeros(1, 32)}, str(tmp_path / "stars.safetensors"))
    with pytest.raises(ValueError, match="superstars|ordinary word"):   # not a word's substring
        generate(pipe, load_concepts(tmp_path / "stars.safetensors"), "superstars", n=1)
    save_file({"<circle>": torch.zeros(1, 32)}, str(tmp_path / "circle.safetensors"))
    generate(pipe, load_concepts(tmp_path / "circle.safetensors"), "a <circle>", n=1,
             num_inference_steps=1)
    save_file({"[v1]": torch.full((1, 32), float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ConceptsFileError, match="NaN"):
        load_concepts(tmp_path / "nan.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\x00" * 10)  # truncated
    with pytest.raises(ConceptsFileError, match="truncated or corrupt"):
        load_concepts(tmp_path / "cut.safetensors")
    save_file({"[a]": torch.zeros(1, 32), "[b]": torch.zeros(1, 32)},
              str(tmp_path / "two.safetensors"))      # ConceptExpress's several-token dict
    with pytest.raises(ConceptsFileError, match="holds one"):
        load_concepts(tmp_path / "two.safetensors")
    save_concepts(new_concepts(pipe, 1, ["star"]), tmp_path / "folder")
    side = json.loads((tmp_path / "folder" / "concepts.json").read_text())
    side["tokens"][0]["token"] = "star"                # a crafted sidecar: same refusal
    (tmp_path / "folder" / "concepts.json").write_text(json.dumps(side))
    with pytest.raises(ValueError, match="begin and end with a bracket"):
        generate(pipe, str(tmp_path / "folder"), "a star", n=1, num_inference_steps=1)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "RGB"])
def test_image_files_of_any_mode(tmp_path, mode):
    arr = (np.arange(16 * 16 * 3) % 251).reshape(16, 16, 3).astype(np.uint8)
    img = Image.fromarray(arr)
    if mode == "I;16":
        img = Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        img = img.convert(mode)
    path = tmp_path / "x.png"
    img.save(path)
    out = to_uint8(path)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_bad_arrays_are_rejected():
    with pytest.raises(ValueError, match="mask"):
        to_uint8(np.zeros((16, 16, 3), bool))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(np.full((16, 16, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="at least"):
        to_uint8(np.zeros((4, 64, 3), np.uint8))
    with pytest.raises(TypeError, match="image must be"):
        to_uint8(3)
    with pytest.warns(UserWarning, match="aspect ratio"):
        to_uint8(np.zeros((16, 32, 3), np.uint8), 16, resize=True)
    t = torch.zeros(3, 16, 16)  # channel-first tensors are accepted
    assert to_uint8(t).shape == (16, 16, 3)


def test_train_config_rejects_unknown_and_bad_fields():
    from conceptlab.train import TrainConfig

    with pytest.raises(TypeError, match="did you mean 'steps'"):
        TrainConfig().replace(stpes=10)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="phase2"):
        TrainConfig(phase2="half")


@pytest.mark.slow
def test_cli_learn_twice_into_one_folder_refuses_then_overwrites(tmp_path, capsys):
    """A second run into the same --out never silently returns the first run's result."""
    from conceptlab.shapes.examples import load_example

    img = tmp_path / "scene.png"
    Image.fromarray(load_example("striped-star-and-heart").image).save(img)
    out = str(tmp_path / "out")
    args = ["learn", str(img), "--concepts", "star,heart", "--steps", "2", "--out", out,
            "--quiet", "--threads", "1"]
    assert main(args) == 0

    def init_words():
        side = json.loads((tmp_path / "out" / "concepts.json").read_text())
        return [t["init_word"] for t in side["tokens"]]
    first = init_words()
    assert first == ["star", "heart"]
    capsys.readouterr()
    assert main(args) == 2  # the same run again: finished, refused
    assert "--overwrite" in capsys.readouterr().err
    other = [a if a != "star,heart" else "heart,star" for a in args]
    assert main(other) == 2  # another run into the folder: refused
    assert "--overwrite" in capsys.readouterr().err
    assert init_words() == first  # nothing lost
    assert main(other + ["--overwrite"]) == 0
    assert init_words() == ["heart", "star"]  # the new run's result, not the old one


def test_cli_ctrl_c_exits_130_and_says_incomplete(tmp_path, monkeypatch, capsys):
    import conceptlab.em

    img = tmp_path / "scene.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(img)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(conceptlab.em, "learn_concepts", interrupted)
    assert main(["learn", str(img), "--concepts", "star", "--out", str(tmp_path / "o")]) == 130
    assert "interrupted" in capsys.readouterr().err

    class Incomplete:
        complete = False

    monkeypatch.setattr(conceptlab.em, "learn_concepts", lambda *a, **k: Incomplete())
    assert main(["learn", str(img), "--concepts", "star", "--out", str(tmp_path / "o")]) == 130
    assert "INCOMPLETE" in capsys.readouterr().err
    assert not (tmp_path / "o" / "concepts.json").exists()  # an incomplete run: not saved


def test_a_saved_result_lists_only_its_own_files(tmp_path):
    from conceptlab.em import learn_concepts
    from conceptlab.result import LearnedConcepts
    from conceptlab.train import TrainConfig

    pipe = tiny_pipeline()
    r = learn_concepts(pipe, np.zeros((32, 32, 3), np.uint8), ["star"], method="fixed",
                       config=TrainConfig(steps=1, batch_size=1), progress=False)
    r.save(tmp_path / "out")                      # an earlier result, with a history
    (tmp_path / "out" / "notes.txt").write_text("mine")
    r.history = None
    r.save(tmp_path / "out")                      # replaced by one without
    side = json.loads((tmp_path / "out" / "concepts.json").read_text())
    assert "history.json" not in side["files"]   # the manifest names this result's files
    assert not (tmp_path / "out" / "history.json").exists()   # the old result's file went
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"   # not a result file: kept
    assert LearnedConcepts.load(tmp_path / "out").history is None
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in names if n.endswith(".tmp")]  # atomic: no temporary files left


@pytest.mark.slow
def test_cli_generate_and_evaluate_a_learned_folder(tmp_path, capsys):
    """`conceptlab generate` writes a labelled grid; `conceptlab evaluate` prints the table,
    refuses an example the concepts were not learned from, and writes its JSON."""
    from conceptlab.shapes.examples import load_example

    img = tmp_path / "scene.png"
    Image.fromarray(load_example("striped-star-and-heart").image).save(img)
    out = str(tmp_path / "c")
    assert main(["learn", str(img), "--concepts", "star,heart,background", "--steps", "2",
                 "--out", out, "--quiet", "--threads", "1", "--method", "fixed"]) == 0
    assert main(["generate", out, "a photo of [v1]", "a photo of [v2] on [v3]", "-n", "2",
                 "--inference-steps", "3", "--guidance", "3", "--out", str(tmp_path / "g"),
                 "--threads", "1"]) == 0
    assert "2 prompts x 2 images" in capsys.readouterr().out
    assert Image.open(tmp_path / "g" / "generations.png").width >= 2 * 128
    assert main(["evaluate", out, "--example", "three-objects", "-n", "2"]) == 2
    assert "not learned from it" in capsys.readouterr().err
    # same number of concepts, another image
    assert main(["evaluate", out, "--example", "two-tone-square-and-circle", "-n", "2"]) == 2
    assert "not learned from it" in capsys.readouterr().err
    js = tmp_path / "ev.json"
    assert main(["evaluate", out, "--example", "striped-star-and-heart", "-n", "2",
                 "--threads", "1", "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "a photo of [v2] above [v1]" in text and "concept fidelity" in text
    s = json.loads(js.read_text())["summary"]
    assert 0 <= s["mask_iou"] <= 1 and 0 <= s["identity"] <= 1
    # without the example: class words given by hand, no ground truth, no mask IoU
    assert main(["evaluate", out, "--words", "a blue striped star", "a red heart",
                 "a beige background", "-n", "2", "--threads", "1"]) == 0
    assert main(["evaluate", out, "--words", "a star", "-n", "2"]) == 2
    assert "3 concepts" in capsys.readouterr().err


def test_cli_learn_and_generate_with_a_model_folder(tiny_model_folder, tmp_path, capsys):
    """`learn` and `generate` on a local diffusers folder (`--model FOLDER`), the same code as
    for the bundled model or Stable Diffusion; `--steps` is the whole run."""
    from conceptlab.result import LearnedConcepts
    from conceptlab.shapes import world

    img = tmp_path / "scene.png"
    Image.fromarray(world.render_scene(world.sample_scene(seed=2, n_objects=1),
                                       size=32).image).save(img)
    out = str(tmp_path / "c")
    assert main(["learn", str(img), "--concepts", "star,background", "--steps", "3",
                 "--model", tiny_model_folder, "--out", out, "--quiet", "--threads", "1"]) == 0
    r = LearnedConcepts.load(out)
    assert r.history.steps[-1] == 3 and r.tokens.unet is not None   # phases 1 + 2: 3 steps
    assert main(["generate", out, "a photo of [v1] on [v2]", "-n", "2", "--inference-steps",
                 "2", "--model", tiny_model_folder, "--out", str(tmp_path / "g"),
                 "--threads", "1"]) == 0
    assert "1 prompts x 2 images" in capsys.readouterr().out
    assert main(["generate", out, "a photo of [v1]", "--model", "shapes-ldm", "-n", "1",
                 "--out", str(tmp_path / "h")]) == 2          # learned on another model
    assert "learned on" in capsys.readouterr().err
