"""The GGUF tokenizer against llama.cpp: its own test vectors, ids recorded from it, streaming."""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import pytest

from tests import vectors
from workbench.errors import ModelError, UserError
from workbench.gguf.reader import read_gguf
from workbench.gguf.tokenizer import PRE_TOKENIZERS, Tokenizer

# Every ggml-vocab-* file in llama.cpp's test data is in exactly one of these three.
WITH_VECTORS = [
    "command-r",
    "deepseek-coder",
    "deepseek-llm",
    "falcon",
    "gpt-2",
    "llama-bpe",
    "llama-spm",
    "mpt",
    "phi-3",
    "qwen2",
    "qwen35",
    "refact",
    "starcoder",
]
# Supported kinds, but llama.cpp ships no vectors for them: checked against RECORDED below.
WITHOUT_VECTORS = ["aquila", "baichuan", "gpt-neox"]
UNSUPPORTED = {
    "bert-bge": "WordPiece ('bert'): an embedding model's tokenizer; the engine runs llama models",
    "nomic-bert-moe": "Unigram ('t5') with a precompiled normalizer: an embedding model's",
    "gemma-4": "'gemma4' BPE over raw UTF-8 with ▁ escaping and no byte-level alphabet: not "
    "implemented, no model the workbench runs uses it",
}

# Ids from llama.cpp itself (llama-cpp-python 0.3.36, Llama(vocab_only=True).tokenize) for
# cases its vectors do not cover: special tokens parsed or not, BOS added, user-defined tokens,
# whitespace handling in regexes, vocabularies without vectors.
# (vocab, text, add_special, parse_special, ids)
RECORDED = [
    ("qwen2", "<|im_start|>user\nHi 🦙<|im_end|>\n", False, False,
     [27, 91, 318, 4906, 91, 29, 872, 198, 13048, 11162, 99, 247, 27, 91, 318, 6213, 91, 397]),
    ("qwen2", "<|im_start|>user\nHi 🦙<|im_end|>\n", False, True,
     [151644, 872, 198, 13048, 11162, 99, 247, 151645, 198]),
    ("llama-bpe", "Hello world", True, False, [128000, 9906, 1917]),
    ("llama-bpe", "<|begin_of_text|>Hi<|eot_id|>", True, True, [128000, 128000, 13347, 128009]),
    ("llama-spm", "Hello world", True, False, [1, 15043, 3186]),
    ("llama-spm", "<s> hi</s>", False, True, [1, 29871, 7251, 2]),
    ("llama-spm", "<s> hi</s>", False, False, [529, 29879, 29958, 7251, 829, 29879, 29958]),
    # phi-3's special tokens swallow the whitespace after them (llama.cpp's RSTRIP by name).
    ("phi-3", "<|user|>\nQuestion <|end|>\n<|assistant|>", True, True,
     [1, 32010, 894, 29871, 32007, 32001]),
    ("phi-3", "<|user|>\nQuestion <|end|>\n<|assistant|>", True, False,
     [1, 529, 29989, 1792, 29989, 29958, 13, 16492, 529, 29989, 355, 29989, 29958, 13, 29966,
      29989, 465, 22137, 29989, 29958]),
    # A user-defined token (24 spaces) is split out even without parse_special.
    ("mpt", "a" + " " * 24 + "b", False, False, [66, 50254, 67]),
    # Non-ASCII whitespace inside the CJK / full-width ranges of the deepseek regexes: llama.cpp
    # lets U+3000 match \s but not the range that contains it.
    ("deepseek-llm", "<  \u3000<", False, False, [27, 243, 88946, 27]),
    ("deepseek-llm", "a\t \u3000!", False, False, [64, 11969, 88946, 0]),
    ("deepseek-llm", "x\u3000y。z\u2028 中文", False, False,
     [87, 88946, 88, 398, 89, 350, 101, 207, 43757]),
    ("deepseek-coder", "a\u2003b 中\u3000文", False, False,
     [64, 350, 212, 65, 207, 759, 343, 209, 1919]),
    ("aquila", "Hello, world! 日本語 🦙", False, False,
     [22299, 12, 3117, 1, 221, 4639, 4700, 253, 41209, 100, 248]),
    ("baichuan", "Hello, world! 日本語 🦙", True, False,
     [1, 24568, 31125, 1275, 80, 31106, 6063, 36113, 31106, 56940]),
    ("gpt-neox", "Hello, world! 日本語 🦙\n\n    indented", False, False,
     [12092, 13, 1533, 2, 209, 49868, 19119, 241, 22692, 101, 236, 535, 50274, 527, 8006]),
]  # fmt: skip

