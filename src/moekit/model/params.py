"""Parameter counts: total, and active per token (the routed experts count ``top_k / num_experts`` of their
parameters; everything else, embeddings included, counts in full). Tied embeddings count once."""
from __future__ import annotations

from torch import nn

from ..layer import moe_layers


def count_params(model: nn.Module) -> int:
    """Distinct parameters of ``model`` (a tied matrix counts once)."""
    return sum(p.numel() for p in model.parameters())


def _routed_expert_params(layer) -> int:
    return sum(p.numel() for p in layer.experts.parameters())


def count_active_params(model: nn.Module) -> int:
    """Parameters used for one token: total minus the routed experts a token does not visit."""
    inactive = 0.0
    for layer in moe_layers(model):
        cfg = layer.config
        inactive += _routed_expert_params(layer) * (cfg.num_experts - cfg.top_k) / cfg.num_experts
    return count_params(model) - int(round(inactive))


def param_counts(model: nn.Module) -> dict[str, int]:
    """``{"total", "active", "routed_experts", "embedding"}``; ``embedding`` is the input embedding plus an
    untied output head (0 when the model has neither)."""
    embedding = 0
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "embed_tokens"):
        embedding += inner.embed_tokens.weight.numel()
        head = getattr(model, "lm_head", None)
        if head is not None and head.weight is not inner.embed_tokens.weight:
            embedding += head.weight.numel()
    return {
        "total": count_params(model),
        "active": count_active_params(model),
        "routed_experts": sum(_routed_expert_params(layer) for layer in moe_layers(model)),
        "embedding": embedding,
    }
