"""Qwen-MoE (Qwen1.5-MoE, Qwen2-MoE): grouped-query attention with q/k/v biases and full-head
RoPE, untied embeddings, a linear router (softmax over all experts, top-k), fine-grained routed
experts and a sigmoid-gated shared expert; the ``Qwen2MoeForCausalLM`` Hugging Face layout.
The MoE parts are the shared megamoe.nn.moe; this folder holds the attention and the layout."""


from megamoe.config.schema import Config
from megamoe.errors import ConfigError
from megamoe.models.family import HFAdapter, ModelFamily
from megamoe.models.qwen_moe import accounting, hf
from megamoe.models.qwen_moe.attention import GroupedQueryAttention


def validate(cfg: Config) -> None:
    """The attention has no LFA, and its K/V heads each serve a whole group of query heads."""
    m = cfg.model
    if m.use_lfa:
        raise ConfigError("model.use_lfa: true is not a Qwen-MoE setting (LFA is Yuan's attention); "
                          "set model.use_lfa=false, or use model.family=yuan")
    kv = m.num_kv_heads
    if kv is not None and (kv <= 0 or m.num_heads % kv):
        raise ConfigError(f"model.num_kv_heads: {kv} must divide model.num_heads={m.num_heads} (each K/V head "
                          "serves an equal group of query heads); null means one per query head")


FAMILY = ModelFamily(
    name="qwen_moe",
    attention=GroupedQueryAttention,
    attention_parts=accounting.attention_parts,
    attention_bytes=accounting.attention_bytes,
    attention_cast_per_forward=accounting.cast_per_forward,
    validate=validate,
    hf=HFAdapter("Qwen2MoeForCausalLM", "qwen2_moe", hf.to_hf, hf.from_hf, hf.check_exportable, hf.hf_config,
                 hf.config_from_hf, hf.is_ignored_hf_tensor),
)
