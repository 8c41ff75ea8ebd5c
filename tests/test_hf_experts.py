"""``experts_implementation="moekit"`` against transformers' eager experts on a tiny model of every MoE class.

The classes are discovered (``moekit.hf.discover``), not listed: every experts class of the installed
transformers wrapped by ``use_experts_implementation``. For each, a tiny random float32 model is built from its
config's defaults; logits and the gradients of all parameters (loss = sum(logits * fixed random weights)) must
match eager within 1e-5 relative error (``max|a - b| / max|b|``).
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moekit.hf  # noqa: E402,F401  (registers "moekit")
from moekit.hf.discover import find_experts_classes, tiny_config  # noqa: E402

RTOL = 1e-5
BATCH, SEQ = 2, 8
MAX_PARAMS = 10_000_000

# Classes a generic tiny config cannot build, with the reason.
SKIPS: dict[str, str] = {
    "DeepseekOcr2TextExperts": "only reachable through DeepseekOcr2Model, whose vision/projector config needs "
                               "fields a generic shrink leaves None",
    "DiffusionGemmaTextExperts": "only reachable through DiffusionGemmaModel (multimodal); its text config's MoE "
                                 "sizes default to None inside the nested text_config",
    "Dots3NoteExperts": "its sliding-attention layers read their own nested head/lora sizes, which a generic "
                        "shrink misses (38M parameters)",
    "Ernie4_5_VLMoeMoeExperts": "only reachable through the multimodal Ernie4_5_VLMoeModel (vision tower not shrunk)",
    "Qwen3OmniMoeTalkerTextExperts": "the talker text model has no auto mapping (only the thinker is reachable) "
                                     "and the full Qwen3OmniMoe model needs the talker's nested sizes",
    "Qwen4ExpTextExperts": "text config leaves several attention sizes None (None // None in the model)",
}
# Fields a generic shrink cannot guess (defaults of None the model needs), per experts class.
CONFIG_EXTRAS: dict[str, dict] = {
    "Lfm2MoeExperts": {"layer_types": ["conv", "full_attention"]},
    "Qwen4ExpTextExperts": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16},
    "Gemma4TextExperts": {"num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 16},
    "Glm4vMoeTextExperts": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]}},
}

ENTRIES = {e.name: e for e in find_experts_classes()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _randomise_hash_tables(model) -> None:
    """Hash-routing tables (token id -> expert ids) are zero at init, which routes every token to expert 0 twice
    and makes the router gradient exactly zero (pure rounding noise); give them random experts instead."""
    gen = torch.Generator().manual_seed(5)
    for name, buf in model.named_buffers():
        if name.endswith("tid2eid"):
            num_experts = model.config.get_text_config().num_local_experts
            buf.copy_(torch.randint(0, num_experts, buf.shape, generator=gen))


def _contains(model, experts_cls) -> bool:
    return any(isinstance(m, experts_cls) for m in model.modules())


def build_tiny(entry, seed: int = 0):
    """A tiny float32 model (eval mode: no dropout / jitter) containing ``entry.experts_cls``."""
    errors = []
    for _model_type, config_cls, model_cls in entry.candidates:
        try:
            config = tiny_config(config_cls, **CONFIG_EXTRAS.get(entry.name, {}))
            config._experts_implementation = "eager"
            with torch.device("meta"):
                num_params = sum(p.numel() for p in model_cls(config).parameters())
            if num_params > MAX_PARAMS:
                raise ValueError(f"tiny config still has {num_params} parameters")
            torch.manual_seed(seed)
            model = model_cls(config).float().eval()
            _randomise_hash_tables(model)
        except Exception as exc:  # try the next candidate
            errors.append(f"{model_cls.__name__}: {type(exc).__name__}: {exc}"[:300])
            continue
        if _contains(model, entry.experts_cls):
            return model
        errors.append(f"{model_cls.__name__}: has no {entry.name}")
    raise RuntimeError("; ".join(errors) or "no model class")


def _double_eager(model):
    """A float64 copy of ``model`` running eager experts (the reference for ill-conditioned gradients)."""
    model64 = copy.deepcopy(model).double()
    model64.set_experts_implementation("eager")
    return model64


def _output(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _run(model, input_ids, weight):
    """Output (logits, or last hidden state of base models) and the gradients of every trainable parameter for
    ``sum(output * weight)``."""
    model.zero_grad(set_to_none=True)
    out = _output(model(input_ids=input_ids, use_cache=False))
    (out.float() * weight).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def check_parity(entry):
    """Eager vs moekit on a tiny model of ``entry``: outputs and all parameter gradients."""
    model = build_tiny(entry)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 64, (BATCH, SEQ), generator=gen)
    hits = []
    hooks = [m.register_forward_hook(lambda *args: hits.append(1))
             for m in model.modules() if isinstance(m, entry.experts_cls)]
    with torch.no_grad():
        shape = _output(model(input_ids=input_ids, use_cache=False)).shape
    weight = torch.randn(shape, generator=gen)
    model.set_experts_implementation("eager")
    ref_out, ref_grads = _run(model, input_ids, weight)
    assert hits, f"{entry.name} never ran"
    model.set_experts_implementation("moekit")
    impls = {m.config._experts_implementation for m in model.modules() if isinstance(m, entry.experts_cls)}
    assert impls == {"moekit"}, impls
    out, grads = _run(model, input_ids, weight)
    for hook in hooks:
        hook.remove()
    assert rel_err(out, ref_out) < RTOL, f"output rel err {rel_err(out, ref_out):.2e}"
    assert grads.keys() == ref_grads.keys()
    bad = {n: rel_err(grads[n], ref_grads[n]) for n in ref_grads if rel_err(grads[n], ref_grads[n]) >= RTOL}
    if bad:
        # Some models amplify float32 rounding in parameters far from the experts (e.g. DeepSeek-V4's
        # hyper-connection scales): there transformers' own float32 implementations (eager included) are 1e-5 to
        # 1e-4 away from a float64 run. For those parameters check exactness in float64 (moekit vs eager within
        # 1e-10) and that moekit's float32 error stays within 10x of the worst of eager / grouped_mm / batched_mm.
        model64 = _double_eager(model)
        _, truth = _run(model64, input_ids, weight.double())
        model64.set_experts_implementation("moekit")
        _, grads64 = _run(model64, input_ids, weight.double())
        floor = {n: rel_err(ref_grads[n].double(), truth[n]) for n in bad}
        for impl in ("grouped_mm", "batched_mm"):
            model.set_experts_implementation(impl)
            _, other = _run(model, input_ids, weight)
            for n in bad:
                floor[n] = max(floor[n], rel_err(other[n].double(), truth[n]))
        bad = {n: (rel_err(grads64[n], truth[n]), rel_err(grads[n].double(), truth[n]), floor[n]) for n in bad
               if rel_err(grads64[n], truth[n]) >= 1e-10
               or rel_err(grads[n].double(), truth[n]) >= max(RTOL, 10 * floor[n])}
    assert not bad, f"gradients differ (float64 rel err, float32 rel err, float32 floor): {bad}"
    return model


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_moekit_matches_eager(name):
    if name in SKIPS:
        pytest.skip(SKIPS[name])
    check_parity(ENTRIES[name])


def test_discovery_covers_core_classes():
    names = set(ENTRIES)
    for required in ("OlmoeExperts", "MixtralExperts", "Qwen3MoeExperts", "DeepseekV3Experts", "GptOssExperts",
                     "NemotronHExperts"):
        assert required in names
    assert ENTRIES["GptOssExperts"].flags["is_concatenated"] is False
    assert ENTRIES["NemotronHExperts"].flags["has_gate"] is False
    assert len(SKIPS) < 0.25 * len(ENTRIES)


def test_register_is_idempotent():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from moekit.hf import moekit_experts_forward, register

    register()
    register()
    assert ALL_EXPERTS_FUNCTIONS["moekit"] is moekit_experts_forward


def test_from_pretrained_olmoe(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny(ENTRIES["OlmoeExperts"])
    model.save_pretrained(tmp_path)
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager", dtype=torch.float32)
    fused = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moekit", dtype=torch.float32)
    assert fused.config._experts_implementation == "moekit"
    gen = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, 64, (BATCH, SEQ), generator=gen)
    weight = torch.randn(BATCH, SEQ, eager.config.vocab_size, generator=gen)
    ref_logits, ref_grads = _run(eager.eval(), input_ids, weight)
    logits, grads = _run(fused.eval(), input_ids, weight)
    assert rel_err(logits, ref_logits) < RTOL
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        assert rel_err(grads[n], ref_grads[n]) < RTOL, n


def test_sentinel_ids_are_dropped():
    """Expert-parallel sentinels (ids >= num_experts) contribute nothing, like eager's skip of ``num_experts``."""
    from moekit.hf import moekit_experts_forward

    model = build_tiny(ENTRIES["OlmoeExperts"])
    experts = next(m for m in model.modules() if isinstance(m, ENTRIES["OlmoeExperts"].experts_cls))
    num_experts = experts.num_experts
    gen = torch.Generator().manual_seed(4)
    x_TD = torch.randn(6, experts.gate_up_proj.shape[-1], generator=gen)
    idx_TK = torch.randint(0, num_experts, (6, 2), generator=gen)
    w_TK = torch.rand(6, 2, generator=gen)
    idx_sentinel = idx_TK.clone()
    idx_sentinel[::2, 1] = num_experts
    w_dropped = w_TK.clone()
    w_dropped[::2, 1] = 0.0
    out = moekit_experts_forward(experts, x_TD, idx_sentinel, w_TK)
    ref = moekit_experts_forward(experts, x_TD, idx_TK, w_dropped)
    assert rel_err(out, ref) < RTOL


