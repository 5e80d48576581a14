"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018), compact.

A causal Transformer over a user's item sequence; the hidden state at position t, dotted with an
item's embedding, scores that item as the next one. Trained, as in the paper, with binary
cross-entropy on the true next item against one uniformly sampled negative per position. Written
in the spirit of ``pmixer/SASRec.pytorch`` (pre-LayerNorm blocks, shared input/output item
embeddings, learned positions), not copied from it.

Protocol (DESIGN.md §1.4): the model trains only on the *training* users' sequences
(``history + [target]`` of split ``train``) and scores the evaluated split's candidates from each
user's history. Items are indexed from the training sequences only; any other item (seen only in
an evaluated history or as a candidate) maps to one shared out-of-vocabulary index whose
embedding never receives a positive signal, so such candidates tie with one another and ties
count against the positive in :mod:`mllm_msr.metrics`. Training is seeded and deterministic on
CPU; it does not touch the caller's global torch RNG state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from mllm_msr.baselines.common import (
    scores_table,
    split_candidates,
    split_histories,
    training_sequences,
)

METHOD = "sasrec"
PAD, OOV = 0, 1
"""Reserved item indices: padding (left of short sequences) and out-of-vocabulary items."""


@dataclass
class SASRecConfig:
    hidden: int = 64
    """Item / position embedding and hidden size."""
    num_blocks: int = 2
    num_heads: int = 1
    max_len: int = 50
    """Longest input sequence; older items are dropped. Training pads only to the longest
    training sequence if that is shorter."""
    dropout: float = 0.2
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    l2_emb: float = 0.0
    """L2 penalty on the item embeddings."""
    seed: int = 0
    num_threads: int | None = None
    """torch intra-op threads while training/scoring (None: leave torch's setting)."""

    def __post_init__(self) -> None:
        if self.hidden % self.num_heads:
            raise ValueError("SASRecConfig.hidden must be divisible by num_heads")
        if self.max_len < 1 or self.epochs < 0 or self.batch_size < 1:
            raise ValueError("SASRecConfig: max_len, batch_size >= 1 and epochs >= 0 required")


class FeedForward(nn.Module):
    """Position-wise two-layer MLP with a residual connection."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.Dropout(dropout),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class SASRec(nn.Module):
    """The network: item + position embeddings, ``num_blocks`` causal self-attention blocks."""

    def __init__(self, num_items: int, cfg: SASRecConfig) -> None:
        """``num_items`` counts every index, the reserved PAD and OOV included."""
        super().__init__()
        self.hidden = cfg.hidden
        self.item_emb = nn.Embedding(num_items, cfg.hidden, padding_idx=PAD)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.attn_norms = nn.ModuleList(
            nn.LayerNorm(cfg.hidden, eps=1e-8) for _ in range(cfg.num_blocks)
        )
        self.attns = nn.ModuleList(
            nn.MultiheadAttention(cfg.hidden, cfg.num_heads, dropout=cfg.dropout, batch_first=True)
            for _ in range(cfg.num_blocks)
        )
        self.ffn_norms = nn.ModuleList(
            nn.LayerNorm(cfg.hidden, eps=1e-8) for _ in range(cfg.num_blocks)
        )
        self.ffns = nn.ModuleList(
            FeedForward(cfg.hidden, cfg.dropout) for _ in range(cfg.num_blocks)
        )
        self.last_norm = nn.LayerNorm(cfg.hidden, eps=1e-8)
        for p in self.parameters():  # Xavier on matrices, as the reference implementation does
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()

    def features(self, seqs: torch.Tensor) -> torch.Tensor:
        """Hidden state per position, ``(batch, length, hidden)``, for left-padded ``seqs``."""
        length = seqs.shape[1]
        keep = (seqs != PAD).unsqueeze(-1).float()  # zero the padded positions after each step
        positions = torch.arange(length, device=seqs.device)
        x = self.item_emb(seqs) * math.sqrt(self.hidden) + self.pos_emb(positions)
        x = self.emb_dropout(x) * keep
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=seqs.device), 1)
        for attn_norm, attn, ffn_norm, ffn in zip(
            self.attn_norms, self.attns, self.ffn_norms, self.ffns
        ):
            q = attn_norm(x)
            x = q + attn(q, x, x, attn_mask=causal, need_weights=False)[0]
            x = ffn(ffn_norm(x)) * keep
        return self.last_norm(x)

    def forward(
        self, seqs: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the true next items ``pos`` and sampled negatives ``neg`` per position."""
        h = self.features(seqs)
        return (h * self.item_emb(pos)).sum(-1), (h * self.item_emb(neg)).sum(-1)

    def score(self, seqs: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores ``(batch, n)`` of candidate ``items`` ``(batch, n)`` after each sequence."""
        last = self.features(seqs)[:, -1, :]
        return torch.einsum("bh,bnh->bn", last, self.item_emb(items))


@dataclass
class FittedSASRec:
    """A trained model with its item vocabulary and training losses (mean per epoch)."""

    model: SASRec
    vocab: dict[str, int]
    cfg: SASRecConfig
    length: int
    """Input length the model was trained with (<= cfg.max_len); scoring uses the same, so a
    position embedding means the same thing in training and scoring."""
    losses: list[float] = field(default_factory=list)

    def encode(self, sequences: list[list[str]], length: int) -> np.ndarray:
        """Left-padded index matrix ``(n, length)`` keeping each sequence's last items."""
        out = np.full((len(sequences), length), PAD, dtype=np.int64)
        for row, seq in enumerate(sequences):
            ids = [self.vocab.get(item, OOV) for item in seq[-length:]]
            if ids:
                out[row, length - len(ids) :] = ids
        return out

    @torch.no_grad()
    def score(self, histories: list[list[str]], candidates: list[list[str]]) -> np.ndarray:
        """Score each user's candidate list (all lists equally long) after their history."""
        self.model.eval()
        seqs = torch.from_numpy(self.encode(histories, self.length))
        items = torch.tensor([[self.vocab.get(i, OOV) for i in c] for c in candidates])
        out = [
            self.model.score(seqs[s : s + 512], items[s : s + 512])
            for s in range(0, len(histories), 512)
        ]
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, 0))


