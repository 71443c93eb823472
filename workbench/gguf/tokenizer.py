"""Tokenizers built from GGUF metadata that give the token ids llama.cpp gives.

Two vocabulary kinds are supported, named by ``tokenizer.ggml.model``:

- ``gpt2``: byte-level BPE over ``tokenizer.ggml.merges``, after the pre-tokenizer regexes that
  ``tokenizer.ggml.pre`` names. The regexes are llama.cpp's (src/llama-vocab.cpp), and the merging
  is done by HuggingFace's ``tokenizers`` (its BPE ranks pairs the way llama.cpp does).
- ``llama``: SentencePiece-style BPE driven by ``tokenizer.ggml.scores`` with ``<0xNN>`` byte
  fallback. llama.cpp merges the highest-scoring adjacent pair first, which no merge list
  reproduces exactly, so that loop is implemented here.

llama.cpp is the reference (its test vectors check us), including where it differs from
HuggingFace: special tokens are split out of the text before anything else, user-defined ones
even when ``parse_special`` is off; token attributes are adjusted by token text the way
llama.cpp's loader adjusts them.
"""

from __future__ import annotations

import codecs
import heapq
from collections.abc import Sequence
from typing import Any

import numpy as np

from workbench.errors import ModelError, UserError
from workbench.gguf.pretokenizers import PRE_TOKENIZERS, Pre

# GGUF token types (tokenizer.ggml.token_type) -> llama.cpp token attributes (bit flags).
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8
# index = token type: UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE
_TYPE_TO_ATTR = np.array(
    [0, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_CONTROL, ATTR_USER_DEFINED, ATTR_UNUSED, ATTR_BYTE],
    dtype=np.int32,
)
_HIDDEN = ATTR_CONTROL | ATTR_UNKNOWN  # pieces shown only when special tokens are rendered

# The C locale's isspace(), which llama.cpp uses to strip around LSTRIP/RSTRIP special tokens.
_C_SPACE = " \t\n\v\f\r"


# Token texts llama.cpp's loader recognises (src/llama-vocab.cpp). Tokens named for a role that
# the metadata leaves unset are taken for it and made CONTROL; EOG tokens end generation.
_EOT_NAMES = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
)  # fmt: skip
_ROLE_NAMES = {
    "eot": _EOT_NAMES,
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                "▁<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}  # fmt: skip
_EOG_NAMES = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
)  # fmt: skip
# Metadata keys of the special ids, with the deprecated spellings of the FIM ones.
_ID_KEYS = {
    "bos": ("bos_token_id",),
    "eos": ("eos_token_id",),
    "eot": ("eot_token_id",),
    "eom": ("eom_token_id",),
    "unk": ("unknown_token_id",),
    "sep": ("seperator_token_id",),
    "pad": ("padding_token_id",),
    "fim_pre": ("fim_pre_token_id", "prefix_token_id"),
    "fim_suf": ("fim_suf_token_id", "suffix_token_id"),
    "fim_mid": ("fim_mid_token_id", "middle_token_id"),
    "fim_pad": ("fim_pad_token_id",),
    "fim_rep": ("fim_rep_token_id",),
    "fim_sep": ("fim_sep_token_id",),
}


