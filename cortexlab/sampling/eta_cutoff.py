"""Eta sampling: drop tokens below ``min(eta, sqrt(eta) * exp(-H))`` (entropy-adaptive).

Source: Hewitt, Manning & Liang, "Truncation Sampling as Language Model Desmoothing"
(Findings of EMNLP 2022); Hugging Face ``EtaLogitsWarper`` (the top token always stays).
"""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, exp, mask, register
from cortexlab.sampling.facts import derive, entropy, log_normaliser, row_max

import mlx.core as mx


@register("eta_cutoff")
class EtaCutoff:
    """Processor: mask tokens with ``p < min(eta, sqrt(eta)·e^-H)``, never the top token."""

    def is_active(self, params: SamplingParams) -> bool:
        """Random rows with eta_cutoff > 0."""
        return not params.is_greedy and params.eta_cutoff > 0.0

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Masked logits ``[b, V]``."""
        eta = batch.column(lambda p: p.eta_cutoff if self.is_active(p) else 0.0)
        cutoff = mx.minimum(eta, mx.sqrt(eta) * exp(-entropy(batch, logits)))
        log_cutoff = mx.log(cutoff)  # -inf for inactive rows
        threshold = mx.minimum(log_normaliser(batch, logits) + log_cutoff, row_max(batch, logits))
        return derive(batch, logits, mask(logits, logits < threshold), threshold=threshold)