def fit_sasrec(sequences: list[list[str]], cfg: SASRecConfig | None = None) -> FittedSASRec:
    """Train SASRec on chronological item sequences (each at least two items long to count)."""
    cfg = cfg or SASRecConfig()
    vocab: dict[str, int] = {}
    for seq in sequences:
        for item in seq:
            vocab.setdefault(item, len(vocab) + 2)  # 0 = PAD, 1 = OOV
    sequences = [s for s in sequences if len(s) >= 2]
    length = min(cfg.max_len, max((len(s) - 1 for s in sequences), default=1))
    with torch.random.fork_rng(devices=[]), _threads(cfg.num_threads):
        torch.manual_seed(cfg.seed)
        model = SASRec(len(vocab) + 2, cfg)
        fitted = FittedSASRec(model, vocab, cfg, length)
        if not sequences:
            return fitted
        full = fitted.encode(sequences, length + 1)
        inputs, positives = full[:, :-1], full[:, 1:]
        rng = np.random.default_rng(cfg.seed)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
        bce = nn.BCEWithLogitsLoss()
        for _ in range(cfg.epochs):
            model.train()
            order = rng.permutation(len(full))
            total, batches = 0.0, 0
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                neg = _sample_negatives(rng, full[idx], len(vocab) + 2)
                seqs, pos = torch.from_numpy(inputs[idx]), torch.from_numpy(positives[idx])
                pos_logit, neg_logit = model(seqs, pos, torch.from_numpy(neg))
                mask = pos != PAD
                loss = bce(pos_logit[mask], torch.ones_like(pos_logit[mask])) + bce(
                    neg_logit[mask], torch.zeros_like(neg_logit[mask])
                )
                if cfg.l2_emb:
                    loss = loss + cfg.l2_emb * model.item_emb.weight.pow(2).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, batches = total + loss.item(), batches + 1
            fitted.losses.append(total / batches)
    return fitted


def sasrec_scores(
    sequences: pa.Table,
    candidates: pa.Table,
    split: str = "test",
    cfg: SASRecConfig | None = None,
) -> pa.Table:
    """Train on the training users' sequences, score the ``split`` candidates → SCORES table."""
    fitted = fit_sasrec(training_sequences(sequences), cfg)
    rows = split_candidates(candidates, split)
    histories = split_histories(sequences, split)
    users = rows["user_id"].to_pylist()
    items = rows["item_id"].to_pylist()
    # Score per user (one forward pass each), then put the scores back in row order.
    by_user: dict[str, list[int]] = {}
    for row, user in enumerate(users):
        by_user.setdefault(user, []).append(row)
    missing = [u for u in by_user if u not in histories]
    if missing:
        raise ValueError(
            f"{len(missing)} candidate user(s) have no {split} sequence, e.g. {missing[:3]}"
        )
    score = np.empty(len(users))
    with _threads(fitted.cfg.num_threads):
        for size in sorted({len(r) for r in by_user.values()}):  # equal-length candidate lists
            group = [u for u, r in by_user.items() if len(r) == size]
            s = fitted.score(
                [histories[u] for u in group], [[items[i] for i in by_user[u]] for u in group]
            )
            for u, user_scores in zip(group, s):
                score[by_user[u]] = user_scores
    return scores_table(rows, score, method=METHOD)


class _threads:
    """Context manager setting torch's intra-op thread count (no-op for None)."""

    def __init__(self, n: int | None) -> None:
        self.n, self.saved = n, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        if self.n:
            torch.set_num_threads(self.saved)


def _sample_negatives(rng: np.random.Generator, seqs: np.ndarray, num_items: int) -> np.ndarray:
    """One uniform negative per position of the next-item targets, avoiding the user's items."""
    neg = rng.integers(2, num_items, size=(seqs.shape[0], seqs.shape[1] - 1))
    for _ in range(10):  # redraw collisions with any item of the user's sequence
        clash = (neg[:, :, None] == seqs[:, None, :]).any(-1)
        if not clash.any():
            break
        neg[clash] = rng.integers(2, num_items, size=int(clash.sum()))
    return neg
