"""Bits per byte, overall and per domain, accumulated over validation batches.

Feed :class:`DomainBits` the per-token cross-entropy in nats (``F.cross_entropy(..., reduction="none")``, with
ignored targets giving 0) and the batch's ``domain_ids`` (``-1`` = not scored); it reports
``sum(nats) / count / ln 2`` overall and per domain.
"""
from __future__ import annotations

import math

import torch


class DomainBits:
    """Running sums of nats and scored-token counts per domain."""

    def __init__(self, domains: list[str]):
        self.domains = list(domains)
        self.nats_O = torch.zeros(len(self.domains), dtype=torch.float64)
        self.count_O = torch.zeros(len(self.domains), dtype=torch.float64)

    def add(self, nats_BL: torch.Tensor, domain_ids_BL: torch.Tensor) -> None:
        scored = domain_ids_BL >= 0
        domain_R = domain_ids_BL[scored].to("cpu", torch.int64)
        nats_R = nats_BL.detach()[scored].to("cpu", torch.float64)
        self.nats_O += torch.bincount(domain_R, weights=nats_R, minlength=len(self.domains))
        self.count_O += torch.bincount(domain_R, minlength=len(self.domains)).to(torch.float64)

    def all_reduce(self, group=None) -> None:
        """Sum the counters over the ranks of ``group`` (torch.distributed)."""
        import torch.distributed as dist

        both = torch.stack([self.nats_O, self.count_O])
        dist.all_reduce(both, group=group)
        self.nats_O, self.count_O = both[0].clone(), both[1].clone()

    @property
    def num_tokens(self) -> int:
        return int(self.count_O.sum())

    def bits_per_byte(self) -> float:
        count = float(self.count_O.sum())
        return float(self.nats_O.sum()) / count / math.log(2) if count else float("nan")

    def per_domain(self) -> dict[str, float]:
        return {name: float(self.nats_O[i] / self.count_O[i]) / math.log(2)
                for i, name in enumerate(self.domains) if self.count_O[i] > 0}
