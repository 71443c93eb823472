"""An independent float64 llama forward pass, for tests only.

Written differently from the engine on purpose: gguf-py's own dequantization, one position at a
time, RoPE through complex multiplication (as llama2.c / Meta's reference do), attention per head
with an explicit loop. If the engine and this agree, neither shares the other's mistakes.
"""

from __future__ import annotations

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


class ReferenceLlama:
    def __init__(self, path: str) -> None:
        r = GGUFReader(path)
        md = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.")}
        a = md["general.architecture"]
        self.n_layers = md[f"{a}.block_count"]
        self.dim = md[f"{a}.embedding_length"]
        self.n_heads = md[f"{a}.attention.head_count"]
        self.n_kv = md[f"{a}.attention.head_count_kv"]
        self.hd = self.dim // self.n_heads
        self.eps = md[f"{a}.attention.layer_norm_rms_epsilon"]
        self.base = md.get(f"{a}.rope.freq_base", 10000.0)
        self.w = {}
        for t in r.tensors:
            shape = tuple(int(n) for n in reversed(t.shape))
            self.w[t.name] = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float64)
        self.w.setdefault("output.weight", self.w["token_embd.weight"])

    def rmsnorm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x) + self.eps) * w

    def rope(self, x: np.ndarray, pos: int) -> np.ndarray:
        # x (heads, hd): adjacent pairs as complex numbers, rotated by pos * theta_i.
        theta = self.base ** (-np.arange(0, self.hd, 2) / self.hd)
        z = x[:, 0::2] + 1j * x[:, 1::2]
        z = z * np.exp(1j * pos * theta)
        out = np.empty_like(x)
        out[:, 0::2], out[:, 1::2] = z.real, z.imag
        return out

    def logits(self, tokens: list[int]) -> np.ndarray:
        """(len(tokens), vocab) float64 logits, position by position."""
        w, hd = self.w, self.hd
        keys = [[] for _ in range(self.n_layers)]
        vals = [[] for _ in range(self.n_layers)]
        out = []
        for pos, tok in enumerate(tokens):
            x = w["token_embd.weight"][tok].copy()
            for i in range(self.n_layers):
                b = f"blk.{i}."
                h = self.rmsnorm(x, w[b + "attn_norm.weight"])
                q = self.rope((w[b + "attn_q.weight"] @ h).reshape(self.n_heads, hd), pos)
                k = self.rope((w[b + "attn_k.weight"] @ h).reshape(self.n_kv, hd), pos)
                v = (w[b + "attn_v.weight"] @ h).reshape(self.n_kv, hd)
                keys[i].append(k)
                vals[i].append(v)
                K, V = np.stack(keys[i]), np.stack(vals[i])  # (t, kv, hd)
                att = np.zeros((self.n_heads, hd))
                for head in range(self.n_heads):
                    g = head // (self.n_heads // self.n_kv)
                    s = K[:, g, :] @ q[head] / np.sqrt(hd)
                    p = np.exp(s - s.max())
                    att[head] = (p / p.sum()) @ V[:, g, :]
                x = x + w[b + "attn_output.weight"] @ att.reshape(-1)
                h = self.rmsnorm(x, w[b + "ffn_norm.weight"])
                gate = w[b + "ffn_gate.weight"] @ h
                up = w[b + "ffn_up.weight"] @ h
                x = x + w[b + "ffn_down.weight"] @ (gate / (1 + np.exp(-gate)) * up)
            out.append(w["output.weight"] @ self.rmsnorm(x, w["output_norm.weight"]))
        return np.stack(out)

    def greedy(self, tokens: list[int], n: int) -> list[int]:
        seq = list(tokens)
        for _ in range(n):
            seq.append(int(np.argmax(self.logits(seq)[-1])))
        return seq[len(tokens) :]
