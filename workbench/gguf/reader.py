"""Read a GGUF file into plain data: a `ModelSpec`, the metadata, and memory-mapped tensors.

No model logic lives here. Everything about the architecture is read from metadata keys (never
from the file name); tensors stay in their GGUF block form over an `np.memmap`, so opening a model
costs no RAM for weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from workbench.errors import ModelError
from workbench.gguf.quants import SUPPORTED_TYPES, row_bytes

GGUF_MAGIC = b"GGUF"

# Architectures of the llama family, with the RoPE pairing llama.cpp uses for each:
# "norm" rotates adjacent pairs (x[2i], x[2i+1]); "neox" rotates halves (x[i], x[i + d/2]).
ROPE_MODES = {"llama": "norm"}


@dataclass(frozen=True)
class ModelSpec:
    """Hyper-parameters of a llama-family model, all from GGUF metadata."""

    architecture: str
    name: str
    n_layers: int
    dim: int  # embedding width
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_base: float
    rope_dim: int  # leading dims of each head that are rotated
    rope_mode: str  # "norm" | "neox"
    rope_scale: float  # linear position scaling: position / rope_scale
    tied_embeddings: bool  # output projection reuses token_embd

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


@dataclass(frozen=True)
class Tensor:
    """One tensor in GGUF block form.

    ``shape`` is in NumPy order (rows, cols), the reverse of GGUF's ``ne``. ``raw`` holds the
    block bytes: shape[:-1] + (row_bytes,) uint8 over the file's memory map.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    raw: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


@dataclass
class GGUFModel:
    path: Path
    spec: ModelSpec | None  # None for vocab-only files
    metadata: dict[str, Any]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    reader: GGUFReader | None = field(default=None, repr=False)

    @property
    def file_type(self) -> int | None:
        return self.metadata.get("general.file_type")


def read_gguf(path: str | os.PathLike[str], *, vocab_only: bool = False) -> GGUFModel:
    """Open a GGUF file. Raises `ModelError` naming the problem for any file we cannot use."""
    path = Path(path)
    if not path.is_file():
        raise ModelError("model.not_found", f"model file not found: {path}", path=str(path))
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(
            "model.bad_magic",
            f"{path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})",
            path=str(path),
        )
    try:
        reader = GGUFReader(path, "r")
    except (ValueError, IndexError, OSError, KeyError) as e:
        raise ModelError(
            "model.truncated",
            f"{path} is truncated or corrupt ({path.stat().st_size} bytes): {e}",
            path=str(path),
        ) from e

    metadata = {name: _field_value(f) for name, f in reader.fields.items()}
    model = GGUFModel(path=path, spec=None, metadata=metadata, reader=reader)
    if vocab_only:
        return model
    if not reader.tensors:
        raise ModelError("model.no_tensors", f"{path} holds no tensors (a vocab-only file?)")
    model.spec = spec_from_metadata(metadata, path)
    model.tensors = {t.name: _tensor(t, path) for t in reader.tensors}
    _check_shapes(model)
    return model


