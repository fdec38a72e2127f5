"""No run is lost between training and saving, no folder is half-written, one run at a time
writes a folder, and no result is used with another model."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptlab.cli import main
from conceptlab.fileio import FolderBusy, folder_lock, recover_folder, replace_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def scene_png(tmp_path):
    from conceptlab.shapes import world

    path = tmp_path / "scene.png"
    Image.fromarray(world.render_scene(world.sample_scene(seed=2, n_objects=1),
                                       size=32).image).save(path)
    return str(path)


def learn(scene_png, model, out, *extra):
    return main(["learn", scene_png, "--concepts", "star,background", "--steps", "3",
                 "--model", model, "--out", out, "--quiet", "--threads", "1", *extra])


def no_training(monkeypatch):
    from conceptlab.train.trainer import ConceptTrainer

    def fail(self, *a, **k):
        raise AssertionError("trained again")
    monkeypatch.setattr(ConceptTrainer, "step", fail)


def test_a_kill_between_training_and_saving_loses_nothing(scene_png, tiny_model_folder,
                                                          tmp_path, monkeypatch):
    """Training finished, then the process died before the result was written (a kill, or a
    full disk): the same command saves the result from the checkpoint, without training."""
    from conceptlab import result as result_mod

    out = str(tmp_path / "out")
    real_save = result_mod.LearnedConcepts.save
    for failure in (KeyboardInterrupt, OSError(28, "No space left on device")):
        def dying_save(self, folder, failure=failure):
            raise failure
        monkeypatch.setattr(result_mod.LearnedConcepts, "save", dying_save)
        if failure is KeyboardInterrupt:
            assert learn(scene_png, tiny_model_folder, out) == 130
        else:
            assert learn(scene_png, tiny_model_folder, out) == 2
        assert not os.path.exists(os.path.join(out, "concepts.json"))
        monkeypatch.setattr(result_mod.LearnedConcepts, "save", real_save)
    no_training(monkeypatch)
    assert learn(scene_png, tiny_model_folder, out) == 0
    assert os.path.exists(os.path.join(out, "concepts.json"))


def test_a_failed_save_leaves_the_old_result_whole(scene_png, tiny_model_folder, tmp_path,
                                                   monkeypatch):
    """A save that fails half-way over an earlier result leaves the earlier result, which
    still loads; the new one is never mixed into it."""
    from conceptlab import concept_files
    from conceptlab.result import LearnedConcepts

    out = str(tmp_path / "out")
    assert learn(scene_png, tiny_model_folder, out) == 0
    before = json.loads(Path(out, "concepts.json").read_text())
    real = concept_files.write_concepts

    def half(concepts, folder, *a, **k):
        real(concepts, folder, *a, **k)
        raise OSError(28, "No space left on device")   # after most files are written
    monkeypatch.setattr(concept_files, "write_concepts", half)
    assert learn(scene_png, tiny_model_folder, out, "--overwrite", "--seed", "1") == 2
    monkeypatch.undo()
    assert json.loads(Path(out, "concepts.json").read_text()) == before
    LearnedConcepts.load(out)                                   # whole, and loadable
    assert not [f for f in os.listdir(tmp_path) if ".new-" in f or ".old-" in f]


def test_a_part_missing_is_refused(scene_png, tiny_model_folder, tmp_path):
    from conceptlab.result import LearnedConcepts

    out = str(tmp_path / "out")
    assert learn(scene_png, tiny_model_folder, out) == 0
    for part in ("unet", "v1.safetensors", "mask_history.npz"):
        folder = tmp_path / f"without-{part}"
        import shutil

        shutil.copytree(out, folder)
        target = folder / part
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        with pytest.raises(ValueError, match="incomplete"):
            LearnedConcepts.load(folder)


def test_one_run_at_a_time_per_folder(scene_png, tiny_model_folder, tmp_path, capsys):
    out = str(tmp_path / "out")
    with folder_lock(out):                    # another run holds the folder
        assert learn(scene_png, tiny_model_folder, out) == 2
    assert f"process {os.getpid()}" in capsys.readouterr().err
    with folder_lock(out), pytest.raises(FolderBusy), folder_lock(out):
        pass
    assert learn(scene_png, tiny_model_folder, out) == 0     # free again: it runs


def test_replace_folder_switches_whole_and_recovers_from_a_crash(tmp_path):
    folder = tmp_path / "result"
    def writer(text):
        return lambda d: Path(d, "a.txt").write_text(text)

    replace_folder(folder, writer("old"))
    os.mkdir(folder / "checkpoint")
    replace_folder(folder, writer("new"), carry=lambda name: name == "checkpoint")
    assert (folder / "a.txt").read_text() == "new" and (folder / "checkpoint").is_dir()
    # a crash between the two renames: the folder is gone, its backup is beside it
    os.rename(folder, tmp_path / ".result.old-dead")
    recover_folder(folder)
    assert (folder / "a.txt").read_text() == "new"
    with pytest.raises(RuntimeError):          # a write that fails leaves nothing behind
        replace_folder(folder, lambda d: (_ for _ in ()).throw(RuntimeError("boom")))
    assert sorted(os.listdir(tmp_path)) == ["result"]


def test_results_never_go_into_a_model_folder_or_the_bundled_data(tmp_path, capsys,
                                                                  tiny_model_folder,
                                                                  scene_png):
    from conceptlab.concept_files import check_output_folder
    from conceptlab.models import data_dir

    with pytest.raises(ValueError, match="bundled data"):
        check_output_folder(data_dir() / "examples" / "mine")
    with pytest.raises(ValueError, match="model folder"):
        check_output_folder(tiny_model_folder)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert learn(scene_png, tiny_model_folder, str(tmp_path / "notes")) == 2
    assert "other files" in capsys.readouterr().err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    np.testing.assert_equal(sorted(os.listdir(tmp_path / "notes")), ["todo.txt"])


def test_the_model_is_its_weights_not_its_folder_name(scene_png, tmp_path, capsys):
    """Concepts learned on one model are refused by another whose folder has the same name;
    --allow-other-model uses them anyway."""
    from conceptlab.shapes.model import tiny_pipeline

    a, b = tmp_path / "a" / "tiny-ldm", tmp_path / "b" / "tiny-ldm"
    tiny_pipeline(0).save_pretrained(str(a))
    tiny_pipeline(1).save_pretrained(str(b))         # other weights, the same folder name
    out = str(tmp_path / "out")
    assert learn(scene_png, str(a), out) == 0
    gen = ["generate", out, "a photo of [v1]", "-n", "1", "--inference-steps", "1",
           "--out", str(tmp_path / "g"), "--threads", "1"]
    assert main([*gen, "--model", str(b)]) == 2
    assert "weights" in capsys.readouterr().err
    assert main([*gen, "--model", str(b), "--allow-other-model"]) == 0
    assert main([*gen, "--model", str(a)]) == 0


def test_crafted_concepts_folders_are_refused_before_any_work(scene_png, tiny_model_folder,
                                                             tmp_path):
    import shutil

    import torch
    from safetensors.torch import save_file

    from conceptlab.concept_files import ConceptsFileError, load_concepts
    from conceptlab.result import LearnedConcepts
    from conceptlab.unet_delta import UNetChange

    out = tmp_path / "out"
    assert learn(scene_png, tiny_model_folder, str(out)) == 0

    def crafted(name, change):
        folder = tmp_path / name
        shutil.copytree(out, folder)
        side = json.loads((folder / "concepts.json").read_text())
        change(folder, side)
        for f in list(side["files"]):        # a consistent manifest: only the content is crafted
            side["files"][f] = hashlib.sha256((folder / f).read_bytes()).hexdigest()
        (folder / "concepts.json").write_text(json.dumps(side))
        return folder

    def no_base(folder, side):
        side["base_model_fingerprint"] = ""
    with pytest.raises(ConceptsFileError, match="names no base model"):
        load_concepts(crafted("no-base", no_base))

    def huge_row(folder, side):
        save_file({"[v1]": torch.full((1, 32), 1e30)}, str(folder / "v1.safetensors"))
    with pytest.raises(ConceptsFileError, match="far beyond"):
        load_concepts(crafted("huge", huge_row))

    def many_images(folder, side):
        side["learned"]["n_images"] = 10 ** 7
    with pytest.raises(ValueError, match="10000000 images"):
        LearnedConcepts.load(crafted("many", many_images))

    def bomb(folder, side):
        np.savez_compressed(folder / "mask_history.npz", big=np.zeros((600, 1024, 1024), bool))
    with pytest.raises(ValueError, match="decompress"):
        LearnedConcepts.load(crafted("bomb", bomb))

    with pytest.raises(ValueError, match="LoRA rank"):
        UNetChange("lora", {}, {"r": 200000})
    with pytest.raises(ValueError, match="beyond 1e4"):
        UNetChange("full", {"w": torch.full((2,), 1e20)})


def test_outputs_never_replace_model_or_bundled_files(tmp_path, capsys, tiny_model_folder):
    from conceptlab.models import data_dir

    assert main(["sample", "--out", str(data_dir() / "models" / "shapes-ldm"), "-n", "1",
                 "--inference-steps", "1"]) == 2
    assert "bundled data" in capsys.readouterr().err
    assert main(["sample", "--out", tiny_model_folder, "--model", tiny_model_folder, "-n", "1",
                 "--inference-steps", "1"]) == 2
    assert "model folder" in capsys.readouterr().err
    index = os.path.join(tiny_model_folder, "model_index.json")
    before = Path(index).read_text()
    assert main(["evaluate", str(tmp_path), "--json", index]) == 2
    assert Path(index).read_text() == before