# End-of-generation ids as llama.cpp reports them (llama_vocab_is_eog over the whole vocab).
RECORDED_EOG = {
    "gpt-2": {50256},
    "llama-bpe": {128001, 128009},
    "llama-spm": {2},
    "phi-3": {2, 32000, 32007},
    "qwen2": {128247, 151643, 151645},
    "starcoder": {0, 4},
    "refact": {0, 4, 18},
    "command-r": {0, 255001},
    "aquila": {0, 100007},
}

MULTIBYTE = "日本語のテキスト 🦙 llama, 👩‍👩‍👧 family, café, Ελληνικά, 한국어 ✓"


def vocab_path(name: str) -> Path:
    return vectors.vocab_dir() / f"ggml-vocab-{name}.gguf"


@functools.cache
def tokenizer(name: str) -> Tokenizer:
    return Tokenizer.from_metadata(read_gguf(vocab_path(name), vocab_only=True).metadata)


# --- llama.cpp's vectors -------------------------------------------------------------------------


@pytest.mark.vectors
def test_every_vocab_file_is_classified() -> None:
    d = vectors.vocab_dir()
    present = {p.name[len("ggml-vocab-") : -len(".gguf")] for p in d.glob("ggml-vocab-*.gguf")}
    assert present == set(WITH_VECTORS) | set(WITHOUT_VECTORS) | set(UNSUPPORTED)
    with_out = {p.name[len("ggml-vocab-") : -len(".gguf.out")] for p in d.glob("*.gguf.out")}
    assert with_out - set(UNSUPPORTED) == set(WITH_VECTORS)


@pytest.mark.vectors
@pytest.mark.parametrize("name", WITH_VECTORS)
def test_vectors(name: str) -> None:
    """Every input of the vocab's .inp file gives the ids of its .out file, as in llama.cpp's
    test-tokenizer-0 (no BOS, special tokens not parsed), and decodes back to the input."""
    cases = vectors.read_vectors(vocab_path(name))
    assert len(cases) >= 40
    tok = tokenizer(name)
    wrong = [(text, want, got) for text, want in cases if (got := tok.encode(text)) != want]
    assert not wrong, f"{len(wrong)}/{len(cases)} vectors differ, first: {wrong[0]!r}"
    lost = [text for text, want in cases if tok.decode(want) != text]
    assert not lost, f"{len(lost)} texts do not decode back, first: {lost[0]!r}"


@pytest.mark.vectors
@pytest.mark.parametrize(
    ("name", "text", "add_special", "parse_special", "want"),
    RECORDED,
    ids=[f"{r[0]}-{i}" for i, r in enumerate(RECORDED)],
)
def test_recorded_llama_cpp_ids(
    name: str, text: str, add_special: bool, parse_special: bool, want: list[int]
) -> None:
    got = tokenizer(name).encode(text, add_special=add_special, parse_special=parse_special)
    assert got == want


@pytest.mark.vectors
@pytest.mark.parametrize("name", sorted(RECORDED_EOG))
def test_end_of_generation_ids(name: str) -> None:
    tok = tokenizer(name)
    assert tok.eog_ids == RECORDED_EOG[name]
    assert tok.eos_id in tok.eog_ids


@pytest.mark.vectors
@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_vocab_is_refused(name: str) -> None:
    md = read_gguf(vocab_path(name), vocab_only=True).metadata
    with pytest.raises(ModelError) as e:
        Tokenizer.from_metadata(md)
    assert e.value.code == "model.unsupported_tokenizer"
    assert md["tokenizer.ggml.model"] in e.value.message


