"""``experts_implementation="moekit"`` against eager on the experts modules ``test_hf_experts`` cannot reach.

``tests/test_hf_experts.py`` compares whole tiny models and skips the classes (its ``SKIPS``) whose model a
generic tiny config cannot build. Here each of those experts modules is built on its own, from a hand-written
tiny config of its own family (the config class its model actually passes it: nested text configs, a talker text
config, a vision per-layer config...), with random parameters, and ``forward(hidden_states, top_k_index,
top_k_weights)`` is compared between transformers' eager loop (the reference) and moekit: the output and the
gradients of ``sum(out * fixed random weights)`` with respect to the hidden states, the routing weights and every
parameter, within 1e-5 relative error (``max|a - b| / max|b|``) in float32.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.hf import moekit_experts_forward  # noqa: E402  (importing moekit.hf registers "moekit")
from moekit.hf.discover import is_decorated_experts  # noqa: E402


def _skips_of_test_hf_experts() -> dict[str, str]:
    """``test_hf_experts.SKIPS``, read from its source: importing that module runs the discovery of every
    transformers model (~8 s), which this file does not need."""
    tree = ast.parse((Path(__file__).parent / "test_hf_experts.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == "SKIPS" for t in targets):
                return ast.literal_eval(node.value)
    raise LookupError("no SKIPS in test_hf_experts.py")


SKIPS = _skips_of_test_hf_experts()
RTOL = 1e-5  # as test_hf_experts

HIDDEN, INTER, NUM_EXPERTS, TOP_K, TOKENS = 32, 16, 6, 2, 40
INIT_STD = 0.02


def _case(label: str, config: str, init: dict | None = None, pick=None, **kwargs) -> dict:
    """One way a family builds an experts module: ``config(**kwargs)``, optionally narrowed by ``pick`` (e.g. a
    per-layer view), then ``experts_cls(config, **init)``."""
    return {"label": label, "config": config, "kwargs": kwargs, "init": init or {}, "pick": pick}


# Per experts class, the config class (and fields) its model really passes it; all other fields keep defaults.
CASES: dict[str, list[dict]] = {
    # DeepseekOcr2TextMoe(config: DeepseekOcr2TextConfig); num_experts -> n_routed_experts (attribute_map).
    "DeepseekOcr2TextExperts": [
        _case("text", "DeepseekOcr2TextConfig", hidden_size=HIDDEN, moe_intermediate_size=INTER,
              n_routed_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, hidden_act="silu"),
    ],
    # The encoder and decoder layers of DiffusionGemmaTextModel pass their DiffusionGemmaTextConfig (the nested
    # text_config, whose MoE sizes default to None); gate activation gelu_pytorch_tanh (no fused moekit kernel:
    # moekit's autograd-on-recompute path).
    "DiffusionGemmaTextExperts": [
        _case("text", "DiffusionGemmaTextConfig", hidden_size=HIDDEN, moe_intermediate_size=INTER,
              num_experts=NUM_EXPERTS, top_k_experts=TOP_K, hidden_activation="gelu_pytorch_tanh"),
    ],
    # Used twice: Dots3NoteTextMoE(text config; num_local_experts -> n_routed_experts) and Dots3NoteVisionMoE,
    # which passes ``vision_config.per_layer_config[layer_idx]`` of a sparse layer.
    "Dots3NoteExperts": [
        _case("text", "Dots3NoteTextConfig", hidden_size=HIDDEN, moe_intermediate_size=INTER,
              n_routed_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, hidden_act="silu"),
        _case("vision_layer", "Dots3NoteVisionConfig", pick=lambda config: config.per_layer_config[1],
              hidden_size=HIDDEN, adapter_in_dim=HIDDEN, num_attention_heads=2, num_hidden_layers=2,
              moe_intermediate_size=INTER, pyramid_num_routed=[-1, NUM_EXPERTS], num_experts_per_tok=TOP_K,
              hidden_act="silu"),
    ],
    # Ernie4_5_VLMoeSparseMoeBlock(text config, moe_intermediate_size[0] / [1]): text and vision expert sets.
    "Ernie4_5_VLMoeMoeExperts": [
        _case(label, "Ernie4_5_VLMoeTextConfig", init={"intermediate_size": size}, hidden_size=HIDDEN,
              moe_intermediate_size=[INTER, INTER // 2], moe_num_experts=NUM_EXPERTS, moe_k=TOP_K,
              hidden_act="silu")
        for label, size in (("text_moe", INTER), ("vision_moe", INTER // 2))
    ],
    # Qwen3OmniMoeTalkerTextSparseMoeBlock(Qwen3OmniMoeTalkerTextConfig); num_experts -> num_local_experts.
    "Qwen3OmniMoeTalkerTextExperts": [
        _case("talker_text", "Qwen3OmniMoeTalkerTextConfig", hidden_size=HIDDEN, moe_intermediate_size=INTER,
              num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, hidden_act="silu"),
    ],
    # Qwen4ExpTextSparseMoeBlock(Qwen4ExpTextConfig).
    "Qwen4ExpTextExperts": [
        _case("text", "Qwen4ExpTextConfig", hidden_size=HIDDEN, moe_intermediate_size=INTER,
              num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, hidden_act="silu"),
    ],
}

# transformers.models.<package> of each class.
PACKAGES = {
    "DeepseekOcr2TextExperts": "deepseek_ocr2",
    "DiffusionGemmaTextExperts": "diffusion_gemma",
    "Dots3NoteExperts": "dots3_note",
    "Ernie4_5_VLMoeMoeExperts": "ernie4_5_vl_moe",
    "Qwen3OmniMoeTalkerTextExperts": "qwen3_omni_moe",
    "Qwen4ExpTextExperts": "qwen4_exp",
}

PARAMS = [pytest.param(name, label, id=f"{name}-{label}")
          for name in sorted(SKIPS) for label in [c["label"] for c in CASES.get(name, [{"label": "no-case"}])]]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def experts_class(name: str):
    """The experts class ``name`` of the installed transformers (None when absent), checked to be decorated with
    ``use_experts_implementation`` (what ``moekit.hf.discover`` keys on)."""
    pkg = PACKAGES[name]
    try:
        cls = getattr(importlib.import_module(f"transformers.models.{pkg}.modeling_{pkg}"), name, None)
    except ImportError:
        return None
    assert cls is None or is_decorated_experts(cls), f"{name} no longer uses use_experts_implementation"
    return cls


def _config_class(name: str, config_name: str):
    """``config_name`` from the family's configuration module (else its modeling module)."""
    pkg = PACKAGES[name]
    for module in (f"transformers.models.{pkg}.configuration_{pkg}", f"transformers.models.{pkg}.modeling_{pkg}"):
        try:
            cls = getattr(importlib.import_module(module), config_name, None)
        except ImportError:
            continue
        if cls is not None:
            return cls
    raise LookupError(f"{config_name} not found in transformers.models.{pkg}")