def _byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet: the printable stand-in for each byte value, in byte order."""
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(0x100 + extra))
            extra += 1
    return out


_BYTE_OF_SYMBOL = {s: b for b, s in enumerate(_byte_symbols())}


class Tokenizer:
    """Text <-> token ids for a GGUF vocabulary, as llama.cpp tokenizes."""

    def __init__(
        self,
        *,
        kind: str,
        tokens: list[str],
        to_id: dict[str, int],
        attrs: np.ndarray,
        special_ids: dict[str, int | None],
        add_bos: bool,
        add_eos: bool,
        add_space_prefix: bool,
        eog_ids: frozenset[int],
        scores: list[float] | None = None,
        bpe: Any = None,
    ) -> None:
        """Use `from_metadata`; this takes the already-validated parts."""
        self.kind = kind  # "bpe" (tokenizer.ggml.model gpt2) or "spm" (llama)
        self._tokens = tokens
        self._to_id = to_id
        self._attrs = attrs
        self.vocab_size = len(tokens)
        self.bos_id = special_ids.get("bos")
        self.eos_id = special_ids.get("eos")
        self.unk_id = special_ids.get("unk")
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self.eog_ids = eog_ids
        self._scores = scores
        self._bpe = bpe
        self._pieces: list[bytes | None] = [None] * len(tokens)

        special = np.flatnonzero(attrs & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))
        # Longest first, as llama.cpp partitions; ids break ties so the order is reproducible.
        entries = sorted(
            ((tokens[i], int(i), int(attrs[i])) for i in special), key=lambda e: -len(e[0])
        )
        self._specials_all = [e for e in entries if e[0]]
        self._specials_user = [e for e in self._specials_all if not (e[2] & _HIDDEN)]
        if kind == "spm":
            self._byte_ids = [self._spm_byte_token(b) for b in range(256)]

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, md: dict[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file's ``tokenizer.*`` metadata describes."""
        model = md.get("tokenizer.ggml.model")
        if model is None:
            raise ModelError("model.missing_key", "metadata key 'tokenizer.ggml.model' is missing")
        if model not in ("gpt2", "llama"):
            raise ModelError(
                "model.unsupported_tokenizer",
                f"tokenizer model {model!r} is not supported (supported: gpt2, llama)",
                tokenizer=model,
            )
        raw = md.get("tokenizer.ggml.tokens")
        if not isinstance(raw, list) or not raw:
            raise ModelError("model.missing_key", "metadata key 'tokenizer.ggml.tokens' is missing")
        n = len(raw)
        # llama.cpp renames empty tokens so that they can never match text.
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(raw)] if "" in raw else raw
        if len(set(tokens)) != n:
            raise ModelError("model.bad_tokenizer", "the vocabulary holds duplicate tokens")

        types = md.get("tokenizer.ggml.token_type")
        if types is None:
            attrs = np.full(n, ATTR_NORMAL, dtype=np.int32)
        else:
            t = np.asarray(types, dtype=np.int64)
            if len(t) < n:
                raise ModelError(
                    "model.bad_tokenizer", f"{len(t)} token types for {n} tokens", tokens=n
                )
            t = t[:n]
            attrs = np.where((t >= 0) & (t < len(_TYPE_TO_ATTR)), _TYPE_TO_ATTR[t.clip(0, 6)], 0)
            attrs = attrs.astype(np.int32)

        if model == "llama":
            kind, pre = "spm", None
            add_bos, add_space_prefix = True, True
            defaults: dict[str, int | None] = {"bos": 1, "eos": 2, "unk": 0}
        else:
            kind = "bpe"
            pre_name = md.get("tokenizer.ggml.pre") or "default"
            pre = PRE_TOKENIZERS.get(pre_name)
            if pre is None:
                raise ModelError(
                    "model.unsupported_tokenizer",
                    f"pre-tokenizer {pre_name!r} (tokenizer.ggml.pre) is not supported",
                    pre_tokenizer=pre_name,
                )
            add_bos, add_space_prefix = pre.add_bos, False
            defaults = {"bos": 11 if pre.bos_default else None, "eos": 11}
        add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", add_space_prefix))
        add_bos = bool(md.get("tokenizer.ggml.add_bos_token", add_bos))
        add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))

        ids = _special_ids(md, defaults, n)
        to_id = dict(zip(tokens, range(n)))
        eog = _adjust_attrs(tokens, to_id, attrs, ids, md)
        for flag, role in ((add_bos, "bos"), (add_eos, "eos")):
            if flag and ids.get(role) is None:
                raise ModelError(
                    "model.bad_tokenizer", f"the vocabulary adds a {role.upper()} token it lacks"
                )

        scores = None
        bpe = None
        if kind == "spm":
            raw_scores = md.get("tokenizer.ggml.scores")
            if raw_scores is not None and len(raw_scores) < n:
                raise ModelError("model.bad_tokenizer", f"{len(raw_scores)} scores for {n} tokens")
            scores = [float(s) for s in raw_scores[:n]] if raw_scores is not None else [0.0] * n
        else:
            assert pre is not None
            bpe = _build_bpe(to_id, md.get("tokenizer.ggml.merges"), pre)
        return cls(
            kind=kind,
            tokens=tokens,
            to_id=to_id,
            attrs=attrs,
            special_ids=ids,
            add_bos=add_bos,
            add_eos=add_eos,
            add_space_prefix=add_space_prefix,
            eog_ids=eog,
            scores=scores,
            bpe=bpe,
        )

    # --- encoding ------------------------------------------------------------------------------

    def encode(
        self, text: str, *, add_special: bool = False, parse_special: bool = False
    ) -> list[int]:
        """Token ids of ``text``.

        ``add_special`` adds BOS/EOS as the model's flags say; ``parse_special`` turns the text of
        control tokens (e.g. ``<|im_start|>``) into those tokens instead of encoding it as text.
        """
        if not isinstance(text, str):
            raise UserError("user.bad_text", f"text to encode must be a str, not {type(text)}")
        # A Python str may hold lone surrogates, which have no UTF-8 form: they become U+FFFD.
        if any("\ud800" <= c <= "\udfff" for c in text):
            text = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
        out: list[int] = []
        if add_special and self.add_bos:
            assert self.bos_id is not None
            out.append(self.bos_id)
        fragments = self._partition(text, parse_special) if text else []
        if self.kind == "spm":
            prev_special = True  # the text's start counts as following a special token
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                self._spm_encode(frag.replace(" ", "▁"), out)
                prev_special = False
        else:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    out.extend(self._bpe.encode(frag, add_special_tokens=False).ids)
        if add_special and self.add_eos:
            assert self.eos_id is not None
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split special tokens out of the text, longest first, as llama.cpp does.

        User-defined tokens are always split out; control and unknown ones only when parsing
        special tokens.
        """
        frags: list[str | int] = [text]
        for stext, tid, attr in self._specials_all if parse_special else self._specials_user:
            if stext not in text:
                continue
            new: list[str | int] = []
            for frag in frags:
                if isinstance(frag, int) or stext not in frag:
                    new.append(frag)
                    continue
                pos = 0
                while (hit := frag.find(stext, pos)) >= 0:
                    left = frag[pos:hit]
                    if attr & ATTR_LSTRIP:
                        left = left.rstrip(_C_SPACE)
                    if left:
                        new.append(left)
                    new.append(tid)
                    pos = hit + len(stext)
                    if attr & ATTR_RSTRIP:
                        while pos < len(frag) and frag[pos] in _C_SPACE:
                            pos += 1
                if pos < len(frag):
                    new.append(frag[pos:])
            frags = new
        return frags

    def _spm_encode(self, text: str, out: list[int]) -> None:
        """llama.cpp's SPM merge: repeatedly join the adjacent pair whose joined text is the
        highest-scoring token (leftmost on ties); symbols that end up as no token become bytes."""
        n = len(text)
        if not n:
            return
        to_id, scores = self._to_id, self._scores
        assert scores is not None
        # Symbol i starts at text[i] (a symbol only ever absorbs its right neighbour) and is
        # size[i] characters long; prev/nxt link the live symbols.
        size = [1] * n
        prev = list(range(-1, n - 1))
        nxt = [*range(1, n), -1]
        heap = []
        for i in range(n - 1):
            tid = to_id.get(text[i : i + 2])
            if tid is not None:
                heap.append((-scores[tid], i, i + 1, 2))
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            _, left, right, total = pop(heap)
            # Stale when either side was merged away or grew since the pair was queued.
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != total:
                continue
            size[left] = total
            size[right] = 0
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prev[after] = left
            before = prev[left]
            if before >= 0:
                width = size[before] + total
                tid = to_id.get(text[before : before + width])
                if tid is not None:
                    push(heap, (-scores[tid], before, left, width))
            if after >= 0:
                width = total + size[after]
                tid = to_id.get(text[left : left + width])
                if tid is not None:
                    push(heap, (-scores[tid], left, after, width))
        i = 0
        while i >= 0:
            piece = text[i : i + size[i]]
            tid = to_id.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                for b in piece.encode("utf-8"):
                    bid = self._byte_ids[b]
                    if bid is not None:
                        out.append(bid)
            i = nxt[i]

    def _spm_byte_token(self, b: int) -> int | None:
        # llama.cpp gives up on text needing a byte token the vocabulary lacks; <unk> stands in.
        tid = self._to_id.get(f"<0x{b:02X}>")
        if tid is None and b < 0x80:
            tid = self._to_id.get(chr(b))
        return tid if tid is not None else self.unk_id

    # --- decoding ------------------------------------------------------------------------------

    def _check(self, token_id: int) -> int:
        if isinstance(token_id, (bool, np.bool_)) or not isinstance(token_id, (int, np.integer)):
            raise UserError("user.bad_token_id", f"token id {token_id!r} is not an integer")
        if not 0 <= token_id < self.vocab_size:
            raise UserError(
                "user.bad_token_id",
                f"token id {token_id} is out of range [0, {self.vocab_size})",
                token_id=int(token_id),
            )
        return int(token_id)

    def _piece_bytes(self, token_id: int) -> bytes:
        """The token's bytes as llama.cpp's token_to_piece gives them with special=true."""
        cached = self._pieces[token_id]
        if cached is not None:
            return cached
        text, attr = self._tokens[token_id], int(self._attrs[token_id])
        if attr & (_HIDDEN | ATTR_USER_DEFINED):
            out = text.encode("utf-8")
        elif attr & ATTR_NORMAL:
            out = _decode_bpe_text(text) if self.kind == "bpe" else text.replace("▁", " ").encode()
        elif attr & ATTR_BYTE:
            try:
                out = bytes([int(text[3:5], 16)])  # "<0xNN>"
            except ValueError:
                out = text.encode("utf-8")
        else:
            out = b""  # unused and undefined tokens print nothing
        self._pieces[token_id] = out
        return out

    def _visible_bytes(self, token_id: int, skip_special: bool) -> bytes:
        if skip_special and self._attrs[token_id] & _HIDDEN:
            return b""
        return self._piece_bytes(token_id)

    def piece(self, token_id: int) -> str:
        """The token's text as llama.cpp's token_to_piece shows it (special tokens included);
        bytes that are not complete UTF-8 on their own show as U+FFFD."""
        return self._piece_bytes(self._check(token_id)).decode("utf-8", errors="replace")

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of the ids: their pieces joined, as llama.cpp's detokenize joins them.

        ``skip_special`` hides control tokens (and a leading BOS). Like llama.cpp, the space an
        SPM vocabulary prefixes to the text is dropped from the first piece. llama.cpp's
        clean-up of spaces before punctuation is not applied: it loses text and cannot stream.
        """
        return self.stream(skip_special=skip_special)._decode_all(ids)

    def stream(self, *, skip_special: bool = False) -> StreamDecoder:
        """A decoder for ids arriving one at a time (generation output)."""
        return StreamDecoder(self, skip_special=skip_special)


