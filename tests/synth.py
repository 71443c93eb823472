"""Tiny synthetic llama-family GGUF models for tests, written with `gguf.GGUFWriter`.

Weights are random, quantized with `gguf.quants.quantize`; the vocabulary is byte-level BPE (the
256 GPT-2 byte symbols, a few merges, and ChatML special tokens), so prompts of any text encode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.constants import QK_K

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Byte offsets of the fp16 fields (d, m, dmin) in each block, from the field order of gguf-py's
# dequantize_blocks: these must hold finite values for a random block to be a sensible one.
F16_FIELDS = {
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q8_0: (0,),
    Q.Q2_K: (QK_K // 16 + QK_K // 4, QK_K // 16 + QK_K // 4 + 2),
    Q.Q3_K: (QK_K // 8 + QK_K // 4 + 12,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (QK_K // 2 + QK_K // 4 + QK_K // 16,),
}
# Largest |sub-block scale x code| of the K-quants: random blocks get d, dmin of about
# scale / this, so that their weights are about as large as a quantized matrix's.
_K_RANGE = {Q.Q2_K: 15 * 3, Q.Q3_K: 32 * 4, Q.Q4_K: 63 * 15, Q.Q5_K: 63 * 31, Q.Q6_K: 127 * 32}

MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a n"]


@dataclass(frozen=True)
class TinyConfig:
    n_layers: int = 2
    dim: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 128
    context_length: int = 96
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tied: bool = True
    qtype: Q = Q.Q8_0
    # Per-matrix types overriding qtype, keyed by the name inside a block ("attn_v", ...).
    overrides: tuple[tuple[str, Q], ...] = ()


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def vocab() -> list[str]:
    merged = ["".join(m.split(" ")) for m in MERGES]
    return SPECIALS + byte_symbols() + merged


def k_quant_blocks(rng: np.random.Generator, qtype: Q, rows: int, cols: int, scale: float):
    """(rows, row_bytes) uint8 of random K-quant blocks whose weights are about ``scale``."""
    values, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // values, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        d = rng.uniform(0.5, 1.0, raw.shape[:2]) * 3 * scale / _K_RANGE[qtype]
        raw[..., off : off + 2] = d.astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def write_tiny_llama(path: Path, cfg: TinyConfig = TinyConfig(), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    tokens = vocab()
    n_vocab = len(tokens)
    hd = cfg.dim // cfg.n_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (
        n_vocab - len(SPECIALS)
    )
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    per_matrix = dict(cfg.overrides)

    def mat(name: str, rows: int, cols: int, scale: float) -> None:
        qtype = per_matrix.get(name.split(".")[-2], cfg.qtype)
        x = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, x)
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        elif qtype in _K_RANGE:  # gguf-py has no K-quant quantizer: random codes, sized scales
            w.add_tensor(name, k_quant_blocks(rng, qtype, rows, cols, scale), raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    def vec(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    d, f, kv = cfg.dim, cfg.ffn_dim, cfg.n_kv_heads * hd
    mat("token_embd.weight", n_vocab, d, 1.0)
    vec("output_norm.weight", d)
    if not cfg.tied:
        mat("output.weight", n_vocab, d, 0.5)
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        vec(b + "attn_norm.weight", d)
        mat(b + "attn_q.weight", d, d, d**-0.5)
        mat(b + "attn_k.weight", kv, d, d**-0.5)
        mat(b + "attn_v.weight", kv, d, d**-0.5)
        mat(b + "attn_output.weight", d, d, d**-0.5)
        vec(b + "ffn_norm.weight", d)
        mat(b + "ffn_gate.weight", f, d, d**-0.5)
        mat(b + "ffn_up.weight", f, d, d**-0.5)
        mat(b + "ffn_down.weight", d, f, f**-0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