def build_experts(name: str, label: str, seed: int = 0):
    """The experts module ``name`` (case ``label``), float32, parameters ~ N(0, INIT_STD)."""
    case = next(c for c in CASES[name] if c["label"] == label)
    config = _config_class(name, case["config"])(**case["kwargs"])
    if case["pick"] is not None:
        config = case["pick"](config)
    module = experts_class(name)(config, **case["init"]).float()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # biases too, where a class has them
            p.copy_(torch.randn(p.shape, generator=gen) * INIT_STD)
    assert module.num_experts == NUM_EXPERTS
    assert module.config is config
    assert module.down_proj.shape[1:] == (HIDDEN, case["init"].get("intermediate_size", INTER))
    return module


def make_inputs(num_experts: int, sentinels: bool, seed: int = 1):
    """Hidden states ``[T, D]``, distinct expert ids per token (the last expert never routed, so an empty group
    is covered; with ``sentinels`` some slots hold ``num_experts``, the id expert parallelism writes for remote
    experts), softmax routing weights, and the fixed loss weights."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, HIDDEN, generator=gen)
    ids = torch.stack([torch.randperm(num_experts - 1, generator=gen)[:TOP_K] for _ in range(TOKENS)])
    if sentinels:
        ids[::3, -1] = num_experts
        ids[::7, 0] = num_experts
    weights = torch.softmax(torch.randn(TOKENS, TOP_K, generator=gen), dim=-1)
    loss_weight = torch.randn(TOKENS, HIDDEN, generator=gen)
    return x, ids, weights, loss_weight


def run(module, impl: str, x, ids, weights, loss_weight):
    """Output and the gradients of ``sum(out * loss_weight)`` w.r.t. inputs, routing weights and parameters."""
    module.config._experts_implementation = impl
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    out = module(x, ids, weights)
    (out * loss_weight).sum().backward()
    grads = {"hidden_states": x.grad, "top_k_weights": weights.grad}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return out.detach(), grads


def check(module, sentinels: bool):
    x, ids, weights, loss_weight = make_inputs(module.num_experts, sentinels)
    ref_out, ref_grads = run(module, "eager", x, ids, weights, loss_weight)
    out, grads = run(module, "moekit", x, ids, weights, loss_weight)
    assert ref_out.abs().max() > 0
    assert rel_err(out, ref_out) < RTOL, f"output rel err {rel_err(out, ref_out):.2e}"
    missing = [n for n, g in {**ref_grads, **grads}.items() if g is None]
    assert not missing, f"no gradient for {missing}"
    assert grads.keys() == ref_grads.keys()
    bad = {n: rel_err(grads[n], ref_grads[n]) for n in ref_grads if rel_err(grads[n], ref_grads[n]) >= RTOL}
    assert not bad, f"gradients differ (rel err): {bad}"
    # The never-routed last expert gets exactly zero gradient from both.
    for n, p in module.named_parameters():
        if p.dim() >= 1 and p.shape[0] == module.num_experts:
            assert grads[n][-1].abs().max() == 0 and ref_grads[n][-1].abs().max() == 0, n


@pytest.mark.parametrize("sentinels", [False, True], ids=["dense", "ep_sentinels"])
@pytest.mark.parametrize("name,label", PARAMS)
def test_moekit_matches_eager_direct(name, label, sentinels):
    assert name in CASES and name in PACKAGES, f"{name} is skipped in test_hf_experts but has no direct case here"
    if experts_class(name) is None:
        pytest.skip(f"{name} is not in the installed transformers")
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert ALL_EXPERTS_FUNCTIONS.get_interface("moekit", None) is moekit_experts_forward
    check(build_experts(name, label), sentinels)


def test_wrong_moekit_output_is_caught(monkeypatch):
    """The comparison is not vacuous: a moekit forward off by 1e-4 (relative) fails it."""
    from transformers.integrations.moe import ExpertsInterface

    def perturbed(self, hidden_states, top_k_index, top_k_weights):
        out = moekit_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        return out * (1 + 1e-4)

    name = next(n for n in sorted(CASES) if experts_class(n) is not None)
    module = build_experts(name, CASES[name][0]["label"])
    check(module, sentinels=False)  # passes with the real one
    monkeypatch.setitem(ExpertsInterface._global_mapping, "moekit", perturbed)
    with pytest.raises(AssertionError, match="output rel err"):
        check(module, sentinels=False)


def test_every_skipped_class_has_a_direct_case():
    assert SKIPS, "SKIPS not found in test_hf_experts.py"
    assert set(SKIPS) <= set(CASES) & set(PACKAGES), sorted(set(SKIPS) - set(CASES) - set(PACKAGES))
