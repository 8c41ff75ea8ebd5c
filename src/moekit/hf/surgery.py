"""Router surgery: replace the routers of a loaded transformers MoE model by moekit routers, fine-tune, write
the result back into the original router classes so that ``model.save_pretrained`` writes a normal checkpoint.

Usage::

    from moekit.hf import surgery

    names = surgery.replace_routers(model, "topk", bias_update="sign", aux_loss=None)   # DeepSeek-V3 style
    for batch in data:
        loss = model(**batch).loss + surgery.aux_loss(model)
        loss.backward(); opt.step(); opt.zero_grad()
        surgery.end_step(model)                  # auxiliary-loss-free bias updates, global-batch counters
    surgery.write_back(model)                   # ValueError with the reason when the class cannot express it
    model.save_pretrained(path)                 # or surgery.save_pretrained(model, path): keeps the surgery

How it works. The sparse MoE blocks are those of :func:`moekit.hf.record.find_moe_blocks`. For each block the
original router (``block.gate`` / ``block.router``) is *probed*: a copy with random weights (and a random
selection bias where it has one) is run on random inputs and compared with moekit's ``topk`` router under the
candidate settings read from its attributes (``norm_topk_prob``, ``routed_scaling_factor``, ``n_group`` /
``num_group``, ``topk_group``, ``e_score_correction_bias``). The settings that reproduce it exactly become the
block's :class:`RouterSpec` (what the class computes), so any class whose router is a softmax or sigmoid
(group-limited, biased, scaled) top-k is handled without a per-class table; anything else raises a
``ValueError`` naming the class. The probe also records the positions of ``(logits, weights, indices)`` in the
returned tuple and their dtypes (OLMoE casts to the input dtype, DeepSeek-V3 returns float32), and the
:class:`RouterAdapter` installed in place of the router returns exactly that, computed by the moekit router.

The adapter holds the moekit router as its submodule ``router`` (parameters ``<block>.gate.router.weight``),
keeps the last call's ``aux_losses`` and ``last_routing``, and keeps the original router outside the module
tree (not trained, not saved) for :func:`write_back`. Routers without a fixed K per token (expert choice in
training, top-any, dense-to-sparse) are converted to ``[T, K_max]`` by padding with expert 0 at weight 0.
Routers that need the token ids (hash) read them from a forward pre-hook on the model.

Known limits: transformers' ``output_router_logits`` collects router outputs by router *class*, so after
surgery the model's own load-balancing loss (``router_aux_loss_coef``) sees no routers; use :func:`aux_loss`.
Momentum/Adam routers (a residual update) and the attention router (attention probabilities) need moekit's own
decoder layer: :func:`replace_routers` refuses them. Models in bfloat16 whose router computes its logits in
the input dtype (OLMoE, Mixtral, Qwen) differ by bfloat16 rounding after surgery, because moekit routers
compute in float32; float32 models and DeepSeek-V3 (float32 router) are exact.

Legend: T tokens, D model width, E experts, K experts per token.
"""
from __future__ import annotations

import copy
import inspect
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .. import routing as _routing
from ..layer import aux_loss as _moekit_aux_loss
from ..layer import end_step as _moekit_end_step
from ..routing.base import Router, Routing, RoutingContext
from .record import find_moe_blocks

__all__ = ["RouterSpec", "RouterAdapter", "replace_routers", "adapters", "aux_loss", "end_step", "can_express",
           "write_back", "restore_routers", "save_pretrained", "written_back", "describe_router", "save_routers",
           "load_routers", "ROUTERS_FILE"]

_SPEC_KEYS = ("score_func", "norm_topk", "scaling_factor", "num_groups", "topk_groups")