class StreamDecoder:
    """Turns ids into text as they arrive, never splitting a UTF-8 sequence."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._first = True
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _bytes(self, token_id: int) -> bytes:
        tok = self._tok
        token_id = tok._check(token_id)
        if not self._first:
            return tok._visible_bytes(token_id, self._skip)
        self._first = False
        if self._skip and tok.add_bos and token_id == tok.bos_id:
            return b""  # llama.cpp keeps the prefix space when it drops a leading BOS
        data = tok._visible_bytes(token_id, self._skip)
        if tok.add_space_prefix and data.startswith(b" "):
            data = data[1:]
        return data

    def feed(self, token_id: int) -> str:
        """Text completed by this token; an unfinished UTF-8 sequence waits for the next."""
        return self._utf8.decode(self._bytes(token_id))

    def flush(self) -> str:
        """Whatever is still held back, incomplete sequences as U+FFFD; the stream then ends."""
        return self._utf8.decode(b"", final=True)

    def _decode_all(self, ids: Sequence[int]) -> str:
        # One decode over all the bytes: the same text as feeding them one by one and flushing.
        data = b"".join(self._bytes(i) for i in ids)
        return self._utf8.decode(data, final=True)


# --- helpers for from_metadata ---------------------------------------------------------------


def _special_ids(md: dict[str, Any], defaults: dict[str, int | None], n: int) -> dict[str, Any]:
    """Special ids from metadata over llama.cpp's defaults; out-of-range ones are dropped."""
    ids: dict[str, int | None] = {}
    for role, keys in _ID_KEYS.items():
        value = defaults.get(role)
        if value is not None and not 0 <= value < n:
            value = None
        for key in keys:
            got = md.get(f"tokenizer.ggml.{key}")
            if isinstance(got, int) and not isinstance(got, bool) and 0 <= got < n:
                value = got
        ids[role] = value
    return ids


