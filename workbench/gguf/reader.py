"""Read a GGUF file into plain data: a `ModelSpec`, the metadata, and memory-mapped tensors.

No model logic lives here. Everything about the architecture is read from metadata keys (never
from the file name); tensors stay in their GGUF block form over an `np.memmap`, so opening a model
costs no RAM for weights.

The header is parsed here with the `gguf` package's enums and block table rather than through
`gguf.GGUFReader`: that reader builds a NumPy view per array element, which costs 3.5 s for
SmolLM2's 49k-token vocabulary (19 s for a 256k one) against a few tens of milliseconds here.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

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


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the header describes it, whether or not the workbench supports its type."""

    name: str
    type_id: int  # a GGMLQuantizationType value, or an id this gguf version does not know
    shape: tuple[int, ...]  # NumPy order (rows, cols)
    offset: int  # from the start of the file
    nbytes: int

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.type_id).name
        except ValueError:
            return f"type_{self.type_id}"

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


@dataclass
class GGUFModel:
    path: Path
    spec: ModelSpec | None  # None for vocab-only files
    metadata: dict[str, Any]
    tensor_infos: list[TensorInfo] = field(default_factory=list)
    tensors: dict[str, Tensor] = field(default_factory=dict)  # loaded (supported) tensors

    @property
    def file_type(self) -> int | None:
        return self.metadata.get("general.file_type")


def read_gguf(path: str | os.PathLike[str], *, vocab_only: bool = False) -> GGUFModel:
    """Open a GGUF file. Raises `ModelError` naming the problem for any file we cannot use."""
    path = Path(path)
    if not path.is_file():
        raise ModelError("model.not_found", f"model file not found: {path}", path=str(path))
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(
            "model.bad_magic",
            f"{path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})",
            path=str(path),
        )
    data = np.memmap(path, dtype=np.uint8, mode="r")  # (file bytes,) backs every tensor
    try:
        metadata, infos = _parse_header(memoryview(data))
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as e:
        raise ModelError(
            "model.truncated", f"{path} is truncated or corrupt: {e}", path=str(path)
        ) from e
    end = max((i.offset + i.nbytes for i in infos), default=0)
    if end > size:
        raise ModelError(
            "model.truncated",
            f"{path} is truncated: its tensors need {end} bytes, the file has {size}",
            path=str(path),
        )
    model = GGUFModel(path=path, spec=None, metadata=metadata, tensor_infos=infos)
    if vocab_only:
        return model
    if not infos:
        raise ModelError("model.no_tensors", f"{path} holds no tensors (a vocab-only file?)")
    model.spec = spec_from_metadata(metadata, path)
    model.tensors = {i.name: _tensor(i, data, path) for i in infos}
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
    model.spec = replace(spec, tied_embeddings=out is None)


def _tensor(info: TensorInfo, data: np.memmap, path: Path) -> Tensor:
    qtype = GGMLQuantizationType(info.type_id) if info.type_name in _TYPE_NAMES else None
    if qtype not in SUPPORTED_TYPES:
        raise ModelError(
            "model.unsupported_type",
            f"{path}: tensor {info.name!r} has type {info.type_name}, which is not supported "
            f"(supported: {', '.join(q.name for q in SUPPORTED_TYPES)})",
            tensor=info.name,
        )
    shape = info.shape
    raw = data[info.offset : info.offset + info.nbytes]
    return Tensor(info.name, qtype, shape, raw.reshape(*shape[:-1], row_bytes(qtype, shape[-1])))


_TYPE_NAMES = {q.name for q in GGMLQuantizationType}

# Scalar value types as little-endian NumPy dtypes; BOOL, STRING and ARRAY are handled apart.
_SCALARS = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.FLOAT64: "<f8",
}  # fmt: skip
DEFAULT_ALIGNMENT = 32  # GGUF's default when general.alignment is absent


def _parse_header(buf: memoryview) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Metadata as plain Python values, and the tensor table, from a GGUF v2/v3 header."""
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
    md: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors}
    md["GGUF.kv_count"] = n_kv
    pos = 24
    for _ in range(n_kv):
        key, pos = _string(buf, pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        md[key], pos = _value(buf, pos + 4, GGUFValueType(vtype))
    raw_infos = []
    for _ in range(n_tensors):
        name, pos = _string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        type_id, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        raw_infos.append((name, type_id, tuple(int(d) for d in reversed(dims)), offset))
    align = int(md.get("general.alignment", DEFAULT_ALIGNMENT))
    start = (pos + align - 1) // align * align
    infos = []
    for name, type_id, shape, offset in raw_infos:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
            nbytes = int(np.prod(shape)) // block * block_bytes
        except (ValueError, KeyError):
            nbytes = 0  # unknown type: its size is unknown too; _tensor refuses it by name
        infos.append(TensorInfo(name, type_id, shape, start + offset, nbytes))
    return md, infos


def _string(buf: memoryview, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + n
    if end > len(buf):
        raise ValueError("string runs past the end of the file")
    return bytes(buf[pos + 8 : end]).decode("utf-8", errors="replace"), end


def _value(buf: memoryview, pos: int, vtype: GGUFValueType) -> tuple[Any, int]:
    if vtype in _SCALARS:
        dt = np.dtype(_SCALARS[vtype])
        return np.frombuffer(buf, dt, 1, pos)[0].item(), pos + dt.itemsize
    if vtype == GGUFValueType.BOOL:
        return bool(buf[pos]), pos + 1
    if vtype == GGUFValueType.STRING:
        return _string(buf, pos)
    etype, n = struct.unpack_from("<IQ", buf, pos)
    etype = GGUFValueType(etype)
    pos += 12
    if etype in _SCALARS:
        dt = np.dtype(_SCALARS[etype])
        return np.frombuffer(buf, dt, n, pos).tolist(), pos + n * dt.itemsize
    if etype == GGUFValueType.BOOL:
        return [bool(b) for b in buf[pos : pos + n]], pos + n
    out = []
    for _ in range(n):
        item, pos = _value(buf, pos, etype)
        out.append(item)
    return out, pos