# ---------------------------------------------------------------------------------------------------------------
# Every decorator variant on a synthetic experts module, float64, against transformers' eager-equivalent reference
# ---------------------------------------------------------------------------------------------------------------


class _TinyConfig:
    _experts_implementation = "eager"


def _make_experts(is_concatenated=True, is_transposed=False, has_bias=False, has_gate=True,
                  has_post_expert_norm=False, custom_gate=False, act=None):
    """A decorated experts module (E=4, D=8, F=6) with the requested flags, float64, random weights."""
    from torch import nn
    from transformers.integrations.moe import use_experts_implementation

    num_experts, dim, hidden = 4, 8, 6

    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = num_experts
            up = (2 if has_gate else 1) * hidden
            shape_up = (num_experts, dim, up) if is_transposed else (num_experts, up, dim)
            shape_down = (num_experts, hidden, dim) if is_transposed else (num_experts, dim, hidden)
            name = "gate_up_proj" if has_gate else "up_proj"
            setattr(self, name, nn.Parameter(torch.randn(shape_up, dtype=torch.float64) * 0.5))
            self.down_proj = nn.Parameter(torch.randn(shape_down, dtype=torch.float64) * 0.5)
            if has_bias:
                setattr(self, name + "_bias", nn.Parameter(torch.randn(num_experts, up, dtype=torch.float64)))
                self.down_proj_bias = nn.Parameter(torch.randn(num_experts, dim, dtype=torch.float64))
            self.act_fn = act if act is not None else nn.SiLU()
            if has_post_expert_norm:
                self.post_expert_norm = nn.LayerNorm(dim, dtype=torch.float64)

        def forward(self, hidden_states, top_k_index, top_k_weights):  # eager reference, per pair
            out = torch.zeros_like(hidden_states)
            w_up = self.gate_up_proj if has_gate else self.up_proj
            b_up = (self.gate_up_proj_bias if has_gate else self.up_proj_bias) if has_bias else None
            for t in range(hidden_states.shape[0]):
                for k in range(top_k_index.shape[1]):
                    e = int(top_k_index[t, k])
                    if e >= self.num_experts:
                        continue
                    x = hidden_states[t]
                    h = x @ w_up[e] if is_transposed else w_up[e] @ x
                    if b_up is not None:
                        h = h + b_up[e]
                    a = self._apply_gate(h[None])[0] if has_gate else self.act_fn(h)
                    y = a @ self.down_proj[e] if is_transposed else self.down_proj[e] @ a
                    if has_bias:
                        y = y + self.down_proj_bias[e]
                    if has_post_expert_norm:
                        y = self.post_expert_norm(y)
                    out[t] = out[t] + top_k_weights[t, k] * y
            return out

        if custom_gate:
            def _apply_gate(self, gate_up):  # GPT-OSS style: interleaved or concatenated, clamped, alpha-sigmoid
                if is_concatenated:
                    gate, up = gate_up.chunk(2, dim=-1)
                else:
                    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
                gate = gate.clamp(max=0.7)
                up = up.clamp(min=-0.7, max=0.7)
                return (up + 1) * gate * torch.sigmoid(gate * 1.702)

    cls = use_experts_implementation(Experts, is_concatenated=is_concatenated, is_transposed=is_transposed,
                                     has_bias=has_bias, has_gate=has_gate, has_post_expert_norm=has_post_expert_norm)
    torch.manual_seed(0)
    return cls(_TinyConfig()).double()