def _adjust_attrs(
    tokens: list[str],
    to_id: dict[str, int],
    attrs: np.ndarray,
    ids: dict[str, int | None],
    md: dict[str, Any],
) -> frozenset[int]:
    """Apply llama.cpp's loader fix-ups to ``attrs`` in place; return the end-of-generation ids.

    Tokens are recognised by their text: role tokens the metadata leaves unset are found by
    name, and every token that ends generation is made CONTROL (so it is hidden in output and
    only parsed from text with parse_special).
    """
    for role, names in _ROLE_NAMES.items():
        if ids.get(role) is not None:
            continue
        found = [to_id[name] for name in names if name in to_id]
        if found:
            ids[role] = min(found)  # llama.cpp takes whichever its hash map yields first
            attrs[ids[role]] |= ATTR_CONTROL

    eog = {ids[r] for r in ("fim_pad", "fim_rep", "fim_sep") if ids.get(r) is not None}
    for name in _EOG_NAMES:
        tid = to_id.get(name)
        if tid is not None:
            eog.add(tid)
            attrs[tid] |= ATTR_CONTROL
    # gpt-oss: these always render, so they count as user-defined text.
    for name in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
        if name in to_id:
            attrs[to_id[name]] = ATTR_USER_DEFINED
    eog.update(ids[r] for r in ("eos", "eot", "eom") if ids.get(r) is not None)

    by_text = {tokens[t]: t for t in eog}
    # o200k_harmony / solar-open: <|end|> ends a message, not the generation.
    if "<|end|>" in by_text and (
        ("<|return|>" in by_text and ("<|call|>" in by_text or "<|calls|>" in by_text))
        or (("<|call|>" in by_text or "<|calls|>" in by_text) and "<|flush|>" in by_text)
    ):
        eog.discard(by_text["<|end|>"])
        attrs[by_text["<|end|>"]] = ATTR_USER_DEFINED
    # gemma4 and plamo have a normal </s>.
    if "</s>" in by_text and ("<|tool_response>" in by_text or "<|plamo:eos|>" in by_text):
        eog.discard(by_text["</s>"])
        attrs[by_text["</s>"]] = ATTR_NORMAL

    _strip_attrs(to_id, attrs, md)
    return frozenset(eog)