@pytest.mark.vectors
def test_flags_and_special_ids() -> None:
    spm, bpe, gpt2 = tokenizer("llama-spm"), tokenizer("llama-bpe"), tokenizer("gpt-2")
    assert (spm.vocab_size, spm.bos_id, spm.eos_id) == (32000, 1, 2)
    assert (spm.add_bos, spm.add_eos) == (True, False)
    assert (bpe.vocab_size, bpe.bos_id, bpe.eos_id, bpe.add_bos) == (128256, 128000, 128001, True)
    assert (gpt2.bos_id, gpt2.add_bos) == (50256, False)
    assert gpt2.encode("Hello", add_special=True) == gpt2.encode("Hello") == [15496]


@pytest.mark.vectors
def test_add_eos_flag_appends_eos() -> None:
    md = dict(read_gguf(vocab_path("llama-spm"), vocab_only=True).metadata)
    md["tokenizer.ggml.add_eos_token"] = True
    tok = Tokenizer.from_metadata(md)
    assert tok.add_eos
    assert tok.encode("Hello world", add_special=True) == [1, 15043, 3186, 2]
    assert tok.encode("Hello world") == [15043, 3186]


@pytest.mark.vectors
def test_special_tokens_are_text_unless_parsed() -> None:
    tok = tokenizer("qwen2")
    text = "<|im_start|>assistant\nok<|im_end|>"
    parsed = tok.encode(text, parse_special=True)
    assert parsed[0] == 151644 and parsed[-1] == 151645
    plain = tok.encode(text)
    assert 151644 not in plain and 151645 not in plain
    assert tok.decode(plain) == tok.decode(parsed) == text
    assert tok.decode(parsed, skip_special=True) == "assistant\nok"
    assert tok.piece(151645) == "<|im_end|>"


@pytest.mark.vectors
def test_spm_prefix_space_is_dropped_from_first_piece_only() -> None:
    tok = tokenizer("llama-spm")
    ids = tok.encode("Hello world")
    assert [tok.piece(i) for i in ids] == [" Hello", " world"]
    assert tok.decode(ids) == "Hello world"
    # With a leading BOS kept, the space is on the piece after it, as llama.cpp prints it.
    assert tok.decode([1, *ids]) == "<s> Hello world"


@pytest.mark.vectors
def test_spm_encoding_is_not_quadratic() -> None:
    """20,000 characters and one 8,000-character word encode well inside a generous deadline:
    about 0.1 s here, minutes for a merge loop that rescans every pair after each merge."""
    tok = tokenizer("llama-spm")
    text = (MULTIBYTE + " The quick brown fox jumps over the lazy dog. 1234567890\n") * 300
    texts = [text[:20_000], "a" * 8_000]
    done: list[list[int]] = []
    worker = threading.Thread(target=lambda: done.extend(tok.encode(t) for t in texts), daemon=True)
    worker.start()
    worker.join(timeout=60.0)
    assert len(done) == len(texts), "encoding did not finish within 60 s"
    assert [tok.decode(ids) for ids in done] == texts


# --- streaming -----------------------------------------------------------------------------------


@pytest.mark.vectors
@pytest.mark.parametrize("name", ["gpt-2", "llama-spm", "qwen2", "deepseek-llm"])
def test_streaming_never_splits_utf8(name: str) -> None:
    tok = tokenizer(name)
    ids = tok.encode(MULTIBYTE)
    # The test only means something if some tokens carry part of a character.
    assert any("\ufffd" in tok.piece(i) for i in ids)
    stream = tok.stream()
    chunks = [stream.feed(i) for i in ids]
    tail = stream.flush()
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) + tail == tok.decode(ids) == MULTIBYTE
    assert tail == ""


