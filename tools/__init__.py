"""Asset builders (not benchmarks): they write the shipped judge, pattern reader and model.

    python -m tools.train_judge      # data/classifier (the shape/colour judge)
    python -m tools.train_pattern    # data/classifier/pattern.* (pattern reader, identity)
    python -m tools.ship_model RUN   # data/models/NAME (weights, quality.json, model card)

Run them from the repository root (``python -m``), so that ``tools`` and ``benchmarks``
import as packages.
"""
