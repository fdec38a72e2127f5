"""Recording cross-attention in a diffusers U-Net.

Cross-attention in one layer of the U-Net, for image features ``x`` (N pixels x C) and
text-token embeddings ``c`` (T tokens x D):

    Q = x W_q,  K = c W_k,  V = c W_v            # per head
    P = softmax(Q K^T / sqrt(d), over tokens)    # (N, T): for each pixel, a distribution over words
    out = P V

Column ``P[:, j]`` reshaped to (h, w) is the *attention map* of token ``j``: where in the
image the model reads word ``j``. `record_attention` installs processors that compute
exactly this (through ``unet.set_attn_processor``, the public API), keeps ``P`` for every
cross-attention layer, head and call, and restores the original processors on exit:

    with record_attention(pipe.unet) as store:
        pipe.unet(latents, t, text_embeddings)
    store.maps["up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"][0]
    # -> (batch, heads, h, w, tokens)
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import torch


class AttentionStore:
    """Cross-attention probabilities recorded per layer and per call.

    ``maps[layer]`` is a list (one entry per U-Net call) of tensors shaped
    ``(batch, heads, h, w, tokens)``. Only layers whose map has at most
    ``max_resolution**2`` pixels are stored. With ``keep_graph=False`` maps are detached
    (cheap, for visualisation and mask estimation); with ``keep_graph=True`` they stay in
    the autograd graph (for losses on attention).

    Args:
        max_resolution: largest side length of a stored map; layers with more than
            ``max_resolution**2`` pixels are not stored.
        keep_graph: keep the maps in the autograd graph instead of detaching them.
        layers: names of the layers to store (all cross-attention layers when None).
        latent_shape: (H, W) of the latent, needed to unflatten the maps of non-square
            latents; None for square latents.

    Attributes:
        maps: per layer name, one ``(batch, heads, h, w, tokens)`` tensor per U-Net call.
        active: while False, nothing is stored.
    """

    def __init__(self, max_resolution: int = 32, keep_graph: bool = False,
                 layers: list[str] | None = None, latent_shape: tuple[int, int] | None = None):
        self.max_resolution = max_resolution
        self.keep_graph = keep_graph
        self.layers = None if layers is None else set(layers)
        self.latent_shape = latent_shape
        self.maps: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.active = True

    def wants(self, name: str, n_pixels: int) -> bool:
        """Whether to store the map of layer ``name`` with ``n_pixels`` pixels.

        Args:
            name: the layer's processor name.
            n_pixels: number of pixels of the flattened map.

        Returns:
            True when recording is active, the map has at most ``max_resolution**2`` pixels
                and the layer is among the chosen ``layers`` (or no layers were chosen).
        """
        if not self.active or n_pixels > self.max_resolution**2:
            return False
        return self.layers is None or name in self.layers

    def spatial(self, n_pixels: int) -> tuple[int, int]:
        """(h, w) of a flattened map with ``n_pixels`` pixels.

        Args:
            n_pixels: number of pixels of the flattened map.

        Returns:
            The map's (h, w): a square for ``latent_shape=None``, else the latent's aspect
                ratio.

        Raises:
            ValueError: ``n_pixels`` is not a square number and no ``latent_shape`` was given.
        """
        if self.latent_shape is None:
            side = round(math.sqrt(n_pixels))
            if side * side != n_pixels:
                raise ValueError(
                    f"cannot infer the shape of a {n_pixels}-pixel attention map: pass "
                    "latent_shape=(H, W) for non-square latents")
            return side, side
        H, W = self.latent_shape
        f = math.sqrt(H * W / n_pixels)
        return round(H / f), round(W / f)

    def add(self, name: str, probs: torch.Tensor, batch: int, heads: int):
        """Store the attention probabilities of one call of layer ``name``.

        Args:
            name: the layer's processor name.
            probs: ``(batch * heads, n_pixels, tokens)`` attention probabilities; detached
                unless ``keep_graph``.
            batch: batch size of the call.
            heads: number of attention heads of the layer.

        Raises:
            ValueError: the map's shape cannot be inferred (see `spatial`).
        """
        n, t = probs.shape[-2:]
        h, w = self.spatial(n)
        p = probs if self.keep_graph else probs.detach()
        self.maps[name].append(p.reshape(batch, heads, h, w, t))

    def clear(self):
        """Forget every recorded map."""
        self.maps.clear()

    @property
    def layer_names(self) -> list[str]:
        """Names of the layers recorded so far, in recording order."""
        return list(self.maps)

    def resolution(self, name: str) -> int:
        """Map height of a recorded layer.

        Args:
            name: a recorded layer's name.

        Returns:
            The height ``h`` of the layer's maps (their side length for square latents).
        """
        return self.maps[name][0].shape[2]

    def stacked(self, layers: list[str] | None = None, call: int | None = None,
                resolution: int | None = None) -> torch.Tensor:
        """Head-averaged maps of the chosen layers, resized to one resolution and averaged.

        Args:
            layers: the layers to average (default: every recorded layer); names that were
                not recorded are skipped.
            call: index of one U-Net call, or None to average over all calls.
            resolution: side length (or (h, w)) to resize the maps to; default: the size of
                the largest recorded layer among ``layers``.

        Returns:
            ``(batch, h, w, tokens)`` maps averaged over heads and layers, for one call or
                averaged over all calls.

        Raises:
            KeyError: none of the chosen layers was recorded.
        """
        names = [n for n in (layers or self.layer_names) if n in self.maps]
        if not names:
            raise KeyError(f"no recorded layer among {layers}; recorded: {self.layer_names}")
        if resolution is None:
            big = max(names, key=self.resolution)
            size = tuple(self.maps[big][0].shape[2:4])
        else:
            size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        out = []
        for n in names:
            calls = self.maps[n] if call is None else [self.maps[n][call]]
            m = torch.stack([c.mean(1) for c in calls]).mean(0)  # (B, h, w, T)
            if tuple(m.shape[1:3]) != size:
                m = torch.nn.functional.interpolate(
                    m.permute(0, 3, 1, 2), size=size, mode="bilinear",
                    align_corners=False).permute(0, 2, 3, 1)
            out.append(m)
        return torch.stack(out).mean(0)


class RecordingAttnProcessor:
    """Attention processor that records cross-attention probabilities.

    Computes attention exactly like ``diffusers.models.attention_processor.AttnProcessor``
    and hands cross-attention probabilities to an `AttentionStore`.

    Accepts and ignores the extra positional / keyword arguments newer diffusers versions
    pass to processors. Never modifies the probabilities in place.

    Args:
        store: the store that receives the probabilities.
        name: the processor's layer name, under which the maps are stored.
    """

    def __init__(self, store: AttentionStore, name: str):
        self.store = store
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        """Compute the attention layer's output, storing cross-attention probabilities.

        Args:
            attn: the diffusers ``Attention`` module.
            hidden_states: the image features.
            encoder_hidden_states: the text embeddings (None for self-attention).
            attention_mask: optional attention mask.
            temb: time embedding, used by spatial norms.
            *args: ignored.
            **kwargs: ignored.

        Returns:
            The layer's output hidden states.
        """
        def record(query, probs, batch):
            if encoder_hidden_states is not None and self.store.wants(self.name, probs.shape[1]):
                self.store.add(self.name, probs, batch, attn.heads)

        return plain_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                               on_probs=record)


def plain_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                    temb=None, on_probs=None):
    """One attention layer computed exactly like diffusers' ``AttnProcessor``, with a look
    at its probabilities.

    The recording processors (`RecordingAttnProcessor`, discovery's) share it, so that all
    of them compute the layer the same way.

    Args:
        attn: the diffusers ``Attention`` module.
        hidden_states: the image features.
        encoder_hidden_states: the text embeddings (None for self-attention).
        attention_mask: optional attention mask.
        temb: time embedding, used by spatial norms.
        on_probs: called as ``on_probs(query, probs, batch)`` with the (B*heads, N, d)
            queries and the (B*heads, N, T) probabilities before they are applied; it must
            not change them.

    Returns:
        The layer's output hidden states.
    """
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch, seq, _ = (hidden_states.shape if encoder_hidden_states is None
                     else encoder_hidden_states.shape)
    attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    query = attn.head_to_batch_dim(query)
    key = attn.head_to_batch_dim(key)
    value = attn.head_to_batch_dim(value)
    probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, N, T)
    if on_probs is not None:
        on_probs(query, probs, batch)
    hidden_states = torch.bmm(probs, value)
    hidden_states = attn.batch_to_head_dim(hidden_states)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def cross_attention_layers(unet) -> list[str]:
    """Names of the U-Net's cross-attention processors (``...attn2.processor``).

    Args:
        unet: a diffusers U-Net.

    Returns:
        The processor names, in the U-Net's order.
    """
    return [n for n in unet.attn_processors if n.endswith("attn2.processor")]


def layer_resolutions(unet, sample_size: int | None = None) -> dict[str, int]:
    """Map side length of each cross-attention layer for a latent of ``sample_size``.

    Args:
        unet: a diffusers U-Net.
        sample_size: latent side length (default: ``unet.config.sample_size``; of a pair,
            the smaller side).

    Returns:
        Per cross-attention processor name, the side length of its attention map.
    """
    s = sample_size or unet.config.sample_size
    s = s if isinstance(s, int) else min(s)
    n_down = len(unet.config.block_out_channels) - 1
    out = {}
    for name in cross_attention_layers(unet):
        parts = name.split(".")
        if parts[0] == "down_blocks":
            level = int(parts[1])
        elif parts[0] == "up_blocks":
            level = n_down - int(parts[1])
        else:
            level = n_down
        out[name] = s // 2**level
    return out


@contextlib.contextmanager
def record_attention(unet, *, max_resolution: int = 32, keep_graph: bool = False,
                     layers: list[str] | None = None, latent_shape=None):
    """Context manager: record cross-attention of ``unet`` into an `AttentionStore`.

    Installs `RecordingAttnProcessor` on cross-attention layers through
    ``unet.set_attn_processor`` and restores the original processors on exit, also when
    an exception is raised inside the block. While recording, cross-attention is computed
    by plain attention: custom processors (IP-Adapter, LoRA processors of old diffusers)
    are bypassed inside the block.

    Args:
        unet: a diffusers U-Net.
        max_resolution: largest side length of a stored map.
        keep_graph: keep the maps in the autograd graph (for losses on attention).
        layers: cross-attention layers to record, with or without the ``.processor``
            suffix (default: all of them).
        latent_shape: (H, W) of the latent, needed for non-square latents.

    Yields:
        The `AttentionStore` that fills up while the block runs.

    Raises:
        ValueError: one of ``layers`` is not a cross-attention layer of ``unet``.
    """
    if layers is not None:
        known = cross_attention_layers(unet)
        layers = [n if n.endswith(".processor") else n + ".processor" for n in layers]
        unknown = [n for n in layers if n not in known]
        if unknown:
            raise ValueError(f"not cross-attention layers of this U-Net: {unknown}; "
                             f"choose among {known}")
    store = AttentionStore(max_resolution, keep_graph, layers, latent_shape)
    original = dict(unet.attn_processors)
    new = {name: (RecordingAttnProcessor(store, name) if name.endswith("attn2.processor")
                  else proc) for name, proc in original.items()}
    unet.set_attn_processor(new)
    try:
        yield store
    finally:
        unet.set_attn_processor(original)
