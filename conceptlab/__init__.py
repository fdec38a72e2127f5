"""conceptlab: multi-concept personalisation of text-to-image diffusion, taught step by step.

The names most notebooks use are importable from the top level::

    from conceptlab import load_pipeline, attention_maps, record_attention
"""

__version__ = "0.1.0"

from .attention import record_attention
from .pipeline import load_pipeline


def __getattr__(name):  # lazy: keep `import conceptlab` light
    if name == "attention_maps":
        from .maps import attention_maps
        return attention_maps
    if name in ("learn_concepts", "Concepts"):
        from . import em
        return getattr(em, name)
    if name == "generate":
        from .generation import generate
        return generate
    raise AttributeError(f"module 'conceptlab' has no attribute {name!r}")


__all__ = [
    "Concepts",
    "__version__",
    "attention_maps",
    "generate",
    "learn_concepts",
    "load_pipeline",
    "record_attention",
]
