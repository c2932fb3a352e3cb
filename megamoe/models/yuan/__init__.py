"""Yuan 2.0 (M32): Localized Filtering-based Attention with RoPE on part of each head, the
Attention Router, tied embeddings; the Yuan2-M32 Hugging Face layout (docs/yuan2-m32.md)."""


from megamoe.config.schema import Config
from megamoe.errors import ConfigError
from megamoe.models.family import HFAdapter, ModelFamily
from megamoe.models.yuan import accounting, hf
from megamoe.models.yuan.attention import YuanAttention


def validate(cfg: Config) -> None:
    """Yuan's attention has one K/V head per query head, no projection biases, and LFA's first
    convolution halves the hidden size."""
    m = cfg.model
    for key, ok in (("model.num_kv_heads", m.num_kv_heads in (None, m.num_heads)), ("model.qkv_bias", not m.qkv_bias)):
        if not ok:
            raise ConfigError(f"{key}: {getattr(m, key.split('.')[1])} is not a Yuan setting (model.family=yuan "
                              "has plain multi-head attention without biases); use model.family=qwen_moe")
    if m.use_lfa and m.hidden_size % 2:
        raise ConfigError(f"model.hidden_size: {m.hidden_size} must be even for LFA (its first conv maps H → H/2)")


FAMILY = ModelFamily(
    name="yuan",
    attention=YuanAttention,
    attention_parts=accounting.attention_parts,
    attention_bytes=accounting.attention_bytes,
    attention_cast_per_forward=accounting.cast_per_forward,
    validate=validate,
    hf=HFAdapter("YuanForCausalLM", "yuan", hf.to_hf, hf.from_hf, hf.check_exportable, hf.hf_config,
                 hf.config_from_hf, hf.is_ignored_hf_tensor),
)
