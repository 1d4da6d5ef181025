"""Tiny random-initialised causal LMs built from transformers config classes (no downloads)."""

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen3Config, Qwen3MoeConfig

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=64, decoder_sparse_step=1),
    "gemma3_text": lambda: Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=16, query_pre_attn_scalar=16),
}


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]())
    with torch.no_grad():  # a few persistent outlier channels, as real LMs have
        model.get_input_embeddings().weight[:, [5, 17, 40]] *= 20
    return model.eval()


def batches(n=4, length=24, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, length), generator=g) for _ in range(n)]


def tiny_tokenizer(text: str):
    """A 128-token BPE tokenizer trained on ``text``, with BOS, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:100])
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def quantized(arch: str, siblings: bool = True):
    """A tiny model quantized with OSC MXFP4 (16 outlier channels), its sibling projections stacked unless told."""
    from oscquant import OSCConfig, fuse_siblings, quantize

    model = tiny_model(arch)
    quantize(model, OSCConfig.osc("mxfp4", 16), batches(), progress=False)
    if siblings:
        fuse_siblings(model)
    return model
