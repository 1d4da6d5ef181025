"""Perplexity on fixed-length windows of held-out text."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import windows


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int  # predicted tokens counted
    windows: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model, tokenizer, text: str | None = None, seq_len: int = 512, max_windows: int | None = None,
               batches: list[torch.Tensor] | None = None, progress: bool = True, desc: str = "perplexity") -> Perplexity:
    """exp(mean NLL) over every token after the first of each window.

    Each window starts with BOS (where the tokenizer has one), so the first text
    token is predicted from BOS and every window is scored the same way.
    """
    if batches is None:
        batches = windows(tokenizer, text, seq_len, max_windows)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids in tqdm(batches, desc=desc, disable=not progress, unit="win"):
        ids = ids.to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        if not torch.isfinite(nll):
            raise FloatingPointError("the model produced NaN/Inf logits; the quantized model is broken")
        total += nll.item()
        count += ids[:, 1:].numel()
    mean = total / count
    return Perplexity(math.exp(mean), mean, count, len(batches), batches[0].shape[1])
