"""The M-step: learn one token per concept from images and (fixed) masks.

One step (Break-a-Scene's recipe; ``docs/cheatsheet.md`` has the equations and scales):

1. draw a batch (:mod:`conceptlab.train.data`): images, concept subsets, flips, timesteps,
   noise, all from ONE ``torch.Generator`` seeded with ``config.seed``;
2. prompts ``template.format(joiner.join(tokens of the subset))``, e.g. "a photo of [v2]
   and [v1]"; ``z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps``;
3. the U-Net's prediction under :func:`~conceptlab.attention.record_attention`;
4. ``loss = masked_diffusion_loss + lambda_attn * cross_attention_loss
   (+ norm_penalty * embedding_norm_penalty)`` (:mod:`conceptlab.losses`);
5. AdamW on the concept rows of the embedding table only (phase 1), then
   :meth:`~conceptlab.train.embedding.TrainableEmbedding.restore_frozen_rows`. An optional phase 2
   (``phase2="full"`` or ``"lora"``) then trains the U-Net too, at ``phase2_lr``.

    with ConceptTrainer(pipe, data, tokens, config) as trainer:   # unhooks on exit
        trainer.train(100)              # 100 more steps
        trainer.set_data(new_data)      # EM: new masks; optimizer and history carry on
        trainer.train()                 # to config.total_steps

``train_concepts(pipe, data, tokens, config)`` does all of it in one call. The models run
in eval mode (no dropout); checkpoints (:mod:`conceptlab.train.checkpoint`) resume a run
exactly.

Why one module of about 520 lines (a third of them docstrings): ``ConceptTrainer`` is one
object with one step; its parts that stand alone live beside it (``data``, ``embedding``,
``history``, ``checkpoint``, ``precision``); what remains is the step, the phase switch,
the run's bookkeeping and undoing every change to the pipeline.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import torch

from ..attention import layer_resolutions, record_attention
from ..losses import (
    concept_attention_maps,
    cross_attention_loss,
    embedding_norm_penalty,
    masked_diffusion_loss,
)
from ..maps import default_attention_config
from ..models import conditioning, encode_pixels, prompt_ids
from ..parallel import average_gradients, average_scalars, is_main, shard, world
from ..tokens import (
    ConceptTokens,
    encoder_attrs,
    model_fingerprint,
    token_ids_per_encoder,
    vocabulary_mean_norm,
)
from ..unet_delta import (
    UNetChange,
    lora_applied,
    lora_config,
    lora_state_dict,
    requires_grad_kept,
    weights_swapped,
)
from . import checkpoint as _ckpt
from .config import TrainConfig
from .data import Sample, as_data, assemble, draw_samples, full_size_masks, token_positions
from .embedding import TrainableEmbeddings
from .history import TrainingHistory
from .precision import MasterWeights

SCALARS = ("loss", "diffusion", "attention", "norm_penalty")


def default_attention_layers(pipe) -> list[str]:
    """Layers whose attention the loss uses: :func:`conceptlab.maps.default_attention_config`."""
    return list(default_attention_config(pipe)["layers"])


def diffusion_target(scheduler, z0, noise, t):
    """What the U-Net predicts: eps, v (SD 2.x) or x0, by the scheduler's prediction type."""
    pt = scheduler.config.prediction_type
    if pt == "epsilon":
        return noise
    if pt == "v_prediction":
        return scheduler.get_velocity(z0, noise, t)
    if pt == "sample":
        return z0
    raise ValueError(f"unsupported prediction_type {pt!r}")


@contextlib.contextmanager
def _checkpointing_on(unet):
    """The U-Net's gradient checkpointing on for the block, then as it was."""
    was = bool(getattr(unet, "is_gradient_checkpointing", False))
    unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if not was:
            unet.disable_gradient_checkpointing()


