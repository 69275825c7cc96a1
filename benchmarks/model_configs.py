"""The models the GPU benchmarks build from a config: Llama- and Qwen3-style, ~1.1B (16 layers, hidden 2048,
16 heads / 8 KV heads, MLP 8192, vocab 32000), or tiny for the CPU --quick runs."""

MODELS = ("llama", "qwen3")


def model_config(name: str, quick: bool):
    """The transformers config of model `name` (one of MODELS); exits with the accepted names otherwise."""
    from transformers import LlamaConfig, Qwen3Config

    if quick:
        shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    else:
        shape = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096)
    if name == "qwen3":
        return Qwen3Config(head_dim=shape["hidden_size"] // shape["num_attention_heads"], **shape)
    if name == "llama":
        return LlamaConfig(**shape)
    raise SystemExit(f"unknown model {name!r}; accepted: {', '.join(MODELS)}")
