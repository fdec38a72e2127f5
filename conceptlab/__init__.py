"""conceptlab: multi-concept personalisation of text-to-image diffusion, taught step by step.

The names most notebooks use are importable from the top level::

    from conceptlab import load_pipeline, attention_maps, learn_concepts, generate

Modules, lowest layer first (each imports only from the layers before it; a test checks):
``fileio``, ``models``, ``attention``, ``masks``, ``crf``, ``maps``, ``losses``,
``unet_delta``, ``discovery``, ``tokens``, ``concept_files``, ``train/``, ``estep``, ``result``,
``experimental``, ``em_callbacks``, ``em``, ``generation``, ``many``,
``viz/``, ``shapes/``, ``families``, ``cli``. The README has the table.
"""

from ._version import __version__
from .attention import record_attention
from .models import load_pipeline

_LAZY = {  # keep `import conceptlab` light: these load on first use
    "attention_maps": ("maps", "attention_maps"),
    "learn_concepts": ("em", "learn_concepts"),
    "LearnedConcepts": ("result", "LearnedConcepts"),
    "estimate_masks": ("estep", "estimate_masks"),
    "MaskConfig": ("estep", "MaskConfig"),
    "generate": ("generation", "generate"),
    "TrainConfig": ("train", "TrainConfig"),
    "ConceptTokens": ("tokens", "ConceptTokens"),
    "new_concepts": ("tokens", "new_concepts"),
    "load_concepts": ("concept_files", "load_concepts"),
    "save_concepts": ("concept_files", "save_concepts"),
    "GroundTruthIoU": ("em_callbacks", "GroundTruthIoU"),
    "discover_concepts": ("discovery", "discover_concepts"),
    "Discovery": ("discovery", "Discovery"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module 'conceptlab' has no attribute {name!r}")


__all__ = [
    "ConceptTokens",
    "Discovery",
    "GroundTruthIoU",
    "LearnedConcepts",
    "MaskConfig",
    "TrainConfig",
    "__version__",
    "attention_maps",
    "discover_concepts",
    "estimate_masks",
    "generate",
    "learn_concepts",
    "load_concepts",
    "load_pipeline",
    "new_concepts",
    "record_attention",
    "save_concepts",
]