class ConceptTrainer:
    """Learns the rows of ``concepts`` in ``pipe`` from ``data`` (see the module doc).

    ``train(n)`` runs n more steps (default: to ``config.total_steps``) and returns the
    :class:`TrainingHistory`; ``step()`` runs one; ``set_data`` swaps in new masks (EM);
    ``evaluate`` gives the losses on a fixed set of (t, noise); ``close`` (or leaving the
    ``with`` block) unhooks the pipeline. ``callback(trainer, logs)`` runs after every
    step; returning True stops.
    """

    def __init__(self, pipe, data, concepts: ConceptTokens, config: TrainConfig | None = None,
                 *, progress: bool = True, history_every: int = 1,
                 attention_every: int | None = None, checkpoint_dir=None, resume: bool = True,
                 callback=None):
        self.pipe, self.concepts, self.callback = pipe, concepts, callback
        self.config = config or TrainConfig.for_model(pipe)
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(self.config).__name__}")
        self.progress = progress
        self.history_every = max(1, int(history_every))
        total = self.config.total_steps
        self.attention_every = (max(1, total // 8) if attention_every is None
                                else int(attention_every))
        self.checkpoint_dir = None if checkpoint_dir is None else str(checkpoint_dir)
        self.device = pipe.device
        self._check_model()
        self.model_id = model_fingerprint(pipe)   # before any token is applied
        # everything this trainer changes in the pipeline is undone by close()
        self._undo = contextlib.ExitStack()
        self.token_ids = self._undo.enter_context(concepts.applied(pipe))
        self.encoders = [getattr(pipe, te) for _, te in encoder_attrs(pipe)]  # SDXL: two
        for m in (pipe.unet, pipe.vae, *self.encoders):
            self._undo.enter_context(requires_grad_kept(m))
        self.vocab_norm = vocabulary_mean_norm(pipe, self.token_ids)
        from diffusers import DDPMScheduler
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        pipe.unet.requires_grad_(False)
        pipe.vae.requires_grad_(False)
        pipe.unet.eval()
        for te in self.encoders:
            te.eval()
        self.embedding = TrainableEmbeddings(pipe, token_ids_per_encoder(pipe, concepts.names))
        if self.config.gradient_checkpointing:
            self._undo.enter_context(_checkpointing_on(pipe.unet))
        self._latent_cache: dict = {}
        self.set_data(data)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.step_count, self.phase = 0, 1
        self._attn_share = 1.0  # this process's weight of the attention loss (parallel)
        self.optimizer = self._make_optimizer()
        self.history = TrainingHistory(names=list(concepts.names), vocab_norm=self.vocab_norm,
                                       config=self.config.to_dict())
        self._acc: dict = {}
        self.masters = MasterWeights(self.encoders, self.device.type)  # fp16 pipelines
        self._closed = False
        if self.checkpoint_dir and resume and os.path.exists(self.checkpoint_path):
            self.load_checkpoint(self.checkpoint_path)

    def _check_model(self):
        n_train = self.pipe.scheduler.config.num_train_timesteps
        if self.config.t_range[1] > n_train:
            raise ValueError(f"t_range {self.config.t_range} exceeds the scheduler's "
                             f"{n_train} training timesteps")
        self.layers = list(self.config.attn_layers or default_attention_layers(self.pipe))
        res = layer_resolutions(self.pipe.unet)
        unknown = [n for n in self.layers if n not in res]
        if unknown:
            raise ValueError(f"unknown attention layers {unknown}; this U-Net has {list(res)}")
        self.max_res = max(res[n] for n in self.layers)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ------------------------------------------------------------------ data
    def set_data(self, data):
        """Use new images / masks (e.g. masks re-estimated by the E-step). Latents of images
        seen before are reused."""
        data = as_data(data)
        K = len(self.concepts)
        sizes = {d.size for d in data}
        if len(sizes) != 1:
            raise ValueError(f"all images must have the same size, got {sorted(sizes)}")
        H, W = sizes.pop()
        f = getattr(self.pipe, "vae_scale_factor", 8)
        if H % f or W % f:
            raise ValueError(f"image size {H}x{W} must be a multiple of the VAE factor {f}")
        for i, d in enumerate(data):
            bad = [c for c in d.concept_ids if not 0 <= c < K]
            if bad:
                raise ValueError(f"image {i}: concept ids {bad} outside 0..{K - 1} "
                                 f"({K} concept tokens {self.concepts.names})")
        self.data = data
        self.image_size = (H, W)
        self.latents = [self._encode(d.image) for d in data]  # each (2, C, h, w)
        self.masks = full_size_masks(data, (H, W))
        self.row_of = [{c: j for j, c in enumerate(d.concept_ids)} for d in data]

    @torch.no_grad()
    def _encode(self, image: np.ndarray) -> torch.Tensor:
        """(2, C, h, w): the latents of the image and of its mirror image."""
        key = (image.shape, hash(image.tobytes()))
        if key not in self._latent_cache:
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
            self._latent_cache[key] = encode_pixels(self.pipe.vae,
                                                    torch.cat([x, x.flip(-1)])).float()
        return self._latent_cache[key]

    def _sample(self) -> tuple[list[Sample], torch.Tensor]:
        c = self.config
        samples = draw_samples(self.generator, self.data, c.batch_size, c.t_range, c.flip)
        noise = torch.randn((c.batch_size, *self.latents[0].shape[1:]), generator=self.generator)
        return samples, noise

    def prompts(self, samples) -> list[str]:
        c = self.config
        return [self.concepts.prompt(s.subset, c.template, c.joiner) for s in samples]

    # ------------------------------------------------------------------ optimisation
    def _trainable(self) -> list:
        params = list(self.embedding.parameters)
        if self.phase == 2:
            params += [p for p in self.pipe.unet.parameters() if p.requires_grad]
        return params

    def _make_optimizer(self):
        c = self.config
        if self.phase == 1:
            groups = [{"params": list(self.embedding.parameters), "lr": c.lr}]
        else:
            n = len(self.embedding.parameters)
            groups = [{"params": list(self.embedding.parameters), "lr": c.phase2_lr},
                      {"params": self._trainable()[n:], "lr": c.phase2_lr}]
        if c.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ImportError("optimizer='adamw8bit' needs bitsandbytes: pip install "
                                  "conceptlab[gpu] (a CUDA optimizer), or use 'adamw'") from None
            return bnb.optim.AdamW8bit(groups, weight_decay=c.weight_decay)
        return torch.optim.AdamW(groups, weight_decay=c.weight_decay)

    def start_phase2(self):
        """Make the U-Net (or LoRA adapters on it) trainable too; a new optimizer. The
        U-Net trains on copies of its weights (or on added adapters): close() restores it."""
        c, unet = self.config, self.pipe.unet
        if c.phase2 == "full":
            self._undo.enter_context(weights_swapped(unet))
            unet.requires_grad_(True)
        else:
            with torch.random.fork_rng(devices=[]):  # LoRA init draws from the global RNG
                torch.manual_seed(c.seed)
                self._undo.enter_context(lora_applied(unet, lora_config(c.lora_rank)))
            for n, p in unet.named_parameters():
                p.requires_grad_("lora_" in n)
        self.phase = 2
        if self.history.phase2_start is None:
            self.history.phase2_start = self.step_count
        self.optimizer = self._make_optimizer()

    def live(self, p: torch.Tensor) -> torch.Tensor:
        """The value training works on (:meth:`MasterWeights.live`)."""
        return self.masters.live(p)

    def _recording(self):
        """The attention recording of one step (``nullcontext`` without an attention loss)."""
        if self.config.lambda_attn <= 0:
            return contextlib.nullcontext()
        return record_attention(self.pipe.unet, keep_graph=True, layers=self.layers,
                                max_resolution=self.max_res)

    def losses(self, samples, noise, *, with_graph: bool = True, store=None) -> dict:
        """The loss terms of one batch of samples and their noise (B, C, h, w). ``store``:
        an open :meth:`_recording` to record into (default: one opened for this call)."""
        c, unet = self.config, self.pipe.unet
        b = assemble(samples, noise, self.latents, self.masks, self.row_of,
                     self.pipe.tokenizer, self.concepts, self.token_ids, c)
        zt = self.noise_scheduler.add_noise(b.z0, b.noise, b.t)
        target = diffusion_target(self.noise_scheduler, b.z0, b.noise, b.t)
        zero = torch.zeros((), device=b.z0.device)
        with torch.set_grad_enabled(with_graph):
            cond = conditioning(self.pipe, b.prompts, ids=b.ids).unet_kwargs(dtype=unet.dtype)
            if c.lambda_attn > 0:
                with (contextlib.nullcontext(store) if store is not None
                      else self._recording()) as recorded:
                    pred = unet(zt.to(unet.dtype), b.t, **cond).sample
                maps = concept_attention_maps(recorded, b.positions, self.layers,
                                              resolution=c.attn_resolution)
                l_attn = cross_attention_loss(maps, b.masks, b.valid, reduction=c.attn_reduction,
                                              target=c.attn_target) * self._attn_share
            else:
                pred, l_attn = unet(zt.to(unet.dtype), b.t, **cond).sample, zero
            l_mask = masked_diffusion_loss(pred, target, b.masks.to(pred.device),
                                           normalize=c.loss_normalize)
            l_norm = (embedding_norm_penalty(self.embedding.rows(), self.vocab_norm)
                      if c.norm_penalty > 0 else zero)
            total = l_mask + c.lambda_attn * l_attn + c.norm_penalty * l_norm
        return {"loss": total, "diffusion": l_mask, "attention": l_attn, "norm_penalty": l_norm,
                "prompts": b.prompts}

    def step(self, samples=None, noise=None) -> dict:
        """One optimisation step; returns its logs (floats). By default the batch is drawn
        from the training generator; pass ``samples, noise`` (e.g. from
        :meth:`evaluation_set`) to take a step on a fixed batch instead ("overfit one
        batch"; such steps do not draw from the generator)."""
        c = self.config
        if self.phase == 1 and c.phase2 != "none" and self.step_count >= c.steps:
            self.start_phase2()
        self._attn_share = 1.0
        if samples is None:  # under several processes, each takes its share of the batch
            samples, noise = self._sample()
            pairs = sum(len(s.subset) for s in samples)
            samples, noise = shard(samples, len(samples)), shard(noise, len(samples))
            if c.attn_reduction == "mean" and world()[1] > 1:
                # the loss averages over the (sample, concept) pairs: the shards' means,
                # averaged, make the whole batch's mean when weighted by their pair counts
                self._attn_share = sum(len(s.subset) for s in samples) * world()[1] / pairs
        elif noise is None:
            raise ValueError("pass noise together with samples")
        # the recording processors stay in place through backward(): with gradient
        # checkpointing, the U-Net's blocks run again there and must take the same path
        with self.masters.step(self._trainable()), self._recording() as store:
            out = self.losses(samples, noise, store=store)
            if store is not None:
                store.active = False   # the recomputation in backward() stores nothing
            self.optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            average_gradients(self._trainable())   # no-op in one process
            if c.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self._trainable(), c.grad_clip)
            self.optimizer.step()
            self.embedding.restore_frozen_rows()
        self.step_count += 1
        logs = average_scalars({k: float(out[k].detach()) for k in SCALARS})
        logs.update(step=self.step_count, phase=self.phase, prompt=out["prompts"][0],
                    timesteps=[s.t for s in samples])
        return logs

    def _record(self, logs):
        acc = self._acc
        for k in SCALARS:
            acc[k] = acc.get(k, 0.0) + logs[k]
        acc["n"] = acc.get("n", 0) + 1
        acc.setdefault("prompt", logs["prompt"])
        if self.step_count % self.history_every == 0 or self.step_count == self.config.total_steps:
            h, n = self.history, acc["n"]
            h.steps.append(self.step_count)
            for k in SCALARS:
                getattr(h, k).append(acc[k] / n)
            norms = self.embedding.rows().detach().float().norm(dim=1)
            h.embedding_norms.append([round(float(v), 5) for v in norms])
            h.prompts.append(acc["prompt"])
            self._acc = {}

    # ------------------------------------------------------------------ looking at it
    @torch.no_grad()
    def attention_snapshot(self, t: int | None = None) -> np.ndarray:
        """(K, h, w) attention of each concept token, from the first image that shows it,
        prompted with all concepts of that image, at a fixed t (default 300, clipped to
        ``t_range``) and fixed noise. Does not touch the training generator."""
        c, K = self.config, len(self.concepts)
        lo, hi = c.t_range
        t = min(max(300 if t is None else t, lo), hi - 1)
        first = {}
        for i, d in enumerate(self.data):
            for k in d.concept_ids:
                first.setdefault(k, i)
        images = sorted(set(first.values()))
        samples = [Sample(i, list(self.data[i].concept_ids), False, t) for i in images]
        g = torch.Generator().manual_seed(c.seed + 7919)
        noise = torch.randn((len(samples), *self.latents[0].shape[1:]), generator=g)
        z0 = torch.stack([self.latents[i][0] for i in images])
        tt = torch.full((len(samples),), t, dtype=torch.long, device=z0.device)
        zt = self.noise_scheduler.add_noise(z0, noise.to(z0), tt)
        prompts = self.prompts(samples)
        ids = prompt_ids(self.pipe.tokenizer, prompts)
        positions = token_positions(ids, samples, self.token_ids, self.concepts.names,
                                    prompts, strict=False)
        unet = self.pipe.unet
        cond = conditioning(self.pipe, prompts, ids=ids).unet_kwargs(dtype=unet.dtype)
        with record_attention(unet, layers=self.layers, max_resolution=self.max_res) as store:
            unet(zt.to(unet.dtype), tt, **cond)
        maps = concept_attention_maps(store, positions, self.layers,
                                      resolution=c.attn_resolution).float().cpu()
        out = torch.zeros(K, *maps.shape[-2:])
        for k, i in first.items():
            out[k] = maps[images.index(i), k]
        return out.numpy()

    def _snapshot(self):
        if self.attention_every > 0 and (not self.history.attention_steps
                                         or self.history.attention_steps[-1] != self.step_count):
            self.history.attention_steps.append(self.step_count)
            self.history.attention_maps.append(self.attention_snapshot())

    def evaluation_set(self, n: int = 8, seed: int = 1234, timesteps=None):
        """A FIXED batch ``(samples, noise)``: sample j uses image ``j % N`` with all its
        concepts, no flip, timestep ``timesteps[j]`` (default: n evenly spaced in t_range)
        and noise from ``torch.Generator().manual_seed(seed)``."""
        lo, hi = self.config.t_range
        if timesteps is None:
            timesteps = np.linspace(lo, hi - 1, n).round().astype(int).tolist()
        timesteps = [int(t) for t in timesteps]
        N = len(self.data)
        samples = [Sample(j % N, list(self.data[j % N].concept_ids), False, timesteps[j])
                   for j in range(len(timesteps))]
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(samples), *self.latents[0].shape[1:]), generator=g)
        return samples, noise

    @torch.no_grad()
    def evaluate(self, n: int = 8, seed: int = 1234, timesteps=None) -> dict:
        """Mean losses on :meth:`evaluation_set` (the same set before and after training,
        so the numbers are comparable)."""
        samples, noise = self.evaluation_set(n, seed, timesteps)
        out = self.losses(samples, noise, with_graph=False)
        return {k: float(out[k]) for k in SCALARS}

    # ------------------------------------------------------------------ the loop
    def train(self, steps: int | None = None) -> TrainingHistory:
        """Run ``steps`` more steps (default: up to ``config.total_steps``). Ctrl-C stops
        cleanly: the unfinished step is undone, the state so far is kept (and
        checkpointed if a folder was given), ``history.interrupted`` is set, and the
        history is returned."""
        from tqdm.auto import tqdm

        if self._closed:
            raise RuntimeError("this trainer was closed; build a new one")
        if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 0):
            raise ValueError(f"steps must be a whole number >= 0, got {steps!r}")
        total = self.config.total_steps
        end = total if steps is None else min(total, self.step_count + int(steps))
        every = self.config.checkpoint_every
        bar = tqdm(total=total, initial=self.step_count, disable=not self.progress,
                   desc="concepts")
        self.history.interrupted = False
        if self.step_count == 0:
            self._snapshot()
        g_state = self.generator.get_state()
        try:
            while self.step_count < end:
                g_state = self.generator.get_state()
                logs = self.step()
                g_state = self.generator.get_state()
                self._record(logs)
                if self.attention_every > 0 and (self.step_count % self.attention_every == 0
                                                 or self.step_count == total):
                    self._snapshot()
                bar.update(1)
                if self.step_count % 5 == 0 or self.step_count == end:
                    bar.set_postfix(loss=f"{logs['loss']:.4f}", attn=f"{logs['attention']:.3f}")
                if self.checkpoint_dir and every and self.step_count % every == 0:
                    self.save_checkpoint()
                if self.callback is not None and self.callback(self, logs):
                    break
        except KeyboardInterrupt:
            self.history.interrupted = True
            self.optimizer.zero_grad(set_to_none=True)
            self.embedding.restore_frozen_rows()
            self.generator.set_state(g_state)  # the draws of the unfinished step are undone
        finally:
            bar.close()
        self.concepts.update_from(self.pipe)
        if self.checkpoint_dir:
            self.save_checkpoint()
        return self.history

    def export_unet(self):
        """Put phase 2's U-Net change into ``concepts.unet`` (trained weights or LoRA)."""
        if self.phase != 2:
            return
        unet = self.pipe.unet
        if self.config.phase2 == "full":
            weights = {k: self.live(v).detach().float().cpu().clone()
                       for k, v in unet.named_parameters()}
            self.concepts.unet = UNetChange("full", weights, unet_config=dict(unet.config))
        else:
            self.concepts.unet = UNetChange("lora", lora_state_dict(unet),
                                            lora_config(self.config.lora_rank))

    def close(self):
        """Keep the learned rows (and U-Net change) in ``concepts``; then undo every change
        to the pipeline: its tokenizer, text encoder and U-Net are as before, bit for bit."""
        if self._closed:
            return
        self.embedding.restore_frozen_rows()
        self.embedding.remove()
        self.concepts.update_from(self.pipe)
        self.export_unet()
        self._undo.close()
        self._closed = True

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The whole training state (tensors and plain data): rows, optimizer, step, phase,
        generator, history, and in phase 2 the trained U-Net weights or LoRA weights."""
        unet = self.pipe.unet
        trained = {}
        if self.phase == 2:
            keep = (lambda k: True) if self.config.phase2 == "full" else (lambda k: "lora_" in k)
            trained = {k: self.live(v).detach().cpu().clone()
                       for k, v in unet.named_parameters() if keep(k)}
        return {"step": self.step_count, "phase": self.phase,
                "rows": torch.cat([self.live(p)[ids].detach().float().cpu()
                                   for p, ids in zip(self.embedding.parameters,
                                                     self.embedding.token_ids)], dim=1),
                "optimizer": _ckpt.compact_optimizer_state(self.optimizer.state_dict(),
                                                           self.embedding.token_ids),
                "generator": self.generator.get_state(),
                "history": json.dumps(self.history.to_dict()),
                "unet": trained or None, "pending": dict(self._acc)}

    def load_state_dict(self, state: dict):
        """Continue from :meth:`state_dict` (a trainer built on the same inputs)."""
        if state["phase"] == 2 and self.phase == 1:
            self.start_phase2()
            params = dict(self.pipe.unet.named_parameters())
            for k, v in (state["unet"] or {}).items():
                self.masters.set(params[k], v)
        tables = self.embedding.parameters
        for w, ids, rows in zip(tables, self.embedding.token_ids,
                                self.embedding.split(state["rows"])):
            self.masters.set(w, rows, index=ids)
        self.optimizer.load_state_dict(_ckpt.expand_optimizer_state(state["optimizer"], tables))
        self.generator.set_state(state["generator"])
        self.step_count = int(state["step"])
        self.history = TrainingHistory.from_dict(json.loads(state["history"]))
        self.history.config = self.config.to_dict()
        self._acc = dict(state.get("pending") or {})
        self.concepts.update_from(self.pipe)
        return self

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.checkpoint_dir, _ckpt.CHECKPOINT_FILE)

    def save_checkpoint(self, path: str | None = None) -> str:
        """Write the full training state atomically (:mod:`conceptlab.train.checkpoint`);
        only the main process writes."""
        path = path or self.checkpoint_path
        return _ckpt.save_checkpoint(self, path) if is_main() else path

    def load_checkpoint(self, path: str):
        """Restore a state written by :meth:`save_checkpoint` (same inputs)."""
        return _ckpt.load_checkpoint(self, path)


def train_concepts(pipe, data, concepts: ConceptTokens, config: TrainConfig | None = None, *,
                   progress: bool = True, history_every: int = 1,
                   attention_every: int | None = None, checkpoint_dir=None, resume: bool = True,
                   callback=None) -> TrainingHistory:
    """Learn the concept tokens on fixed masks (see the module doc).

    The pipeline is left as it was.

    Args:
        pipe: a Stable-Diffusion-style pipeline.
        data: a ConceptImage or a list of them (`make_concept_images`).
        concepts: from `conceptlab.tokens.new_concepts`; its ``embeddings`` (and ``unet``
            after a phase 2) hold the result at the end.
        config: the training settings (default: `TrainConfig.for_model`).
        progress: show a progress bar.
        history_every: record the scalars every N steps (averaged over them).
        attention_every: an attention snapshot every N steps (default total/8; 0: none).
        checkpoint_dir: a folder for ``checkpoint.pt`` (every ``config.checkpoint_every``
            steps, at the end and on Ctrl-C).
        resume: continue a checkpoint of the same run found in ``checkpoint_dir``.
        callback: ``callback(trainer, logs)`` after each step; returning True stops.

    Returns:
        TrainingHistory: losses, norms and attention snapshots of the run.
    """
    with ConceptTrainer(pipe, data, concepts, config, progress=progress,
                        history_every=history_every, attention_every=attention_every,
                        checkpoint_dir=checkpoint_dir, resume=resume,
                        callback=callback) as trainer:
        return trainer.train()


__all__ = ["ConceptTrainer", "default_attention_layers", "diffusion_target", "train_concepts"]
