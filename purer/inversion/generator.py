"""A meta-learnt generator as the synthesizer (``inversion.synthesizer: generator``, and by default for a zoo of
colour teachers or of several architectures), beside the pixel bank.

The pixel bank (:class:`~purer.inversion.synthesizer.EpisodeInversion`) optimises every
pseudo image on its own, one Adam step per meta-iteration, so a class's images start as
noise and need many visits of their teacher before they look like anything.  A
generator shares what it learns across classes and teachers: FREE (Wei et al.,
CVPR 2024) meta-learns one generator over the zoo, treating each teacher as a task, and
adapts it to a teacher in a few steps; Fast-Datafree (Fang et al., AAAI 2022) showed
the same idea cutting data-free distillation's synthesis by two orders of magnitude.

Here, per inversion step and sampled teacher ``T`` with bank classes ``c_1..c_n``:

1. **adapt**: a copy ``G_phi`` of the meta-generator ``G_theta`` takes ``steps`` Adam
   steps on ``L_EI(T)`` (the same loss as the pixel bank's: ``CE + a_bn R_bn + a_tv R_tv +
   a_l2 R_l2`` on the augmented images, through ``T``'s own input contract) of the images
   it renders from fresh noise ``z`` and the class embeddings, ``x = G_phi(z, c)``;
2. **write**: the images of the last adaptation step become the bank's images of ``T``'s
   classes (the bank stays the one place pseudo episodes are drawn from);
3. **meta-update** (first order, as FREE's): the gradient of the last adaptation step,
   ``dL_EI / dphi``, summed over the step's teachers (``/ total``), is ``theta``'s gradient
   for one Adam step.

The Gradient Switch's adversarial term ``-lambda_adv * L_outer`` reads a fresh pseudo
task rendered by the meta-generator itself (:class:`RenderedTasks`, differentiable in
``theta``), so it is part of ``theta``'s gradient, and it reaches the bank through the
next adaptations.  Everything is drawn per ``(seed, step, teacher)`` (noise,
augmentations), so a step split over processes is the one-process step: each process
adapts its share of the teachers, and the terms (gradient, images, numbers) are
exchanged and added in teacher order (:meth:`GeneratorInversion.step`).

Defaults are FREE's published ones: 5 adaptation steps, Adam lr 1e-3 with betas
(0.5, 0.999) for both the adaptation and the meta-update.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import numpy as np
import torch
from einops import rearrange
from torch import nn

from ..data.episodes import Episode, TaskSpec, episode_labels
from ..host import to_device
from ..zoo.teacher import Teacher
from .bank import PseudoBank
from .draws import augmentation_draws, keyed_generator
from .synthesizer import STATS, EpisodeInversion, ExtraLoss, GeneratorConfig, InversionConfig

# {term: flat tensor} of this process -> those of every process (see GeneratorInversion.step).
TermSync = Callable[[dict[int, torch.Tensor]], dict[int, torch.Tensor]]
BETAS = (0.5, 0.999)


class ConditionalGenerator(nn.Module):
    """``(z [B, noise_dim], class [B]) -> [B, C, S, S]`` raw tensors in the bank's space (its ``to_images`` makes
    them images): a class embedding beside the noise, projected to a ``S/4`` map, two upsampling
    convolution blocks (BatchNorm on the batch's own statistics, LeakyReLU) and a convolution to ``C``."""

    def __init__(self, num_classes: int, channels: int, image_size: int, width: int, noise_dim: int,
                 embed_dim: int):
        super().__init__()
        self.image_size, self.start = image_size, math.ceil(image_size / 4)
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.project = nn.Linear(noise_dim + embed_dim, 2 * width * self.start ** 2)
        bn = lambda c: nn.BatchNorm2d(c, track_running_stats=False)  # noqa: E731 (no buffers: a copy is its weights)
        self.body = nn.Sequential(
            bn(2 * width), nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), bn(2 * width), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1), bn(width), nn.LeakyReLU(0.2),
            nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, self.embed(classes)], 1)).view(len(z), -1, self.start, self.start)
        out = self.body(h)
        extra = out.shape[-1] - self.image_size  # a side not divisible by 4: the centre of the 4*ceil(S/4) map
        return out[..., extra // 2:extra // 2 + self.image_size, extra // 2:extra // 2 + self.image_size]


class RenderedTasks:
    """Pseudo episodes rendered by the meta-generator (differentiable in its weights), read by the Gradient
    Switch's adversarial term in place of the bank (it only calls :meth:`episode`)."""

    def __init__(self, inversion: GeneratorInversion):
        self.inversion = inversion

    def episode(self, spec: TaskSpec) -> Episode:
        inv, bank = self.inversion, self.inversion.bank
        shot, query = spec.support.shape[1], spec.query.shape[1]
        classes = np.repeat(np.asarray(spec.classes, dtype=np.int64), shot + query)
        images = inv.render(inv.generator, classes, len(inv.teachers))
        x = rearrange(images, "(n p) c h w -> n p c h w", p=shot + query)
        dev = images.device
        return Episode(rearrange(x[:, :shot], "n k c h w -> (n k) c h w"), episode_labels(spec.way, shot, device=dev),
                       rearrange(x[:, shot:], "n q c h w -> (n q) c h w"), episode_labels(spec.way, query, device=dev),
                       tuple(bank.class_names[int(c)] for c in spec.classes))


class GeneratorInversion(EpisodeInversion):
    """Episode inversion by a meta-learnt conditional generator that writes the bank (see the module docstring).

    Same arguments as :class:`EpisodeInversion` (``config.generator`` holds the generator's settings); the
    bank's own optimizer is replaced by the meta-generator's.  Teacher losses, augmentation, teacher sampling,
    groups and input contracts are :class:`EpisodeInversion`'s.
    """

    def __init__(self, teachers: Sequence[Teacher], bank: PseudoBank, config: InversionConfig | None = None,
                 autocast: torch.dtype | None = None):
        super().__init__(teachers, bank, config, autocast)
        g = self.config.generator
        with torch.random.fork_rng(devices=[]):  # the generator's weights from the run's seed, the global RNG untouched
            torch.manual_seed(self.config.seed)
            self.generator = ConditionalGenerator(bank.num_classes, bank.channels, bank.image_size, g.width,
                                                  g.noise_dim, g.embed_dim)
        self.generator.to(self.device)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=g.lr, betas=BETAS)
        self.generator_size = sum(p.numel() for p in self.generator.parameters())

    # ---- rendering -----------------------------------------------------------------------------------------
    def noise(self, key: int, n: int) -> torch.Tensor:
        """``[n, noise_dim]`` standard normal, drawn on the CPU from ``(seed, step, key)`` and copied once."""
        draw = keyed_generator(self.config.seed, 3, self.steps, key)
        z = torch.randn(n, self.config.generator.noise_dim, generator=draw)
        return to_device(z, self.device)

    def render(self, generator: nn.Module, classes: np.ndarray, key: int) -> torch.Tensor:
        """Images ``[len(classes), C, S, S]`` in pixel units of bank classes ``classes`` from fresh noise ``key``."""
        labels = to_device(torch.as_tensor(classes, dtype=torch.long), self.device)
        return self.bank.to_images(generator(self.noise(key, len(classes)), labels))

    def adapt(self, i: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher ``i``'s adaptation: the last step's gradient ``[generator_size]``, the images it rendered
        ``[n_i * P, C, S, S]`` and its ``L_EI`` parts (0-dim tensors, ``loss`` among them)."""
        g, bank = self.config.generator, self.bank
        classes = np.repeat(np.asarray(bank.teacher_classes[i], dtype=np.int64), bank.images_per_class)
        labels = episode_labels(len(bank.teacher_classes[i]), bank.images_per_class, device=self.device)
        fast = copy.deepcopy(self.generator)
        optimizer = torch.optim.Adam(fast.parameters(), lr=g.lr, betas=BETAS)
        params = list(fast.parameters())
        for s in range(g.steps):
            images = self.render(fast, classes, i)
            thetas = augmentation_draws(self.augment, (self.config.seed, 2, s), self.steps, [i], [len(classes)],
                                        self.device)
            loss, parts = self.teacher_losses([i], thetas, {i: (images, labels)})
            grads = torch.autograd.grad(loss[0], params)
            if s < g.steps - 1:
                for p, gr in zip(params, grads):
                    p.grad = gr
                optimizer.step()
        flat = torch.cat([gr.reshape(-1) for gr in grads])
        return flat, images.detach(), {"loss": loss[0].detach(), **{k: v[0] for k, v in parts.items()}}

    # ---- the step ------------------------------------------------------------------------------------------
    def term_size(self, term: int) -> int:
        """Elements of term ``term``'s flat tensor: a teacher's (gradient, images, numbers) or the adversarial
        term's (``term == len(teachers)``: gradient, value)."""
        if term == len(self.teachers):
            return self.generator_size + 1
        b = self.bank
        return self.generator_size + len(b.teacher_classes[term]) * b.images_per_class * b.channels * \
            b.image_size ** 2 + 1 + len(STATS)

    def step(self, extra_loss: ExtraLoss | None = None, teachers: Sequence[int] | None = None,
             total: int | None = None, sync: TermSync | None = None) -> dict[str, torch.Tensor]:
        """One inversion step: adapt to each of this process's teachers, write their classes' images into the
        bank, one Adam step of the meta-generator; arguments and returned numbers as
        :meth:`EpisodeInversion.step` (the numbers are the mean over all the step's teachers).

        ``sync`` gathers every process's terms ``{term: flat tensor}`` (sizes from :meth:`term_size`); the
        terms are added in term order, so the split does not change the step."""
        idx = list(teachers) if teachers is not None else self.sample_teachers()
        total = len(idx) if total is None else total
        if total < 1 or total < len(idx):
            raise ValueError(f"an inversion step needs at least one teacher (total={total}, here {len(idx)})")
        self.bank.pop_touched()
        terms: dict[int, torch.Tensor] = {}
        for i in idx:
            grad, images, parts = self.adapt(i)
            terms[i] = torch.cat([grad / total, images.reshape(-1), parts["loss"].reshape(1),
                                  torch.stack([parts[k] for k in STATS])])
        if extra_loss is not None:
            extra = extra_loss(RenderedTasks(self))
            if not (isinstance(extra, torch.Tensor) and extra.ndim == 0):
                raise ValueError(f"extra_loss must return a 0-dim tensor, got {type(extra).__name__} "
                                 f"{tuple(getattr(extra, 'shape', ()))}")
            grads = torch.autograd.grad(extra, list(self.generator.parameters()), allow_unused=True)
            terms[len(self.teachers)] = torch.cat(
                [(gr if gr is not None else torch.zeros_like(p)).reshape(-1)
                 for gr, p in zip(grads, self.generator.parameters())] + [extra.detach().reshape(1)])
        if sync is not None:
            terms = sync(terms)
        return self._apply(terms, total)

    def _apply(self, terms: dict[int, torch.Tensor], total: int) -> dict[str, torch.Tensor]:
        """Every process's terms -> the bank's new images, the meta-generator's Adam step and the step's numbers."""
        n, bank = self.generator_size, self.bank
        grad, rows, loss = None, [], None
        with torch.no_grad():
            for t in sorted(terms):
                row = terms[t]
                grad = row[:n] if grad is None else grad + row[:n]
                if t == len(self.teachers):
                    continue
                images = row[n:-1 - len(STATS)].view(-1, *bank.image_shape)
                for k, block in zip(bank.teacher_classes[t], images.split(bank.images_per_class)):
                    bank.write(k, block)
                rows.append(row[-len(STATS):])
                loss = row[-1 - len(STATS)] if loss is None else loss + row[-1 - len(STATS)]
            offset = 0
            for p in self.generator.parameters():
                p.grad = grad[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        nan = torch.full((), float("nan"), device=self.device)
        means = torch.stack(rows).mean(0) if rows else nan.expand(len(STATS))
        stats = {k: means[j] for j, k in enumerate(STATS)}
        stats["loss"] = loss / total if loss is not None else nan
        if len(self.teachers) in terms:
            stats["extra"] = terms[len(self.teachers)][-1]
            stats["loss"] = stats["loss"] + stats["extra"]
        return stats

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        super().load_state_dict(state)


def build_synthesizer(teachers: Sequence[Teacher], bank: PseudoBank, config: InversionConfig,
                      autocast: torch.dtype | None = None) -> EpisodeInversion:
    """The synthesizer the config names for these teachers (:meth:`InversionConfig.synthesizer_for`): ``pixels``
    (:class:`EpisodeInversion`) or ``generator``."""
    kind = config.synthesizer_for(t.config for t in teachers)
    cls = GeneratorInversion if kind == "generator" else EpisodeInversion
    return cls(teachers, bank, config, autocast=autocast)
