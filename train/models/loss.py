"""The language models' loss over counted targets: masked data (chat) marks the targets the loss ignores.

A target id of IGNORE_INDEX (-100, F.cross_entropy's default ignore_index) is not counted: the data
loader puts it where a token set's mask says a token is not learned (train/data/chat.py: everything but
the assistant's turns). A loss term is then the mean over its counted targets.

One mean per micro-batch is not the mean of a whole step once micro-batches count different numbers of
targets; so for masked data the trainer sums each term's counted targets over the step's micro-batches
and ranks first (`counted_targets`, one all-reduce) and passes them as `divisors`: each micro-batch's
term is then its token SUM over that divisor, and the step's loss is the mean over every counted target
of the global batch, whatever the split into ranks and micro-batches (train/trainer.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_loss(logits: torch.Tensor, targets: torch.Tensor, divisor: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of logits [..., vocab] against targets [...], IGNORE_INDEX left out: the mean over the
    counted targets, or with `divisor` their sum over it."""
    flat_logits, flat_targets = logits.flatten(0, -2).float(), targets.flatten()
    if divisor is None:
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum") / divisor


def counted_targets(targets: torch.Tensor, terms: int = 1) -> torch.Tensor:
    """The counted targets of each loss term, float64 [terms]: term k predicts targets[:, k:] (k = 0 the
    next token; DeepSeek's MTP depth k the token k further on)."""
    return torch.stack([(targets[:, k:] != IGNORE_INDEX).sum() for k in range(terms)]).double()
