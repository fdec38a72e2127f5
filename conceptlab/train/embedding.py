"""Training only the concept rows of the text encoder's embedding table.

`trainable_embedding` freezes the text encoder, makes the embedding weight trainable,
zeroes the gradient of every other row (a hook), and
`TrainableEmbedding.restore_frozen_rows` copies the other rows back from a saved copy
after each optimizer step (AdamW's weight decay would shrink them otherwise).
"""

from __future__ import annotations

import torch

from ..tokens import encoder_attrs


class TrainableEmbedding:
    """Makes only the concept rows of the embedding table trainable (see the module doc).

    ``parameter`` is the whole (V, D) table: give it to the optimizer, and call
    `restore_frozen_rows` after every ``optimizer.step()``. `remove` undoes
    the hook and freezes the table again. As a context manager, it restores the frozen
    rows and removes itself on exit.

    Args:
        pipe: the pipeline whose text encoder is frozen.
        token_ids: ids of the concept rows to train.

    Attributes:
        parameter: the whole (V, D) embedding table.
        token_ids: ids of the concept rows.
        row_mask: (V, 1) bool, True on the concept rows.
        saved: the table's values when training started.

    Raises:
        ValueError: a token id is outside the embedding table.
    """

    def __init__(self, pipe, token_ids, text_encoder=None):
        self.pipe = pipe
        self.token_ids = list(token_ids)
        te = pipe.text_encoder if text_encoder is None else text_encoder
        te.requires_grad_(False)
        self.parameter = te.get_input_embeddings().weight
        V = self.parameter.shape[0]
        if max(self.token_ids) >= V:
            raise ValueError(f"token ids {self.token_ids} outside the embedding table ({V} rows)")
        self.row_mask = torch.zeros(V, 1, dtype=torch.bool, device=self.parameter.device)
        self.row_mask[self.token_ids] = True
        self.saved = self.parameter.detach().clone()
        self.parameter.requires_grad_(True)
        mask = self.row_mask

        def hook(grad):
            return grad * mask.to(grad.dtype)

        self._handle = self.parameter.register_hook(hook)

    @torch.no_grad()
    def restore_frozen_rows(self):
        """Copy every non-concept row back from the saved copy (bit-identical)."""
        p = self.parameter
        rows = p[self.token_ids].clone()
        p.copy_(self.saved)
        p[self.token_ids] = rows

    def rows(self) -> torch.Tensor:
        """The live concept rows, in the graph.

        Returns:
            (K, D) rows.
        """
        return self.parameter[self.token_ids]

    def remove(self):
        """Remove the gradient hook and freeze the table again."""
        self._handle.remove()
        self.parameter.requires_grad_(False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore_frozen_rows()
        self.remove()
        return False


class TrainableEmbeddings:
    """:class:`TrainableEmbedding` over every text encoder of a pipeline (SDXL has two):
    a concept's row is its rows in each table, joined.

    Args:
        pipe: the pipeline (its concepts applied).
        token_ids: per text encoder, the ids of the concept rows
            (:func:`conceptlab.tokens.token_ids_per_encoder`).

    Attributes:
        tables: one :class:`TrainableEmbedding` per text encoder.
        parameters: the tables' (V, D_j) weights, for the optimizer.
    """

    def __init__(self, pipe, token_ids):
        encoders = [getattr(pipe, te) for _, te in encoder_attrs(pipe)]
        if len(token_ids) != len(encoders):
            raise ValueError(f"{len(token_ids)} id lists for {len(encoders)} text encoders")
        self.tables = [TrainableEmbedding(pipe, ids, te) for ids, te in zip(token_ids, encoders)]
        self.parameters = [t.parameter for t in self.tables]
        self.token_ids = [t.token_ids for t in self.tables]

    def rows(self) -> torch.Tensor:
        """(K, D) live concept rows, the tables' rows joined, in the graph."""
        return torch.cat([t.rows() for t in self.tables], dim=1)

    def restore_frozen_rows(self):
        for t in self.tables:
            t.restore_frozen_rows()

    def remove(self):
        for t in self.tables:
            t.remove()

    def split(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """(K, D) joined rows -> one (K, D_j) block per table."""
        widths = [p.shape[1] for p in self.parameters]
        return list(torch.split(rows, widths, dim=1))


def trainable_embedding(pipe, token_ids) -> TrainableEmbedding:
    """Freeze the text encoder except the rows ``token_ids`` (see `TrainableEmbedding`).

    Args:
        pipe: the pipeline.
        token_ids: ids of the concept rows to train.

    Returns:
        The `TrainableEmbedding`.

    Raises:
        ValueError: a token id is outside the embedding table.
    """
    return TrainableEmbedding(pipe, token_ids)


__all__ = ["TrainableEmbedding", "TrainableEmbeddings", "trainable_embedding"]
