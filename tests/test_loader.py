"""Opening GGUF files: the spec comes from metadata; each kind of bad file names its problem."""

from __future__ import annotations

import mmap

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from tests.synth import TinyConfig, write_tiny_llama
from workbench.errors import ModelError
from workbench.gguf.reader import read_gguf


def test_spec_from_metadata(tiny_model):
    m = read_gguf(tiny_model)
    s = m.spec
    assert (s.architecture, s.n_layers, s.dim, s.n_heads, s.n_kv_heads) == ("llama", 2, 64, 4, 2)
    assert (s.head_dim, s.ffn_dim, s.context_length, s.rope_mode) == (16, 128, 96, "norm")
    assert s.tied_embeddings and s.vocab_size == len(m.metadata["tokenizer.ggml.tokens"])
    t = m.tensors["blk.0.attn_k.weight"]
    assert t.qtype == Q.Q8_0 and t.shape == (32, 64) and t.raw.dtype == np.uint8
    assert t.raw.shape == (32, 64 // 32 * 34)
    assert _file_backed(t.raw), "tensors must stay memory-mapped, not copied"


def _file_backed(a) -> bool:
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


@pytest.mark.parametrize("kind", ["Q4_1", "F16", "untied"])
def test_header_parser_agrees_with_gguf_py(tiny_models, kind):
    """Our header parser (fast) against gguf-py's GGUFReader (the reference)."""
    path = tiny_models[kind]
    ours = read_gguf(path)
    ref = gguf.GGUFReader(path)
    assert ours.metadata == {k: f.contents() for k, f in ref.fields.items()}
    assert len(ours.tensor_infos) == len(ref.tensors)
    for info, t in zip(ours.tensor_infos, ref.tensors, strict=True):
        assert (info.name, info.type_id, info.nbytes) == (t.name, int(t.tensor_type), t.n_bytes)
        assert info.shape == tuple(int(n) for n in reversed(t.shape))
        assert info.offset == t.data_offset
        raw = ours.tensors[t.name].raw
        assert np.array_equal(raw.reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))


def test_untied_output(tiny_models):
    assert not read_gguf(tiny_models["untied"]).spec.tied_embeddings


def test_missing_file(tmp_path):
    with pytest.raises(ModelError) as e:
        read_gguf(tmp_path / "nope.gguf")
    assert e.value.code == "model.not_found" and "nope.gguf" in str(e.value)


def test_bad_magic(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelError) as e:
        read_gguf(p)
    assert e.value.code == "model.bad_magic" and "not a GGUF file" in str(e.value)


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated(tiny_model, tmp_path, keep):
    data = tiny_model.read_bytes()
    p = tmp_path / "t.gguf"
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelError) as e:
        read_gguf(p)
    assert e.value.code == "model.truncated"


def _rewrite(src, dst, *, arch=None, drop=(), retype=None, head_count=None):
    """Copy a GGUF, changing metadata or tensors, to make a bad file on purpose."""
    r = gguf.GGUFReader(src)
    md = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    old_arch = md["general.architecture"]
    new_arch = arch or old_arch
    w = gguf.GGUFWriter(str(dst), new_arch)
    for k, v in md.items():
        if k == "general.architecture":
            continue
        if head_count is not None and k == f"{old_arch}.attention.head_count":
            v = head_count
        key = k.replace(f"{old_arch}.", f"{new_arch}.", 1)
        f = r.fields[k]
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(key, v)
        else:
            w.add_key_value(key, v, vtype)
    for t in r.tensors:
        if t.name in drop:
            continue
        data = np.asarray(t.data)  # quantized: (rows, row_bytes) uint8; float: (rows, cols)
        if retype and t.name == retype[0]:
            w.add_tensor(t.name, np.zeros_like(data.view(np.uint8)), raw_dtype=retype[1])
        else:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_unknown_architecture(tiny_model, tmp_path):
    p = _rewrite(tiny_model, tmp_path / "a.gguf", arch="mamba")
    with pytest.raises(ModelError) as e:
        read_gguf(p)
    assert e.value.code == "model.unknown_architecture" and "mamba" in str(e.value)


def test_unsupported_tensor_type(tmp_path):
    src = write_tiny_llama(tmp_path / "s.gguf", TinyConfig(qtype=Q.Q4_0))
    # IQ4_NL has the same 32-element/18-byte block as Q4_0, so the file stays self-consistent.
    p = _rewrite(src, tmp_path / "u.gguf", retype=("blk.0.attn_q.weight", Q.IQ4_NL))
    with pytest.raises(ModelError) as e:
        read_gguf(p)
    assert e.value.code == "model.unsupported_type" and "IQ4_NL" in str(e.value)


def test_shapes_that_contradict_metadata(tiny_model, tmp_path):
    p = _rewrite(tiny_model, tmp_path / "h.gguf", head_count=8)  # 8 heads of dim 8 != kv dim
    with pytest.raises(ModelError) as e:
        read_gguf(p)
    assert e.value.code == "model.shape_mismatch" and "attn_k" in str(e.value)


def test_missing_tensor(tiny_model, tmp_path):
    p = _rewrite(tiny_model, tmp_path / "m.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ModelError) as e:
        read_gguf(p)
    assert e.value.code == "model.missing_tensor" and "blk.1.ffn_up.weight" in str(e.value)