def _xielu():
    from transformers.activations import ACT2CLS

    return ACT2CLS["xielu"]() if "xielu" in ACT2CLS else torch.nn.GELU()


VARIANTS = {
    "default": {},
    "transposed": {"is_transposed": True},
    "bias": {"has_bias": True},
    "interleaved-custom-gate-transposed-bias": {"is_concatenated": False, "custom_gate": True,
                                                 "is_transposed": True, "has_bias": True},
    "concatenated-custom-gate": {"custom_gate": True},
    "no-gate-relu2": {"has_gate": False, "act": "relu2"},
    "no-gate-gelu-bias": {"has_gate": False, "act": "gelu", "has_bias": True},
    "post-expert-norm": {"has_post_expert_norm": True, "has_bias": True},
    "gelu-glu": {"act": "gelu"},
    "activation-with-parameters": {"act": "xielu"},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_matches_reference_float64(variant):
    from torch import nn
    from transformers.activations import ACT2FN

    from moekit.hf import moekit_experts_forward

    flags = dict(VARIANTS[variant])
    act = flags.pop("act", None)
    act_module = {"relu2": ACT2FN["relu2"], "gelu": nn.GELU(), "xielu": _xielu(), None: None}[act]
    experts = _make_experts(act=act_module, **flags)
    gen = torch.Generator().manual_seed(7)
    x_TD = torch.randn(10, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    idx_TK = torch.randint(0, 4, (10, 2), generator=gen)
    idx_TK[3, 1] = 4  # an expert-parallel sentinel
    w_TK = torch.rand(10, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    params = [p for p in experts.parameters()]
    dout_TD = torch.randn(10, 8, dtype=torch.float64, generator=gen)

    ref = experts.forward.__wrapped__(experts, x_TD, idx_TK, w_TK)
    ref_grads = torch.autograd.grad(ref, [x_TD, w_TK, *params], dout_TD, allow_unused=True)
    out = moekit_experts_forward(experts, x_TD, idx_TK, w_TK)
    grads = torch.autograd.grad(out, [x_TD, w_TK, *params], dout_TD, allow_unused=True)
    assert rel_err(out, ref) < 1e-12
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or g.abs().max() == 0
        else:
            assert rel_err(g, r) < 1e-10
