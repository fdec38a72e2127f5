"""The shapes world: the course's toy domain and its bundled model.

- `conceptlab.shapes.world`: procedural scenes of coloured shapes, captions, exact masks
- `conceptlab.shapes.model`: the miniature text-to-image model, built from stock
  diffusers / transformers classes
- `conceptlab.shapes.train`: training that model from scratch (``conceptlab train-model``)
- `conceptlab.shapes.examples`: the bundled example user images
- `conceptlab.shapes.judge`: a small classifier that reads shape, colour and pattern
  (inference only; it is trained by ``tools/train_judge.py``)

Nothing in the method (``conceptlab`` outside this package) depends on it.
"""
