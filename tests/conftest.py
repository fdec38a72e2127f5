"""Test-session setup: quiet, offline, headless and light on CPU.

The environment variables must be set before torch / transformers / diffusers /
matplotlib are imported anywhere, hence at the top of the root conftest.
"""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

try:
    import torch
except ImportError:  # packaging tests do not need torch
    torch = None

if torch is not None:
    torch.set_num_threads(2)


if torch is not None:
    import pytest

    @pytest.fixture(scope="module")
    def one_thread():
        """One torch thread for a module of small problems (no OpenMP oversubscription on
        busy machines); modules opt in with ``pytestmark = usefixtures("one_thread")``."""
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(n)


if torch is not None:

    @pytest.fixture(scope="session")
    def tiny_model_folder(tmp_path_factory):
        """A tiny random-weight model saved as a diffusers folder once per test run, for
        the command line's ``--model FOLDER`` (seconds instead of the bundled model's)."""
        from conceptlab.shapes.model import tiny_pipeline

        folder = tmp_path_factory.mktemp("tiny-model") / "tiny-ldm"
        tiny_pipeline(0).save_pretrained(str(folder))
        return str(folder)