@pytest.mark.vectors
def test_streaming_holds_back_then_releases_a_character() -> None:
    tok = tokenizer("gpt-2")
    ids = tok.encode("🦙")
    assert len(ids) > 1
    stream = tok.stream()
    assert [stream.feed(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert stream.feed(ids[-1]) == "🦙"


@pytest.mark.vectors
def test_streaming_invalid_bytes_become_replacement_chars() -> None:
    tok = tokenizer("gpt-2")
    first = tok.encode("🦙")[0]  # the lead byte(s) of a 4-byte sequence, never completed
    hello = tok.encode("hi")
    ids = [first, *hello]
    stream = tok.stream()
    out = "".join(stream.feed(i) for i in ids) + stream.flush()
    assert out == tok.decode(ids)
    assert out.startswith("\ufffd") and out.endswith("hi")
    stream = tok.stream()
    assert stream.feed(first) == ""
    assert stream.flush() == "\ufffd"


@pytest.mark.vectors
def test_stream_skipping_special_tokens_matches_decode() -> None:
    tok = tokenizer("llama-spm")
    ids = tok.encode("<s>Tschüß 👋</s>", parse_special=True)
    stream = tok.stream(skip_special=True)
    out = "".join(stream.feed(i) for i in ids) + stream.flush()
    assert out == tok.decode(ids, skip_special=True) == " Tschüß 👋"


# --- errors, on a synthetic vocabulary (no download needed) --------------------------------------


def _byte_symbols() -> list[str]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def tiny_metadata(**changes: Any) -> dict[str, Any]:
    """A byte-level BPE vocabulary: three control tokens, the 256 byte symbols, a few merges."""
    merges = ["Ġ t", "h e", "Ġt he", "l l", "he ll", "hell o"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_symbols()]
    tokens += ["".join(m.split(" ")) for m in merges]
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
    }
    md.update(changes)
    return md


def test_tiny_vocabulary_merges_and_specials() -> None:
    tok = Tokenizer.from_metadata(tiny_metadata())
    hello = tok.encode("hello")
    assert [tok.piece(i) for i in hello] == ["hello"]
    assert [tok.piece(i) for i in tok.encode(" the")] == [" the"]
    text = "<|im_start|>hello<|im_end|>"
    assert tok.encode(text, parse_special=True) == [1, *hello, 2]
    assert len(tok.encode(text)) > 3
    assert tok.eog_ids == {0, 2}  # eos, and <|im_end|> by its name
    assert tok.vocab_size == 3 + 256 + 6


@pytest.mark.parametrize("bad", [-1, 265, 10**9, "3", 1.0, True])
def test_bad_token_ids_are_user_errors(bad: Any) -> None:
    tok = Tokenizer.from_metadata(tiny_metadata())
    for call in (
        lambda: tok.decode([5, bad]),
        lambda: tok.piece(bad),
        lambda: tok.stream().feed(bad),
    ):
        with pytest.raises(UserError) as e:
            call()
        assert e.value.code == "user.bad_token_id"


@pytest.mark.parametrize(
    ("changes", "code", "named"),
    [
        ({"tokenizer.ggml.pre": "no-such-pre"}, "model.unsupported_tokenizer", "no-such-pre"),
        ({"tokenizer.ggml.model": "rwkv"}, "model.unsupported_tokenizer", "rwkv"),
        ({"tokenizer.ggml.merges": None}, "model.missing_key", "merges"),
        ({"tokenizer.ggml.tokens": []}, "model.missing_key", "tokens"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "model.bad_tokenizer", "token types"),
        (
            {"tokenizer.ggml.tokens": ["a", "a"], "tokenizer.ggml.token_type": [1, 1]},
            "model.bad_tokenizer",
            "duplicate",
        ),
    ],
)
def test_unusable_metadata_is_a_model_error(changes: dict[str, Any], code: str, named: str) -> None:
    with pytest.raises(ModelError) as e:
        Tokenizer.from_metadata(tiny_metadata(**changes))
    assert e.value.code == code
    assert named in e.value.message


def test_every_named_pre_tokenizer_builds() -> None:
    for name in PRE_TOKENIZERS:
        tok = Tokenizer.from_metadata(tiny_metadata(**{"tokenizer.ggml.pre": name}))
        text = "Hello,  world! 123 日本 🦙\n"
        assert tok.decode(tok.encode(text)) == text, name


def test_lone_surrogates_encode_as_replacement_char() -> None:
    tok = Tokenizer.from_metadata(tiny_metadata())
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"
