"""Learn the concepts of a whole folder of images: one result folder per image.

    report = learn_many("shapes-ldm", "photos/stars", "outputs/stars", ["star", "background"])
    print(report.summary())          # done / skipped / failed, with the reasons

Each image is a run of ``conceptlab learn`` of its own (:func:`learn_into_folder`, which
``conceptlab learn`` runs too): its result folder ``OUT/<image stem>`` is checked and
locked, the run checkpoints into ``OUT/<stem>/checkpoint``, and the result is written
whole. A folder that already holds a result is skipped; an interrupted one resumes from its
checkpoint; a failure is recorded with its reason and the next image is learned.

Several processes share the images: process ``i`` of ``N`` takes images ``i, i + N, ...``
(``conceptlab learn-many`` under ``accelerate launch --num_processes N``; from Python, pass
``process_index`` and ``num_processes``). Each process learns its images one after another
with the single-process :func:`conceptlab.learn_concepts`, so a result does not depend on
how many processes shared the folder. :meth:`ManyReport.merge` joins the processes'
reports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

#: the image files a folder is searched for (by suffix, any case)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# the reasons a result folder is refused or a run fails that need no type name to read
_PLAIN_ERRORS = (ValueError, TypeError, OSError, RuntimeError, KeyError, ImportError)


def launched_processes():
    """This process's place among those of ``accelerate launch`` (one process without it).

    Returns:
        An ``accelerate.PartialState``: ``process_index``, ``num_processes``,
            ``is_main_process`` and ``device`` (the CPU where there is no CUDA). Its
            processes wait for each other up to a week (the default half hour is shorter
            than a share of a large folder can take).
    """
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(days=7))


def find_images(folder) -> list[str]:
    """The image files directly inside ``folder``, sorted by name.

    Args:
        folder: a folder of images (files ending in one of ``IMAGE_SUFFIXES``; other files,
            hidden files and subfolders are ignored).

    Returns:
        The images' paths.

    Raises:
        FileNotFoundError: ``folder`` is not a folder, or holds no image.
        ValueError: two images have the same stem (``a.png`` and ``a.jpg``): their results
            would share a folder.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a folder: pass a folder of images")
    paths = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                   if not n.startswith(".") and n.lower().endswith(IMAGE_SUFFIXES)
                   and os.path.isfile(os.path.join(folder, n)))
    if not paths:
        raise FileNotFoundError(f"{folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    stems: dict[str, str] = {}
    for p in paths:
        stem = image_stem(p)
        if stem in stems:
            raise ValueError(f"{stems[stem]} and {p} have the same name {stem!r}, so their "
                             "results would share a folder: rename one")
        stems[stem] = p
    return paths


def image_stem(path) -> str:
    """The name of an image's result folder: its file name without the suffix."""
    return os.path.splitext(os.path.basename(os.fspath(path)))[0]


def shard(items: list, process_index: int = 0, num_processes: int = 1) -> list:
    """The items process ``process_index`` of ``num_processes`` takes: ``items[i::N]``.

    Args:
        items: the whole list (in the same order in every process).
        process_index: this process's index, 0 .. num_processes - 1.
        num_processes: the number of processes.

    Returns:
        Every ``num_processes``-th item from the ``process_index``-th on.

    Raises:
        ValueError: an index outside 0 .. num_processes - 1, or fewer than one process.
    """
    if not (isinstance(num_processes, int) and num_processes >= 1):
        raise ValueError(f"num_processes must be an integer >= 1, got {num_processes!r}")
    if not (isinstance(process_index, int) and 0 <= process_index < num_processes):
        raise ValueError(f"process_index must be an integer in [0, {num_processes - 1}], got "
                         f"{process_index!r}")
    return list(items)[process_index::num_processes]


def check_learn_folder(out, resume: bool = False, overwrite: bool = False) -> str:
    """Refuse a result folder before any work, as ``conceptlab learn`` does.

    Args:
        out: the result folder.
        resume: the run must continue one interrupted in ``out`` (CLI ``--resume``).
        overwrite: a result already in ``out`` may be replaced.

    Returns:
        The run's checkpoint folder, ``out/checkpoint``.

    Raises:
        ValueError: ``out`` is inside the bundled data or a model folder, holds other files,
            or already holds a result (without ``overwrite``).
        FileNotFoundError: ``resume`` with no run to resume.
        NotADirectoryError: ``out`` is a file.
    """
    from .concept_files import SIDECAR, check_output_folder

    out = os.fspath(out)
    ckpt = os.path.join(out, "checkpoint")
    check_output_folder(out)
    if resume and not os.path.exists(os.path.join(ckpt, "run.json")):
        raise FileNotFoundError(f"--resume: there is no run to resume in {ckpt}")
    if os.path.exists(os.path.join(out, SIDECAR)) and not overwrite:
        raise ValueError(f"{out} already holds learned concepts: pass --overwrite to "
                         "replace them or choose another --out")
    return ckpt


def fit_to_model(pipe, images: list, names: list) -> tuple[list, list[str]]:
    """Resize images of another size than the model's to its size, saying which.

    Args:
        pipe: the pipeline (its native size: :func:`conceptlab.models.native_size`).
        images: (H, W, 3) uint8 arrays.
        names: a name per image, for the notes.

    Returns:
        images: the images at the model's size.
        notes: one line per resized image.
    """
    from .models import native_size, to_uint8

    size, out, notes = native_size(pipe), [], []
    for name, img in zip(names, images):
        if img.shape[:2] != (size, size):
            notes.append(f"{name} is {img.shape[1]}x{img.shape[0]}; resizing to {size}x{size}")
            img = to_uint8(img, size, resize=True)
        out.append(img)
    return out, notes


def learn_into_folder(pipe, images: list, words: list[str], out, *, method: str = "em",
                      steps: int | None = None, em_every: int | None = None, seed: int = 0,
                      background_threshold: float = 0.3, overwrite: bool = False,
                      progress: bool = True, object_words: str = "top"):
    """One run of ``conceptlab learn``: learn, then save the result into ``out``.

    The run checkpoints into ``out/checkpoint`` (the same call resumes it, or rebuilds a
    finished run's result without training); a complete result is written whole with its
    mask-evolution figure; an interrupted run saves nothing but its checkpoint. Check the
    folder first (:func:`check_learn_folder`) and hold its lock
    (:class:`conceptlab.fileio.folder_lock`) around this call.

    Args:
        pipe: the pipeline (left as it was).
        images: (H, W, 3) uint8 images at the model's size (:func:`fit_to_model`).
        words: one class word per concept (None: discover the concepts).
        out: the result folder.
        method: "em", "fixed" or "none" (:func:`conceptlab.learn_concepts`).
        steps: training steps in all (default: the preset's).
        em_every: steps between E-steps (default: the preset's).
        seed: the run's seed.
        background_threshold: the E-step's background threshold
            (:meth:`conceptlab.estep.MaskConfig.for_words`).
        overwrite: replace another run's checkpoint in ``out/checkpoint``.
        progress: show a progress bar.
        object_words: without ``words``, what the discovered objects' tokens start from
            (:data:`conceptlab.em.OBJECT_WORDS`).

    Returns:
        LearnedConcepts: the result; ``.complete`` is False when the run was interrupted
            (then nothing was saved to ``out``).
    """
    import matplotlib.pyplot as plt

    from .em import learn_concepts
    from .estep import MaskConfig
    from .parallel import is_main

    out = os.fspath(out)
    mask_config = None                 # the E-step defaults for the tokens' start words
    if background_threshold != MaskConfig.background_threshold:
        if words is None:
            raise ValueError("--background-threshold goes with --concepts: discovered "
                             "concepts use the E-step's defaults for their start words")
        mask_config = MaskConfig.for_words(words, background_threshold=background_threshold)
    concepts = learn_concepts(pipe, images, words, method=method, steps=steps,
                              em_every=em_every, seed=seed, progress=progress,
                              checkpoint_dir=os.path.join(out, "checkpoint"),
                              overwrite=overwrite, mask_config=mask_config,
                              discovery=None if words is not None
                              else {"object_words": object_words})
    if not concepts.complete or not is_main():  # several processes: the main one saves
        return concepts
    concepts.save(out)                 # written whole, then switched in
    fig = concepts.plot_mask_evolution()
    fig.savefig(os.path.join(out, "mask_evolution.png"), dpi=100)
    plt.close(fig)
    return concepts


@dataclass
class ImageOutcome:
    """What became of one image of :func:`learn_many`.

    Attributes:
        image: the image's path.
        out: its result folder.
        status: "done", "skipped", "failed", "interrupted" or "not started" (after an
            interruption).
        detail: why it was skipped or failed, or the notes and warnings of a done run.
    """

    image: str
    out: str
    status: str
    detail: str = ""


@dataclass
class ManyReport:
    """The outcome of :func:`learn_many`, one :class:`ImageOutcome` per image.

    Attributes:
        outcomes: per image, in the order they were taken.
        num_processes: how many processes shared the folder.
    """

    outcomes: list[ImageOutcome] = field(default_factory=list)
    num_processes: int = 1

    def with_status(self, status: str) -> list[ImageOutcome]:
        """The outcomes of one status ("done", "skipped", "failed", ...)."""
        return [o for o in self.outcomes if o.status == status]

    @property
    def failed(self) -> list[ImageOutcome]:
        """The images whose run failed."""
        return self.with_status("failed")

    @property
    def interrupted(self) -> bool:
        """True when a run was interrupted (Ctrl-C): its checkpoint resumes it."""
        return bool(self.with_status("interrupted"))

    @classmethod
    def merge(cls, reports: list[ManyReport]) -> ManyReport:
        """One report of the processes' reports, sorted by image.

        Args:
            reports: the report of each process.

        Returns:
            ManyReport: all their outcomes.
        """
        outcomes = sorted((o for r in reports for o in r.outcomes), key=lambda o: o.image)
        return cls(outcomes, num_processes=max([r.num_processes for r in reports] or [1]))

    def summary(self) -> str:
        """A few lines for a person: the counts, then one line per image."""
        counts = {s: len(self.with_status(s))
                  for s in ("done", "skipped", "failed", "interrupted", "not started")}
        head = ", ".join(f"{n} {s}" for s, n in counts.items() if n or s in
                         ("done", "skipped", "failed"))
        procs = f" in {self.num_processes} processes" if self.num_processes > 1 else ""
        lines = [f"{len(self.outcomes)} images{procs}: {head}"]
        for o in self.outcomes:
            lines.append(f"  {o.status:<11} {image_stem(o.image)}"
                         + (f": {o.detail}" if o.detail else ""))
        return "\n".join(lines)


class _NoModel(Exception):
    """The model could not be loaded (its error is the ``__cause__``)."""


def _reason(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    if isinstance(e, _PLAIN_ERRORS) and msg:
        return msg
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def learn_many(pipe, folder, out, words: list[str], *, process_index: int = 0,
               num_processes: int = 1, method: str = "em", steps: int | None = None,
               em_every: int | None = None, seed: int = 0, background_threshold: float = 0.3,
               overwrite: bool = False, progress: bool = False,
               device: str | None = None) -> ManyReport:
    """Learn the concepts of every image of ``folder``, one result folder per image.

    This process takes images ``process_index, process_index + num_processes, ...`` of
    ``find_images(folder)`` and learns each into ``out/<stem>`` as ``conceptlab learn``
    would (same checks, lock, checkpoint and atomic save; every image with the same
    ``seed``). A folder holding a result is skipped (``overwrite`` learns it again); an
    interrupted run resumes from its checkpoint; a failed one is recorded and the next
    image learned. Ctrl-C stops after saving the current run's checkpoint.

    Args:
        pipe: the pipeline, or a model name / folder for
            :func:`conceptlab.models.load_pipeline` (then loaded only when an image is to be
            learned).
        folder: the folder of images (:func:`find_images`).
        out: the folder of results; ``out/<stem>`` per image.
        words: one class word per concept, the same for every image.
        process_index: this process's index among ``num_processes``.
        num_processes: the number of processes sharing the folder.
        method: "em", "fixed" or "none".
        steps: training steps in all per image (default: the preset's).
        em_every: steps between E-steps (default: the preset's).
        seed: the seed of every image's run.
        background_threshold: the E-step's background threshold.
        overwrite: learn again into folders that hold a result or another run's checkpoint.
        progress: show each run's progress bar.
        device: where ``pipe`` given by name is loaded (default: CUDA when present).

    Returns:
        ManyReport: this process's outcomes (:meth:`ManyReport.merge` joins the processes').

    Raises:
        FileNotFoundError: ``folder`` holds no image.
        ValueError: two images share a stem, ``out`` must not be written (inside the
            bundled data or a model folder), or bad process numbers.
        Exception: the error of loading the model named by ``pipe`` (no image can be
            learned; the results so far are kept).
    """
    from .concept_files import SIDECAR, refuse_bundled_data

    out = refuse_bundled_data(os.fspath(out), "the folder of results")
    mine = shard(find_images(folder), process_index, num_processes)
    report = ManyReport(num_processes=num_processes)
    loaded = {}

    def pipeline():
        if "pipe" not in loaded:
            from .models import load_pipeline

            try:
                loaded["pipe"] = pipe if not isinstance(pipe, (str, os.PathLike)) else \
                    load_pipeline(os.fspath(pipe), device=device, progress=False)
            except Exception as e:
                raise _NoModel() from e
        return loaded["pipe"]

    for k, path in enumerate(mine):
        dest = os.path.join(out, image_stem(path))
        if os.path.exists(os.path.join(dest, SIDECAR)) and not overwrite:
            report.outcomes.append(ImageOutcome(path, dest, "skipped", "already holds learned "
                                                "concepts (--overwrite learns it again)"))
            continue
        try:
            outcome = _learn_one(pipeline, path, dest, words, method=method, steps=steps,
                                 em_every=em_every, seed=seed, overwrite=overwrite,
                                 background_threshold=background_threshold, progress=progress)
        except KeyboardInterrupt:
            outcome = ImageOutcome(path, dest, "interrupted", "its checkpoint resumes it")
        except _NoModel as e:  # the model of every image: no image can be learned
            raise e.__cause__ from None
        except Exception as e:  # noqa: BLE001 - one image's failure must not lose the others
            outcome = ImageOutcome(path, dest, "failed", _reason(e))
        report.outcomes.append(outcome)
        if outcome.status == "interrupted":
            report.outcomes += [ImageOutcome(p, os.path.join(out, image_stem(p)),
                                             "not started") for p in mine[k + 1:]]
            break
    return report


def _learn_one(pipeline, path, dest, words, **learn) -> ImageOutcome:
    """Learn one image into ``dest``, as ``conceptlab learn PATH --out DEST`` would."""
    from .fileio import folder_lock
    from .models import to_uint8
    from .parallel import alone

    image = to_uint8(path)                      # a bad image: before the model load
    check_learn_folder(dest, overwrite=learn["overwrite"])
    with folder_lock(dest):                     # one run at a time into a folder
        pipe = pipeline()
        images, notes = fit_to_model(pipe, [image], [os.path.basename(path)])
        with alone():                           # this image is this process's alone
            concepts = learn_into_folder(pipe, images, words, dest, **learn)
    if not concepts.complete:
        return ImageOutcome(path, dest, "interrupted", "its checkpoint resumes it")
    w = len(concepts.warnings)
    notes += [f"{w} warning{'s' * (w > 1)}, saved with the result"] if w else []
    return ImageOutcome(path, dest, "done", "; ".join(notes))