@dataclass(frozen=True)
class RouterSpec:
    """What a router computes at inference: token-choice top-k of ``score_func(x W^T)`` (plus the selection
    ``bias`` when ``has_bias``), optionally group-limited, renormalised over the K chosen (``norm_topk``) and
    multiplied by ``scaling_factor``. ``top_k`` experts per token."""

    score_func: str
    norm_topk: bool
    scaling_factor: float
    num_groups: int
    topk_groups: int
    has_bias: bool
    top_k: int

    def describe(self) -> str:
        text = f"{self.score_func} top-{self.top_k}, norm_topk={self.norm_topk}"
        if self.scaling_factor != 1.0:
            text += f", scaling={self.scaling_factor:g}"
        if self.num_groups > 1:
            text += f", groups {self.topk_groups}/{self.num_groups}"
        if self.has_bias:
            text += ", selection bias"
        return text

    def topk_options(self) -> dict:
        return {"score_func": self.score_func, "norm_topk": self.norm_topk, "scaling_factor": self.scaling_factor,
                "num_groups": self.num_groups, "topk_groups": self.topk_groups}


@dataclass(frozen=True)
class _Probe:
    """How the original router returns its result: tuple positions and whether dtypes follow the input."""

    spec: RouterSpec
    positions: tuple[int, int, int]  # (logits, weights, indices)
    length: int
    logits_follow_input: bool
    weights_follow_input: bool


