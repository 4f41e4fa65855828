"""Matching Networks: attention over the support set's embeddings, full context embeddings as an option.

Description:
    A query is labelled by attention over the support set (eq. 1 of the paper):
    ``P(y | x̂, S) = sum_i a(x̂, x_i) y_i`` with ``a(x̂, x_i) = softmax_i c(f(x̂), g(x_i))`` (eq. 2), ``c`` the
    cosine similarity and ``y_i`` one-hot.  The logits this learner returns are ``log P(y | x̂, S)``, so the
    outer cross-entropy is the paper's training objective (the log-likelihood of the query's label).  The
    adapted state of a task is its support embeddings and labels: there is no inner loop and nothing to tune
    at test time.

    Without full context embeddings (FCE) ``f = g = f'``, the encoder.  With them (section 2.1.2 and
    appendix A of the paper):

    * ``g(x_i, S) = h→_i + h←_i + g'(x_i)``: a bidirectional LSTM (hidden size D) over the support
      embeddings ``g'(x_i)`` in the support set's order (class-major here), with a skip connection;
    * ``f(x̂, S) = attLSTM(f'(x̂), g(S), K)``: K "read" steps of an LSTM whose state attends over ``g(S)``:
      ``r = sum_i softmax_i(h · g(x_i)) g(x_i)``, ``h, c = LSTM([f'(x̂), r], (h, c))``, ``h = h + f'(x̂)``,
      from ``h = f'(x̂)``, ``c = 0``.  The paper feeds ``r`` beside ``h`` as the LSTM's state; here it is
      fed beside ``f'(x̂)`` as its input, the reading of the public re-implementations (e.g. Chen et al.,
      "A Closer Look at Few-shot Classification", ICLR 2019), which keeps the state D-dimensional.

    The encoder's BatchNorm uses batch statistics (support and query each their own batch), like every
    meta-learner here.  The LSTMs are written with linear layers so that tasks can be vmapped together.
    ICFIL and support CE cannot follow a Matching Network (its prediction is no linear head on one
    network's features); a run refuses them at config time.

References:
    Vinyals, Blundell, Lillicrap, Kavukcuoglu, Wierstra, "Matching Networks for One Shot Learning",
    NeurIPS 2016.

Example:
    >>> from purer.meta.init import random_model
    >>> learner = MatchingNetwork(random_model("conv4", 5, 1, 16, seed=0), config=MatchingConfig(fce=True))
    >>> state = learner.adapt(torch.rand(10, 1, 16, 16), torch.arange(5).repeat_interleave(2), 5)
    >>> learner.predict(state, torch.rand(3, 1, 16, 16)).exp().sum(-1)  # class probabilities
    tensor([1.0000, 1.0000, 1.0000], grad_fn=<SumBackward1>)
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from ..batchnorm import batch_stats_only
from ..data.episodes import TaskBatch
from ..zoo.architectures import Classifier
from .base import InputSpec, MetaLearner


@dataclass
class MatchingConfig:
    """Settings of :class:`MatchingNetwork`.

    Attributes:
        fce: full context embeddings (the bidirectional-LSTM support encoder g and the attention-LSTM query
            encoder f); off: cosine attention over the encoder's embeddings.
        processing_steps: K, the attention LSTM's read steps (FCE only; the paper leaves K open, 5 is ours).
    """

    fce: bool = False
    processing_steps: int = 5

    def __post_init__(self):
        if self.processing_steps < 1:
            raise ValueError(f"processing_steps must be >= 1, got {self.processing_steps}")


class LSTMCell(nn.Module):
    """An LSTM cell of linear layers (``nn.LSTMCell``'s fused kernel has no ``vmap`` rule).

    ``x [B, I]``, ``(h, c)`` each ``[B, H]`` -> new ``(h, c)``; gates in the order input, forget, cell, output.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.ih = nn.Linear(input_size, 4 * hidden_size)
        self.hh = nn.Linear(hidden_size, 4 * hidden_size)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class FullContextEmbeddings(nn.Module):
    """FCE's two encoders over D-dimensional embeddings: :meth:`support` (g) and :meth:`query` (f)."""

    def __init__(self, dim: int, processing_steps: int):
        super().__init__()
        self.forward_cell, self.backward_cell = LSTMCell(dim, dim), LSTMCell(dim, dim)
        self.read_cell = LSTMCell(2 * dim, dim)
        self.processing_steps = processing_steps

    def support(self, g: torch.Tensor) -> torch.Tensor:
        """``g'(S) [M, D]`` -> ``g(S) [M, D] = h→ + h← + g'(S)`` (the bidirectional LSTM over the set, in order)."""
        zero = g.new_zeros(1, g.shape[1])
        outs = []
        for cell, order in ((self.forward_cell, range(len(g))), (self.backward_cell, reversed(range(len(g))))):
            h, c, hs = zero, zero, {}
            for i in order:
                h, c = cell(g[i:i + 1], (h, c))
                hs[i] = h
            outs.append(torch.cat([hs[i] for i in range(len(g))]))
        return outs[0] + outs[1] + g

    def query(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``f'(x̂) [B, D]`` and ``g(S) [M, D]`` -> ``f(x̂, S) [B, D]`` after K attention reads."""
        h, c = f, torch.zeros_like(f)
        for _ in range(self.processing_steps):
            r = torch.softmax(h @ g.T, dim=-1) @ g
            h, c = self.read_cell(torch.cat([f, r], dim=-1), (h, c))
            h = h + f
        return h


def attention_log_probs(query: torch.Tensor, support: torch.Tensor, support_y: torch.Tensor, way: int
                        ) -> torch.Tensor:
    """``log sum_{i: y_i = n} softmax_i cos(query, support_i)``: ``[B, D]``, ``[M, D]``, ``[M]`` -> ``[B, way]``."""
    log_a = torch.log_softmax(F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).T, dim=-1)  # [B, M]
    member = support_y[None, :] == torch.arange(way, device=support_y.device)[:, None]  # [way, M]
    return torch.logsumexp(log_a[:, None, :].masked_fill(~member, float("-inf")), dim=-1)


class MatchingNetwork(MetaLearner, kind="matching"):
    """Matching Networks over a :class:`~purer.zoo.Classifier`'s encoder (its head is not used).

    Args:
        model: the network whose ``encoder`` embeds images (copied).
        input_spec: normalisation and input size (``None``: images fed unchanged).
        config: FCE on or off, and its read steps.

    The adapted state is ``(g(S) [M, D], support labels [M], way)``; :meth:`predict` gives ``log P(y | x̂, S)``.
    """

    def __init__(self, model: Classifier, input_spec: InputSpec | None = None, config: MatchingConfig | None = None):
        super().__init__(input_spec)
        self.encoder = batch_stats_only(copy.deepcopy(model.encoder))
        for p in self.encoder.parameters():
            p.requires_grad_(True)
        self.config = config or MatchingConfig()
        self._build_args = model.build_args
        self.fce = FullContextEmbeddings(model.feature_dim, self.config.processing_steps) if self.config.fce \
            else None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.prepare(x))

    def _support(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.fce is None else self.fce.support(features)

    def _query(self, features: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        return features if self.fce is None else self.fce.query(features, support)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int, *, create_graph: bool = False):
        g = self._support(self.embed(support_x))
        return (g if create_graph else g.detach()), support_y, way

    def predict(self, adapted, x: torch.Tensor) -> torch.Tensor:
        g, support_y, way = adapted
        return attention_log_probs(self._query(self.embed(x), g), g, support_y, way)

    def _query_logits_together(self, batch: TaskBatch) -> torch.Tensor:
        """All tasks at once: the encoder, the FCE and the attention vmapped over tasks."""
        def task(sx: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
            g = self._support(self.encoder(sx))
            return attention_log_probs(self._query(self.encoder(qx), g), g, batch.support_y, batch.way)

        return vmap(task, randomness="different")(self.prepare_tasks(batch.support_x),
                                                   self.prepare_tasks(batch.query_x))

    def _network(self) -> tuple[dict | None, None]:
        return self._build_args, None  # any way: attention over the support set, no head

    def _folder_config(self) -> dict:
        return {"matching": asdict(self.config)}

    @classmethod
    def _from_folder_config(cls, network: Classifier, input_spec: InputSpec | None, config: dict) -> "MatchingNetwork":
        return cls(network, input_spec, MatchingConfig(**config["matching"]))
