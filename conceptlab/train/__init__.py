"""Concept learning (the M-step): config, data and batches, the trainer, checkpoints.

    from conceptlab.train import ConceptImage, TrainConfig, train_concepts

- :mod:`~conceptlab.train.config`: :class:`TrainConfig` (frozen, validated, presets)
- :mod:`~conceptlab.train.data`: :class:`ConceptImage`, union sampling -> :class:`Batch`
- :mod:`~conceptlab.train.trainer`: :class:`ConceptTrainer`, :func:`train_concepts`
- :mod:`~conceptlab.train.checkpoint`: exact resume
- :mod:`~conceptlab.train.history`: :class:`TrainingHistory`
"""

from .config import TrainConfig
from .data import Batch, ConceptImage, make_concept_images
from .history import TrainingHistory
from .trainer import ConceptTrainer, default_attention_layers, train_concepts

__all__ = [
    "Batch",
    "ConceptImage",
    "ConceptTrainer",
    "TrainConfig",
    "TrainingHistory",
    "default_attention_layers",
    "make_concept_images",
    "train_concepts",
]
