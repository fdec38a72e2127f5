"""nbval hooks for the course notebooks.

stderr (warnings, progress bars, library logging) differs between machines and
library versions, so it is never compared against the stored outputs.
"""


def pytest_collectstart(collector):
    # nbval's IPyNbFile collector carries a tuple of output keys to ignore;
    # stream outputs are compared under their stream name ("stdout"/"stderr").
    path = getattr(collector, "path", None)
    if (
        path is not None
        and path.suffix == ".ipynb"
        and "stderr" not in getattr(collector, "skip_compare", ("stderr",))
    ):
        collector.skip_compare = collector.skip_compare + ("stderr",)