def _strip_attrs(to_id: dict[str, int], attrs: np.ndarray, md: dict[str, Any]) -> None:
    """Whitespace that llama.cpp strips around some special tokens, chosen by model name."""
    name = str(md.get("general.name", "")).lower()
    pre = str(md.get("tokenizer.ggml.pre", ""))
    arch = str(md.get("general.architecture", ""))
    if any(p in pre for p in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
        a in arch for a in ("nomic-bert-moe", "jina-bert-v3")
    ):
        if "<mask>" in to_id:
            attrs[to_id["<mask>"]] |= ATTR_LSTRIP
    elif "phi-3" in name or "phi3" in name:
        special = (attrs & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)) != 0
        attrs[special] |= ATTR_RSTRIP
        if "</s>" in to_id:
            attrs[to_id["</s>"]] |= ATTR_RSTRIP
        for text in ("<unk>", "<s>", "<|endoftext|>"):
            if text in to_id:
                attrs[to_id[text]] &= ~ATTR_RSTRIP
    elif "modern-bert" in name and "[MASK]" in to_id:
        attrs[to_id["[MASK]"]] |= ATTR_LSTRIP


def _build_bpe(to_id: dict[str, int], merges: Any, pre: Pre) -> Any:
    """A HuggingFace tokenizer doing llama.cpp's split-then-merge for one text fragment."""
    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if not isinstance(merges, list):
        raise ModelError("model.missing_key", "metadata key 'tokenizer.ggml.merges' is missing")
    # A merge is "left right", split at the first space after the first character (the left
    # side may itself be a space, which the plain split below would get wrong).
    if any(m.startswith(" ") for m in merges):
        pairs = [(m[:i], m[i + 1 :]) for m in merges if (i := m.find(" ", 1)) > 0]
    else:
        pairs = [tuple(m.split(" ", 1)) for m in merges if " " in m]
    if len(set(pairs)) != len(pairs):
        pairs = list(dict.fromkeys(pairs))  # llama.cpp keeps a repeated pair's first rank
    try:
        try:
            model = models.BPE(vocab=to_id, merges=pairs, ignore_merges=pre.ignore_merges)
        except Exception:
            # HF cannot hold a merge whose parts or result are not tokens; llama.cpp can, though
            # converted vocabularies never have one. Dropping them is the only way to load such
            # a file, and may tokenize it differently from llama.cpp.
            pairs = [p for p in pairs if p[0] in to_id and p[1] in to_id and p[0] + p[1] in to_id]
            model = models.BPE(vocab=to_id, merges=pairs, ignore_merges=pre.ignore_merges)
        hf = HFTokenizer(model)
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    except Exception as e:  # the library raises plain Exception for bad vocabularies
        raise ModelError("model.bad_tokenizer", f"cannot build the BPE tokenizer: {e}") from e
    return hf


def _decode_bpe_text(text: str) -> bytes:
    """Byte-level token text -> its bytes; characters outside the byte alphabet are marked the
    way llama.cpp marks them."""
    try:
        return bytes(_BYTE_OF_SYMBOL[c] for c in text)
    except KeyError:
        out = bytearray()
        for c in text:
            b = _BYTE_OF_SYMBOL.get(c)
            if b is not None:
                out.append(b)
            else:
                out += f"[UNK_BYTE_0x{c.encode().hex()}{text}]".encode()
        return bytes(out)