def spec_from_metadata(md: dict[str, Any], path: Path | str = "") -> ModelSpec:
    arch = md.get("general.architecture")
    if arch not in ROPE_MODES:
        raise ModelError(
            "model.unknown_architecture",
            f"{path}: architecture {arch!r} is not supported (supported: {sorted(ROPE_MODES)})",
            architecture=arch,
        )

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in md:
            raise ModelError("model.missing_key", f"{path}: metadata key {full!r} is missing")
        return md[full]

    dim = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    n_kv = int(md.get(f"{arch}.attention.head_count_kv", n_heads))
    head_dim = int(md.get(f"{arch}.attention.key_length", dim // n_heads))
    if n_heads <= 0 or n_kv <= 0 or n_heads % n_kv:
        raise ModelError(
            "model.bad_metadata",
            f"{path}: {n_heads} attention heads cannot be grouped over {n_kv} KV heads",
        )
    scaling = md.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ModelError(
            "model.unsupported_rope_scaling", f"{path}: RoPE scaling {scaling!r} is not supported"
        )
    vocab = md.get(f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(md.get("tokenizer.ggml.tokens", ()))
    return ModelSpec(
        architecture=arch,
        name=str(md.get("general.name", Path(path).stem)),
        n_layers=int(need("block_count")),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_dim=int(need("feed_forward_length")),
        vocab_size=int(vocab),
        context_length=int(need("context_length")),
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_base=float(md.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_dim=int(md.get(f"{arch}.rope.dimension_count", head_dim)),
        rope_mode=ROPE_MODES[arch],
        rope_scale=float(md.get(f"{arch}.rope.scaling.factor", 1.0))
        if scaling == "linear"
        else 1.0,
        tied_embeddings=False,  # set by _check_shapes once the tensors are known
    )


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """NumPy-order shape of every tensor a llama-family model must have."""
    d, q, kv, f = spec.dim, spec.n_heads * spec.head_dim, spec.kv_dim, spec.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (spec.vocab_size, d),
        "output_norm.weight": (d,),
    }
    for i in range(spec.n_layers):
        b = f"blk.{i}."
        shapes |= {
            b + "attn_norm.weight": (d,),
            b + "attn_q.weight": (q, d),
            b + "attn_k.weight": (kv, d),
            b + "attn_v.weight": (kv, d),
            b + "attn_output.weight": (d, q),
            b + "ffn_norm.weight": (d,),
            b + "ffn_gate.weight": (f, d),
            b + "ffn_up.weight": (f, d),
            b + "ffn_down.weight": (d, f),
        }
    return shapes


def _check_shapes(model: GGUFModel) -> None:
    spec = model.spec
    assert spec is not None
    for name, shape in expected_shapes(spec).items():
        t = model.tensors.get(name)
        if t is None:
            raise ModelError("model.missing_tensor", f"{model.path}: tensor {name!r} is missing")
        if t.shape != shape:
            raise ModelError(
                "model.shape_mismatch",
                f"{model.path}: tensor {name!r} has shape {t.shape}, but the metadata implies "
                f"{shape}",
                tensor=name,
            )
    out = model.tensors.get("output.weight")
    if out is not None and out.shape != (spec.vocab_size, spec.dim):
        raise ModelError(
            "model.shape_mismatch",
            f"{model.path}: tensor 'output.weight' has shape {out.shape}, expected "
            f"{(spec.vocab_size, spec.dim)}",
        )
    freqs = model.tensors.get("rope_freqs.weight")
    if freqs is not None and freqs.shape != (spec.rope_dim // 2,):
        raise ModelError("model.shape_mismatch", f"{model.path}: bad 'rope_freqs.weight' shape")
    model.spec = _replace(spec, tied_embeddings=out is None)


def _tensor(t: Any, path: Path) -> Tensor:
    try:
        qtype = GGMLQuantizationType(int(t.tensor_type))
    except ValueError:
        qtype = None
    if qtype not in SUPPORTED_TYPES:
        name = getattr(t.tensor_type, "name", str(t.tensor_type))
        raise ModelError(
            "model.unsupported_type",
            f"{path}: tensor {t.name!r} has type {name}, which is not supported "
            f"(supported: {', '.join(q.name for q in SUPPORTED_TYPES)})",
            tensor=t.name,
        )
    shape = tuple(int(n) for n in reversed(t.shape))
    raw = np.asarray(t.data).view(np.uint8)
    raw = raw.reshape(*shape[:-1], row_bytes(qtype, shape[-1]))
    return Tensor(name=t.name, qtype=qtype, shape=shape, raw=raw)


def _field_value(f: Any) -> Any:
    """A metadata field as plain Python (str, int, float, bool, or a list of them)."""
    if f.types and f.types[0] == GGUFValueType.ARRAY and len(f.types) > 1:
        if f.types[1] == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
        return np.concatenate([f.parts[i] for i in f.data]).tolist() if f.data else []
    return f.contents()


def _replace(spec: ModelSpec, **changes: Any) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, **changes)