# ------------------------------------------------------------------------------------------------ probing
def _router_outputs(out, num_experts: int):
    """``(positions, length)`` of (logits [T,E], weights [T,K], indices [T,K]) in a router's return value."""
    if not isinstance(out, (tuple, list)) or len(out) < 3:
        raise ValueError("returns only the logits; its block does its own top-k selection, so replacing the "
                         "router module cannot change the routing")
    ints = [i for i, t in enumerate(out) if isinstance(t, torch.Tensor) and not t.is_floating_point()]
    floats = [i for i, t in enumerate(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if len(ints) != 1 or len(floats) < 2:
        raise ValueError(f"returns {len(out)} values, not (logits, weights, indices)")
    idx = ints[0]
    k = out[idx].shape[-1]
    logits = [i for i in floats if out[i].shape[-1] == num_experts]
    weights = [i for i in floats if out[i].shape[-1] == k and i not in logits[:1]]
    if not logits or not weights:
        raise ValueError("returns tensors whose shapes are not logits [T, E] and weights [T, K]")
    return (logits[0], weights[0], idx), len(out)


def _dense(ids_TK: torch.Tensor, w_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.zeros(ids_TK.shape[0], num_experts, dtype=torch.float64).scatter_add_(
        1, ids_TK.long(), w_TK.double())


def _candidates(router: nn.Module, has_bias: bool) -> list[dict]:
    norm = getattr(router, "norm_topk_prob", None)
    norms = [bool(norm)] if norm is not None else [True, False]
    scaling = float(getattr(router, "routed_scaling_factor", 1.0) or 1.0)
    groups = getattr(router, "num_group", None) or getattr(router, "n_group", None) or 1
    topk_groups = getattr(router, "topk_group", None) or groups
    out = []
    for score_func in (("sigmoid", "softmax") if has_bias else ("softmax", "sigmoid")):
        for n in norms:
            out.append(dict(score_func=score_func, norm_topk=n, scaling_factor=scaling, num_groups=int(groups),
                            topk_groups=int(topk_groups)))
            if groups > 1:
                out.append(dict(score_func=score_func, norm_topk=n, scaling_factor=scaling, num_groups=1,
                                topk_groups=1))
    return out


@torch.no_grad()
def describe_router(router: nn.Module) -> _Probe:
    """Probe a transformers router module (see the module docstring); ``ValueError`` when moekit's top-k router
    cannot reproduce it."""
    name = type(router).__name__
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"router class {name} has no weight [E, D]")
    if isinstance(getattr(router, "bias", None), torch.Tensor):
        raise ValueError(f"router class {name} has a linear bias, which moekit routers do not have")
    num_experts, dim = weight.shape
    has_bias = isinstance(getattr(router, "e_score_correction_bias", None), torch.Tensor)
    probe = copy.deepcopy(router).float().eval()
    g = torch.Generator().manual_seed(1234)
    probe.weight.copy_(torch.randn(num_experts, dim, generator=g))
    if has_bias:
        probe.e_score_correction_bias.copy_(torch.randn(num_experts, generator=g) * 0.3)
    x = torch.randn(48, dim, generator=g)
    try:
        out = probe(x)
        positions, length = _router_outputs(out, num_experts)
    except ValueError as err:
        raise ValueError(f"router class {name} {err}") from None
    except Exception as err:  # noqa: BLE001 - a router we cannot call on [T, D] inputs
        raise ValueError(f"router class {name} could not be called on [tokens, dim] inputs: {err}") from None
    logits, weights, indices = (out[i] for i in positions)
    top_k = int(indices.shape[-1])
    target = _dense(indices, weights, num_experts)
    TopK = _routing.get("topk")
    for cand in _candidates(router, has_bias):
        try:
            mk = TopK(dim=dim, num_experts=num_experts, top_k=top_k, aux_loss=None,
                      bias_update="sign" if has_bias else None, **cand).eval()
        except ValueError:
            continue
        mk.weight.copy_(probe.weight)
        if has_bias:
            mk.e_score_correction_bias.copy_(probe.e_score_correction_bias)
        r = mk(x)
        if (torch.allclose(r.logits, logits.float(), atol=1e-5)
                and torch.allclose(_dense(r.topk_ids, r.topk_weights, num_experts), target, atol=1e-5)):
            spec = RouterSpec(has_bias=has_bias, top_k=top_k, **cand)
            break
    else:
        raise ValueError(f"router class {name}: no softmax/sigmoid top-k setting of moekit's topk router "
                         "reproduces its routing (probed on random inputs), so it cannot be replaced")
    # dtype behaviour: call in bfloat16
    low = copy.deepcopy(probe).to(torch.bfloat16)
    if has_bias:
        low.e_score_correction_bias.data = low.e_score_correction_bias.float()
    try:
        out16 = low(x.to(torch.bfloat16))
        follow_l = out16[positions[0]].dtype == torch.bfloat16
        follow_w = out16[positions[1]].dtype == torch.bfloat16
    except Exception:  # noqa: BLE001 - e.g. a router that cannot run in bfloat16 on this device
        follow_l = follow_w = False
    return _Probe(spec, positions, length, follow_l, follow_w)


# ------------------------------------------------------------------------------------------------ adapter
class RouterAdapter(nn.Module):
    """Stands in for a transformers router: ``forward(hidden_states)`` returns what the original class returns
    (``(logits, weights [T, K], indices [T, K])`` in its order and dtypes), computed by ``self.router``."""

    def __init__(self, router: Router, original: nn.Module, probe: _Probe, block_name: str, attr: str,
                 shared: dict):
        super().__init__()
        self.router = router
        self.block_name = block_name
        self.attr = attr
        self.probe = probe
        self.__dict__["original"] = original  # outside the module tree: neither trained nor saved
        self.__dict__["_shared"] = shared
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.last_routing: Routing | None = None
        # [T, K] bool of the last call: True where a variable-k row was padded (expert 0 at weight 0), so that
        # moekit.hf.record drops those slots; None when every token has exactly K experts.
        self.last_padding: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor | None:
        """The moekit router's weight matrix ``[E, D]`` (so :func:`moekit.hf.record.find_moe_blocks` and the
        routing recorder still find the block); None for routers without one (hash)."""
        return getattr(self.router, "weight", None)

    @property
    def hidden_dim(self) -> int:
        return self.router.dim

    @property
    def aux_loss(self) -> torch.Tensor | None:
        return sum(self.aux_losses.values()) if self.aux_losses else None

    @property
    def moekit_router(self) -> Router:
        return self.router

    def extra_repr(self) -> str:
        return f"replaces={type(self.original).__name__}"

    def _context(self, num_tokens: int) -> RoutingContext:
        """Token ids and the padding mask of the model call (read by the model's pre-hook): the mask is the
        call's 2-D ``attention_mask`` (nonzero = a real token) when it covers these tokens, so padding counts
        in no loss or statistic (as transformers' ``load_balancing_loss_func`` given the attention mask)."""
        ids = self._shared.get("input_ids")
        mask = self._shared.get("attention_mask")
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.numel() == num_tokens):
            mask = None
        if isinstance(ids, torch.Tensor) and ids.numel() == num_tokens:
            return RoutingContext(batch_shape=tuple(ids.shape), input_ids=ids,
                                  token_mask=None if mask is None else mask != 0)
        if mask is not None:
            return RoutingContext(batch_shape=tuple(mask.shape), token_mask=mask != 0)
        return RoutingContext()

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        x_TD = hidden_states.reshape(-1, self.router.dim)
        num_tokens = x_TD.shape[0]
        r = self.router(x_TD, self._context(num_tokens))
        self.aux_losses = dict(r.aux_losses)
        self.last_routing = r
        ids_TK, w_TK = r.topk_ids, r.topk_weights
        self.last_padding = None
        if ids_TK is None:  # variable experts per token: pad to K_max with expert 0 at weight 0
            counts_T = torch.bincount(r.token_ids, minlength=num_tokens)
            k_max = max(int(counts_T.max()) if num_tokens else 1, 1)
            order = torch.argsort(r.token_ids, stable=True)
            tok_S = r.token_ids[order]
            start_T = torch.cumsum(counts_T, 0) - counts_T
            slot_S = torch.arange(tok_S.numel(), device=tok_S.device) - start_T[tok_S]
            ids_TK = torch.zeros(num_tokens, k_max, dtype=torch.long, device=x_TD.device)
            w_TK = torch.zeros(num_tokens, k_max, dtype=r.weights.dtype, device=x_TD.device)
            ids_TK = ids_TK.index_put((tok_S, slot_S), r.expert_ids[order])
            w_TK = w_TK.index_put((tok_S, slot_S), r.weights[order])
            self.last_padding = torch.arange(k_max, device=x_TD.device)[None, :] >= counts_T[:, None]
        logits = r.logits
        if logits is None:
            logits = torch.zeros(num_tokens, self.router.num_experts, device=x_TD.device)
        p = self.probe
        if p.logits_follow_input:
            logits = logits.to(hidden_states.dtype)
        if p.weights_follow_input:
            w_TK = w_TK.to(hidden_states.dtype)
        out: list = [None] * p.length
        out[p.positions[0]], out[p.positions[1]], out[p.positions[2]] = logits, w_TK, ids_TK
        return tuple(out)


def adapters(model: nn.Module) -> list[RouterAdapter]:
    """The :class:`RouterAdapter` modules inside ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, RouterAdapter)]


def _accepted(cls: type, options: dict) -> dict:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(options)
    return {k: v for k, v in options.items() if k in params}


def replace_routers(model: nn.Module, router: str = "topk", **options) -> list[str]:
    """Replace the router of every sparse MoE block of ``model`` by ``moekit.routing.get(router)``.

    ``dim``, ``num_experts`` and ``top_k`` come from the block (``top_k=`` in ``options`` overrides it); the
    settings that reproduce the original class (score function, ``norm_topk``, scaling, groups) are passed as
    defaults to routers whose constructor accepts them and ``options`` override them. The HF router weight is
    copied into the moekit router's ``weight [E, D]``; DeepSeek-V3's ``e_score_correction_bias`` is copied
    into ``e_score_correction_bias`` when the moekit router has one (``bias_update`` set). For a class with a
    selection bias and no ``bias_update`` in ``options``, top-k routers get ``bias_update="sign"`` with
    ``bias_update_rate=0`` (the checkpoint's bias, frozen; pass a rate to update it) so the routing is unchanged;
    an explicit ``bias_update=None`` drops the bias (a warning when it is non-zero). Returns the names of
    the replaced blocks. ``ValueError`` when the model has no MoE block, a block was already replaced, or a
    router class cannot be reproduced.
    """
    router_cls = _routing.get(router)
    if router_cls.updates_residual or router_cls.needs_attention:
        need = "its residual update" if router_cls.updates_residual else "the preceding attention probabilities"
        raise ValueError(f"replace_routers: router {router!r} needs {need} from moekit's own decoder layer "
                         "(moekit.model), which a transformers model does not provide")
    blocks = find_moe_blocks(model)
    if any(isinstance(b.router, RouterAdapter) for b in blocks) or adapters(model):
        raise ValueError("replace_routers: the model's routers are already replaced; call write_back(model) or "
                         "restore_routers(model) first")
    if not blocks:
        raise ValueError(f"replace_routers: {type(model).__name__} has no sparse MoE blocks (modules with "
                         ".experts and a .gate or .router of weight [experts, dim])")
    probes = {}
    for b in blocks:
        key = (type(b.router), tuple(b.router.weight.shape), _candidates_key(b.router))
        if key not in probes:
            probes[key] = describe_router(b.router)
        b.__dict__["probe"] = probes[key]
    shared: dict = {}
    replaced = []
    for b in blocks:
        probe: _Probe = b.__dict__["probe"]
        num_experts, dim = b.router.weight.shape
        defaults = probe.spec.topk_options()
        if probe.spec.has_bias and "bias_update" not in options:  # keep the checkpoint's bias: frozen unless
            defaults.update(bias_update="sign", bias_update_rate=0.0)  # a bias_update_rate is given
        if "num_groups" in options and "topk_groups" not in options:
            defaults["topk_groups"] = min(defaults["topk_groups"], int(options["num_groups"]))
        kwargs = _accepted(router_cls, defaults)
        kwargs.update(options)
        hf_bias = getattr(b.router, "e_score_correction_bias", None)
        if ("bias_update" in kwargs and kwargs["bias_update"] is None and isinstance(hf_bias, torch.Tensor)
                and bool((hf_bias != 0).any())):
            warnings.warn(f"replace_routers: {b.name}: bias_update=None drops the checkpoint's non-zero "
                          "e_score_correction_bias from expert selection; the routing changes", stacklevel=2)
        top_k = int(kwargs.pop("top_k", probe.spec.top_k))
        mk = router_cls(dim=int(dim), num_experts=int(num_experts), top_k=top_k, **kwargs)
        w = b.router.weight
        with torch.no_grad():
            if isinstance(getattr(mk, "weight", None), torch.Tensor) and tuple(mk.weight.shape) == tuple(w.shape):
                mk.weight.data = w.detach().clone()
            mk_bias = getattr(mk, "e_score_correction_bias", None)
            if isinstance(hf_bias, torch.Tensor) and isinstance(mk_bias, torch.Tensor):
                mk_bias.copy_(hf_bias.to(mk_bias))
        mk.to(device=w.device)
        mk.train(b.router.training)
        attr = "gate" if getattr(b.block, "gate", None) is b.router else "router"
        setattr(b.block, attr, RouterAdapter(mk, b.router, probe, b.name, attr, shared))
        replaced.append(b.name)

    def remember_ids(module, args, kwargs):
        config = getattr(module, "config", None)
        wanted = kwargs.get("output_router_logits")
        if wanted is None:
            wanted = getattr(config, "output_router_logits", False)
        if wanted:
            raise ValueError("output_router_logits=True does not work after moekit.hf.surgery.replace_routers: "
                             "transformers collects router logits by router class, which the moekit routers "
                             "replace; set model.config.output_router_logits = False and add "
                             "moekit.hf.surgery.aux_loss(model) to the loss (moekit.hf.record_routing records "
                             "the logits)")
        ids = kwargs.get("input_ids", args[0] if args else None)
        shared["input_ids"] = ids if isinstance(ids, torch.Tensor) and not ids.is_floating_point() else None
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and isinstance(shared["input_ids"], torch.Tensor) \
                and shared["input_ids"].dim() == 2 and mask.shape[1] > shared["input_ids"].shape[1]:
            mask = mask[:, -shared["input_ids"].shape[1]:]  # cached decoding: the mask covers the past too
        shared["attention_mask"] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    model.__dict__["_moekit_surgery_hook"] = model.register_forward_pre_hook(remember_ids, with_kwargs=True)
    model.__dict__["_moekit_surgery_options"] = {"router": router, "options": dict(options)}
    return replaced


def _candidates_key(router: nn.Module) -> tuple:
    return tuple(getattr(router, a, None) for a in ("norm_topk_prob", "routed_scaling_factor", "num_group",
                                                    "n_group", "topk_group", "top_k"))


# ------------------------------------------------------------------------------------------------ training
# The top-level moekit.aux_loss / moekit.end_step visit every module exposing ``moekit_router``, adapters included.
aux_loss = _moekit_aux_loss
end_step = _moekit_end_step


# ------------------------------------------------------------------------------------------------ write back
def _inference_spec(router: Router) -> tuple[RouterSpec | None, str]:
    """The :class:`RouterSpec` a moekit router computes in eval mode, or None and why it has none."""
    name = getattr(router, "registry_name", type(router).__name__)
    k = router.top_k
    cls = type(router)
    TopK = _routing.get("topk")
    if cls is TopK:
        bias = getattr(router, "e_score_correction_bias", None)
        return RouterSpec(router.score_func, bool(router.norm_topk), router.scaling_factor, router.num_groups,
                          router.topk_groups, bias is not None, k), "its eval routing is plain top-k"
    fallback = {"ssr": ("softmax", True), "expert_choice": ("softmax", False), "sparse_ot": ("softmax", True)}
    if name in fallback or name == "sinkhorn":
        if getattr(router, "eval_routing", "token_choice") != "token_choice":
            return None, (f"{name} with eval_routing={router.eval_routing!r} balances over the batch at inference, "
                          "which no per-token router class computes")
        if name == "sinkhorn":
            gate = router.gate
            score, norm = ("sigmoid", False) if gate == "sigmoid" else ("softmax", gate == "plan")
        else:
            score, norm = fallback[name]
        return (RouterSpec(score, norm, 1.0, 1, 1, False, k),
                f"{name} is a training-time balancing method whose inference fallback is {score} top-{k} "
                f"with norm_topk={norm}")
    why = {
        "hash": "hash routing assigns experts from the token ids by a fixed table, not from a learned gate",
        "mixer": "MixER routing uses a gate with a bias and uniform 1/K weights, which no softmax/sigmoid top-k "
                 "router computes",
        "momentum": "MomentumSMoE changes the residual stream (momentum across layers), not only the router",
        "adam": "AdamSMoE changes the residual stream (moment estimates across layers), not only the router",
        "similarity": "similarity routing mixes the scores of different tokens before selection",
        "attention": "attention routing mixes the scores of different tokens through attention",
        "top_any": "top-any routing gives each token a variable number of experts",
        "dts": "dense-to-sparse routing gives each token a variable number of experts",
        "activation_dts": "dense-to-sparse routing gives each token a variable number of experts",
        "moduleformer": "ModuleFormer routing has its own gate, not a plain top-k of x W^T",
    }.get(name, f"{name} routing is not a plain softmax/sigmoid top-k of x W^T at inference")
    return None, why


def can_express(original, moekit_router: Router) -> tuple[bool, str]:
    """Whether the transformers router ``original`` (a router module, a :class:`RouterAdapter`, or a
    :class:`RouterSpec`) can compute what ``moekit_router`` computes at inference, and why (or why not)."""
    if isinstance(original, RouterAdapter):
        original = original.original
    if isinstance(original, RouterSpec):
        spec, cls_name = original, "the original router class"
    elif isinstance(original, type):
        raise ValueError("can_express needs a router module (its settings come from the model config), not a class")
    else:
        cls_name = type(original).__name__
        try:
            spec = describe_router(original).spec
        except ValueError as err:
            return False, str(err)
    mine, why = _inference_spec(moekit_router)
    if mine is None:
        return False, f"{cls_name} cannot express it: {why}"
    if not isinstance(getattr(moekit_router, "weight", None), torch.Tensor) or \
            tuple(moekit_router.weight.shape) != (moekit_router.num_experts, moekit_router.dim):
        return False, f"{cls_name} cannot express it: the moekit router has no weight matrix [E, D]"
    if mine.has_bias and not spec.has_bias:
        bias = moekit_router.e_score_correction_bias
        if bool((bias != 0).any()):
            return False, (f"{cls_name} has no selection bias (e_score_correction_bias) to hold the trained "
                           "auxiliary-loss-free bias")
        mine = replace(mine, has_bias=False)
    if spec.has_bias and not mine.has_bias:
        mine = replace(mine, has_bias=True)  # written back as a zero bias
    diffs = [f"{key}: {getattr(mine, key)!r} vs {getattr(spec, key)!r}" for key in _SPEC_KEYS + ("top_k",)
             if getattr(mine, key) != getattr(spec, key)]
    if diffs:
        return False, (f"{cls_name} computes {spec.describe()} (from the model config) but the moekit router "
                       f"computes {mine.describe()} ({'; '.join(diffs)}; moekit vs class)")
    return True, f"{cls_name} computes {spec.describe()}; {why}"


def _check_all(model: nn.Module) -> list[RouterAdapter]:
    found = adapters(model)
    if not found:
        raise ValueError("write_back: the model has no replaced routers (call replace_routers first)")
    problems = []
    for a in found:
        ok, reason = can_express(a.probe.spec, a.router)
        if not ok:
            problems.append(f"{a.block_name}: {reason.replace('the original router class', type(a.original).__name__)}")
    if problems:
        raise ValueError("write_back: cannot write the routers back into their original classes:\n  "
                         + "\n  ".join(problems) + "\nKeep the trained routers beside the checkpoint instead: "
                         "save_routers(model, path) writes them (safetensors), load_routers(model, path) puts "
                         "them back into a freshly loaded model")
    return found


@torch.no_grad()
def _copy_into_original(a: RouterAdapter) -> None:
    orig = a.original
    orig.to(device=a.router.weight.device, dtype=a.router.weight.dtype)  # follow model.to() done after surgery
    orig.weight.data.copy_(a.router.weight.detach().to(orig.weight))
    hf_bias = getattr(orig, "e_score_correction_bias", None)
    if isinstance(hf_bias, torch.Tensor):
        mk_bias = getattr(a.router, "e_score_correction_bias", None)
        if isinstance(mk_bias, torch.Tensor):
            hf_bias.copy_(mk_bias.to(hf_bias))
        else:
            hf_bias.zero_()
    orig.train(a.training)


def _blocks_of(model: nn.Module, found: list[RouterAdapter]) -> list[tuple[nn.Module, RouterAdapter]]:
    modules = dict(model.named_modules())
    return [(modules[a.block_name] if a.block_name else model, a) for a in found]


def _remove_hook(model: nn.Module) -> None:
    handle = model.__dict__.pop("_moekit_surgery_hook", None)
    if handle is not None:
        handle.remove()


def write_back(model: nn.Module) -> list[str]:
    """Copy every replaced router's trained weight (and selection bias) into its original transformers router
    and put that router back, so ``model.save_pretrained`` writes a normal checkpoint of the original class.

    ``ValueError`` naming each block and the reason when an original class cannot express its moekit router
    (checked for all blocks before anything changes). Returns the names of the restored blocks.
    """
    pairs = _blocks_of(model, _check_all(model))
    for block, a in pairs:
        _copy_into_original(a)
        setattr(block, a.attr, a.original)
    _remove_hook(model)
    return [a.block_name for _, a in pairs]


def restore_routers(model: nn.Module) -> list[str]:
    """Put the original routers back unchanged (their weights as loaded), discarding the moekit routers."""
    pairs = _blocks_of(model, adapters(model))
    for block, a in pairs:
        setattr(block, a.attr, a.original)
    _remove_hook(model)
    return [a.block_name for _, a in pairs]


@contextmanager
def written_back(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model holds its original routers carrying the trained weights; the moekit routers
    are put back on exit (fine-tuning can go on)."""
    pairs = _blocks_of(model, _check_all(model))
    for block, a in pairs:
        _copy_into_original(a)
        setattr(block, a.attr, a.original)
    try:
        yield model
    finally:
        for block, a in pairs:
            setattr(block, a.attr, a)


def save_pretrained(model: nn.Module, save_directory, **kwargs) -> None:
    """``model.save_pretrained`` of the written-back model, keeping the surgery in place afterwards."""
    with written_back(model):
        model.save_pretrained(save_directory, **kwargs)


# ------------------------------------------------------------------------------------------------ save / load
ROUTERS_FILE = "moekit_routers.safetensors"


def _routers_path(path) -> Path:
    path = Path(path)
    return path / ROUTERS_FILE if path.is_dir() or not path.suffix else path


def save_routers(model: nn.Module, path) -> Path:
    """Write the replaced routers of ``model`` (every parameter and buffer of each moekit router: weight matrix,
    trained selection bias, balancing counters) to a safetensors file, for routers that :func:`write_back`
    cannot put into the original classes (e.g. a trained auxiliary-loss-free bias and Qwen3-MoE's router,
    which has no bias). ``path`` is a file, or a folder (such as the ``save_pretrained`` one) that receives
    ``moekit_routers.safetensors``. The router name and the options given to :func:`replace_routers` go into
    the file's metadata (JSON) so :func:`load_routers` can redo the surgery. Returns the file written.
    """
    import json

    from ..io import atomic_save_safetensors

    found = adapters(model)
    if not found:
        raise ValueError("save_routers: the model has no replaced routers (call replace_routers first)")
    setup = model.__dict__.get("_moekit_surgery_options") or {
        "router": getattr(found[0].router, "registry_name", None), "options": {}}
    try:
        options = json.dumps(setup["options"])
    except TypeError:
        raise ValueError(f"save_routers: the replace_routers options {setup['options']!r} are not JSON "
                         "values, so they cannot be recorded") from None
    tensors = {}
    for a in found:
        for key, value in a.router.state_dict().items():
            tensors[f"{a.block_name}.{a.attr}.{key}"] = value
    out = _routers_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "moekit-hf-routers", "version": "1", "router": str(setup["router"]), "options": options,
            "blocks": json.dumps([[a.block_name, a.attr] for a in found])}
    atomic_save_safetensors(out, tensors, meta)
    return out


def load_routers(model: nn.Module, path, **options) -> list[str]:
    """Put routers saved by :func:`save_routers` into ``model`` (a freshly loaded transformers model).

    When ``model`` has no replaced routers yet, :func:`replace_routers` is run first with the router name and
    options recorded in the file (``options`` given here override them). Every tensor must match a router
    parameter or buffer of the same shape; ``ValueError`` naming the mismatch otherwise. Returns the blocks.
    """
    import json

    from safetensors import safe_open

    from ..io import load_safetensors

    file = _routers_path(path)
    tensors = load_safetensors(file, "router file")
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "moekit-hf-routers":
        raise ValueError(f"router file {file} was not written by moekit.hf.surgery.save_routers")
    if not adapters(model):
        recorded = json.loads(meta.get("options") or "{}")
        replace_routers(model, meta["router"], **{**recorded, **options})
    found = adapters(model)
    names = {getattr(a.router, "registry_name", None) for a in found}
    if names != {meta["router"]}:
        raise ValueError(f"router file {file} holds {meta['router']!r} routers; the model's replaced routers are "
                         f"{', '.join(sorted(map(str, names)))}")
    expected = {}
    for a in found:
        for key, value in a.router.state_dict().items():
            expected[f"{a.block_name}.{a.attr}.{key}"] = (a, key, value)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"router file {file} does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for name, (a, key, own) in expected.items():
        if tuple(tensors[name].shape) != tuple(own.shape):
            raise ValueError(f"router file {file}: {name} has shape {tuple(tensors[name].shape)}, the model's "
                             f"router expects {tuple(own.shape)}")
    for a in found:
        prefix = f"{a.block_name}.{a.attr}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        a.router.load_state_dict(state, strict=True)
    return [a.block_name for a in found]
