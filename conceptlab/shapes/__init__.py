"""The shapes world: the course's toy domain and its bundled model.

- :mod:`~conceptlab.shapes.world`: procedural scenes of coloured shapes, captions, exact masks
- :mod:`~conceptlab.shapes.model`: the miniature text-to-image model, built from stock
  diffusers / transformers classes
- :mod:`~conceptlab.shapes.train`: training that model from scratch (``conceptlab train-model``)
- :mod:`~conceptlab.shapes.examples`: the bundled example user images
- :mod:`~conceptlab.shapes.judge`: a small classifier that reads shape, colour and pattern
  (inference only; it is trained by ``benchmarks/train_judge.py``)

Nothing in the method (``conceptlab`` outside this package) depends on it.
"""
