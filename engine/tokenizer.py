"""The GGUF vocabulary as a tokenizer that gives llama.cpp's token ids.

Two vocabulary kinds are supported, chosen by `tokenizer.ggml.model`:

- ``gpt2``: byte-level BPE. The text is split by the regexes llama.cpp uses for
  `tokenizer.ggml.pre` (a `tokenizers` pre-tokenizer: Rust regexes with Unicode classes),
  and each piece is merged by `engine.bpe.BytePairEncoder` over flat tables built from
  `tokenizer.ggml.tokens` + `tokenizer.ggml.merges`.
- ``llama``: SentencePiece-style vocabulary (Phi-3, Llama 2). llama.cpp does not run
  SentencePiece; it merges adjacent symbols greedily by token score (ties: leftmost)
  and falls back to ``<0xXX>`` byte tokens. That algorithm is implemented here.

Everything around the BPE follows llama.cpp's `llama-vocab.cpp` semantics: token
attributes from `token_type`, the EOT/EOG/FIM auto-detection by token text (which can
turn a token into a control token), splitting the text on special tokens (longest
first; control and unknown tokens only when `parse_special`), BOS/EOS per the
`add_*_token` keys with llama.cpp's defaults, token pieces and `llama_detokenize`.
"""

from __future__ import annotations

import codecs
import heapq
from collections.abc import Iterable

from tokenizers import Regex
from tokenizers import pre_tokenizers as _pre

import numpy as np

from engine.bpe import BYTE_CHARS, BytePairEncoder
from engine.string_array import StringArray

__all__ = ["Tokenizer", "StreamDecoder", "SUPPORTED_MODELS", "SUPPORTED_PRE"]

# llama_token_attr bits (llama.h)
A_UNDEFINED = 0
A_UNKNOWN = 1 << 0
A_UNUSED = 1 << 1
A_NORMAL = 1 << 2
A_CONTROL = 1 << 3
A_USER_DEFINED = 1 << 4
A_BYTE = 1 << 5
A_LSTRIP = 1 << 7
A_RSTRIP = 1 << 8

# tokenizer.ggml.token_type values -> attributes
_TYPE_ATTR = {0: A_UNDEFINED, 1: A_NORMAL, 2: A_UNKNOWN, 3: A_CONTROL, 4: A_USER_DEFINED,
              5: A_UNUSED, 6: A_BYTE}

_HIDDEN = A_UNKNOWN | A_CONTROL          # what a piece with special=False leaves out
_SPECIAL_CACHE = A_CONTROL | A_USER_DEFINED | A_UNKNOWN   # split out of the text first
_ASCII_SPACE = " \t\n\v\f\r"             # C isspace()

# ---------------------------------------------------------------------------------------
# pre-tokenizer regexes (as llama.cpp writes them for its own regex engine)

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_RE_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_DEFAULT = ((r"[\p{P}\$\+<=>\^~\|]+", _RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False, None, True)
_GPT2 = ((_RE_GPT2,), False, None, True)
_SMOLLM = ((r"\p{N}", _RE_GPT2), False, None, True)
_LLAMA3 = ((_RE_LLAMA3,), True, True, True)
_DBRX = ((_RE_LLAMA3,), False, None, True)
_QWEN2 = ((_RE_QWEN2,), False, None, True)
_QWEN35 = ((_RE_QWEN35,), False, None, False)


def _no_clean(p):
    return (p[0], p[1], p[2], False)


# tokenizer.ggml.pre -> (regexes, ignore_merges, add_bos default (None: keep), clean_spaces)
_PRE: dict[str, tuple] = {
    "": _DEFAULT, "default": _DEFAULT,
    **{k: _GPT2 for k in ("gpt-2", "phi-2", "mpt", "olmo", "jina-es", "jina-de", "gigachat",
                          "a.x-4.0", "mellum", "exaone4")},
    **{k: _SMOLLM for k in ("starcoder", "refact", "codeshell", "exaone", "minerva-7b")},
    "smollm": _no_clean(_SMOLLM), "command-r": _no_clean(_SMOLLM),
    **{k: _LLAMA3 for k in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                            "midm-2.0", "lfm2")},
    "dbrx": _DBRX, "smaug-bpe": _DBRX,
    **{k: _no_clean(_QWEN2) for k in ("qwen2", "deepseek-r1-qwen")},
    "stablelm2": _QWEN2, "megrez": _QWEN2,
    "qwen35": _QWEN35,
}

SUPPORTED_MODELS = ("gpt2", "llama")
SUPPORTED_PRE = tuple(sorted(k for k in _PRE if k))

# texts llama.cpp uses to auto-detect special tokens (llama-vocab.cpp, `load`)
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
              "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<｜end▁of▁sentence｜>", "[e~[")

_KEY = "tokenizer.ggml."
# above this many special tokens, find the ones in a text through the vocabulary index
_SPECIALS_BY_INDEX = 64


_BYTE_ENC = dict(enumerate(BYTE_CHARS))     # GPT-2's reversible byte -> character map
_BYTE_DEC = {c: b for b, c in _BYTE_ENC.items()}


def _as_list(v) -> list:
    return v.tolist() if hasattr(v, "tolist") else list(v)


class Tokenizer:
    """Encode/decode with the exact ids llama.cpp gives for the same GGUF vocabulary."""

    def __init__(self, meta: dict):
        model = meta.get(_KEY + "model")
        if model not in SUPPORTED_MODELS:
            raise ValueError(f"unsupported tokenizer model {model!r} "
                             f"(supported: {', '.join(SUPPORTED_MODELS)})")
        tokens = meta.get(_KEY + "tokens")
        if isinstance(tokens, StringArray):   # a big vocabulary, still in the file: keep it compact
            tokens = tokens.detached() if not len(tokens.empty_indices()) else list(tokens)
        elif not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError("tokenizer.ggml.tokens is missing or not a list of strings")
        if not len(tokens):
            raise ValueError("tokenizer.ggml.tokens is missing or not a list of strings")
        n = len(tokens)
        self.model = model
        self.is_spm = model == "llama"
        if isinstance(tokens, list):
            tokens = list(tokens)
            for i, t in enumerate(tokens):
                if not t:
                    tokens[i] = f"[EMPTY_{i}]"
        self._bpe: BytePairEncoder | None = None
        self._ids: dict[str, int] = {}   # SPM only (byte-level BPE looks up through self._bpe)
        if self.is_spm:   # the SPM merge loop looks texts up from Python: a dict
            self._texts = tokens
            self._ids = {t: i for i, t in enumerate(tokens)}
            if len(self._ids) != n:
                seen: dict[str, int] = {}
                for i, t in enumerate(tokens):
                    if t in seen:
                        raise ValueError(f"duplicate token in vocabulary: {t!r} has ids {seen[t]} and {i}")
                    seen[t] = i
        else:             # byte-level BPE: flat tables, no per-token Python objects
            if not isinstance(tokens, StringArray):
                tokens = StringArray.from_strings(tokens)
            merges = meta.get(_KEY + "merges")
            if isinstance(merges, list) and all(isinstance(m, str) for m in merges):
                merges = StringArray.from_strings(merges)
            elif not isinstance(merges, StringArray):
                raise ValueError("tokenizer.ggml.merges is missing or not a list of strings")
            self._texts = tokens

        types = meta.get(_KEY + "token_type")
        if types is not None:
            if len(types) < n:
                raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
            table = np.zeros(8, np.uint16)
            for k, v in _TYPE_ATTR.items():
                table[k] = v
            types = np.asarray(types[:n], np.int64)
            # one uint16 per token (a list of ints would cost 8 bytes + an object per token)
            self._attr = np.where((types >= 0) & (types < len(table)), table[np.clip(types, 0, 7)],
                                  A_UNDEFINED).astype(np.uint16)
        else:
            self._attr = np.full(n, A_NORMAL, np.uint16)

        if self.is_spm:
            scores = meta.get(_KEY + "scores")
            if scores is None:
                self._scores = [0.0] * n
            else:
                scores = _as_list(scores)
                if len(scores) < n:
                    raise ValueError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
                self._scores = [float(s) for s in scores[:n]]

        # --- flags and defaults, as llama.cpp sets them per vocabulary type
        pre = meta.get(_KEY + "pre", "")
        if not isinstance(pre, str):
            raise ValueError("tokenizer.ggml.pre is not a string")
        self.pre = pre
        self.ignore_merges = False
        unk: int | None
        if self.is_spm:
            bos, eos, unk = 1, 2, 0
            self.add_space_prefix = True
            self.clean_spaces = False
            self.add_bos, self.add_eos = True, False
        else:
            if pre not in _PRE:
                raise ValueError(f"unsupported pre-tokenizer {pre!r} for a gpt2 vocabulary "
                                 f"(supported: {', '.join(SUPPORTED_PRE)})")
            regexes, self.ignore_merges, add_bos, self.clean_spaces = _PRE[pre]
            assert isinstance(tokens, StringArray) and isinstance(merges, StringArray)   # made so above
            self._bpe = BytePairEncoder(tokens, merges, self.ignore_merges)
            self._split = _pre.Sequence([_pre.Split(Regex(r), behavior="isolated") for r in regexes])
            bos, eos, unk = 11, 11, None
            self.add_space_prefix = False
            self.add_bos, self.add_eos = bool(add_bos), False
        space_prefix = meta.get(_KEY + "add_space_prefix")
        if isinstance(space_prefix, (bool, int)):
            self.add_space_prefix = bool(space_prefix)

        def in_range(x):
            return x if x is not None and 0 <= x < n else None

        ids = {"bos": in_range(bos), "eos": in_range(eos), "unk": in_range(unk)}
        for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("eot", "eot_token_id"),
                          ("eom", "eom_token_id"), ("unk", "unknown_token_id"), ("sep", "seperator_token_id"),
                          ("pad", "padding_token_id"), ("mask", "mask_token_id"),
                          ("fim_pre", "fim_pre_token_id"), ("fim_suf", "fim_suf_token_id"),
                          ("fim_mid", "fim_mid_token_id"), ("fim_pad", "fim_pad_token_id"),
                          ("fim_rep", "fim_rep_token_id"), ("fim_sep", "fim_sep_token_id"),
                          ("fim_pre", "prefix_token_id"), ("fim_suf", "suffix_token_id"),
                          ("fim_mid", "middle_token_id")):
            val = meta.get(_KEY + key)
            if isinstance(val, bool) or not isinstance(val, int):
                continue
            if 0 <= val < n:
                ids[name] = val
        for key, flag in (("add_bos_token", "add_bos"), ("add_eos_token", "add_eos")):
            val = meta.get(_KEY + key)
            if isinstance(val, (bool, int)):
                setattr(self, flag, bool(val))
        if self.add_bos and ids.get("bos") is None:
            raise ValueError("tokenizer.ggml.add_bos_token is true, but tokenizer.ggml.bos_token_id is not set")
        if self.add_eos and ids.get("eos") is None:
            raise ValueError("tokenizer.ggml.add_eos_token is true, but tokenizer.ggml.eos_token_id is not set")

        self._detect_special(ids)
        self.bos_id: int | None = ids.get("bos")
        self.eos_id: int | None = ids.get("eos")
        self.eot_id: int | None = ids.get("eot")
        self.eom_id: int | None = ids.get("eom")
        self.unk_id: int | None = ids.get("unk")
        self.pad_id: int | None = ids.get("pad")

        # special tokens, split out of the text longest first
        attr = self._attr
        specials = np.flatnonzero(attr & _SPECIAL_CACHE)
        sizes = np.array([self._byte_length(int(i)) for i in specials], np.int64)
        self._special_order = specials[np.lexsort((specials, -sizes))]
        self._special_sizes = np.unique(sizes)

        name = meta.get("general.name", "")
        if isinstance(name, str) and ("phi-3" in name.lower() or "phi3" in name.lower()):
            attr[specials] |= A_RSTRIP
            for t, on in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
                tid = self.token_to_id(t)
                if tid is not None:
                    attr[tid] = (int(attr[tid]) | A_RSTRIP) if on else (int(attr[tid]) & ~A_RSTRIP)

        self._piece_cache: dict[int, bytes] = {}

    # -- construction helpers ------------------------------------------------------------

    @classmethod
    def from_metadata(cls, meta: dict) -> Tokenizer:
        return cls(meta)

    def _detect_special(self, ids: dict):
        """llama.cpp's detection of EOT/EOM/FIM/EOG tokens by their text."""
        attr = self._attr

        def force_control(i):
            attr[i] |= A_CONTROL

        def first(texts):
            for t in texts:
                i = self.token_to_id(t)
                if i is not None:
                    return i
            return None

        if ids.get("eot") is None:
            ids["eot"] = first(_EOT_TEXTS)
            if ids["eot"] is not None:
                force_control(ids["eot"])
        if ids.get("eom") is None:
            ids["eom"] = first(_EOM_TEXTS)
            if ids["eom"] is not None:
                force_control(ids["eom"])
        for name, texts in _FIM_TEXTS.items():
            if ids.get(name) is None:
                ids[name] = first(texts)
                if ids[name] is not None:
                    force_control(ids[name])
        for i in np.flatnonzero(((attr & A_CONTROL) != 0) & ((attr & A_UNUSED) == 0)):
            if "unused" in self._texts[i]:
                attr[i] |= A_UNUSED

        eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids.get(k) is not None}
        for t in _EOG_TEXTS:
            tid = self.token_to_id(t)
            if tid is not None:
                eog.add(tid)
                force_control(tid)
        for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            tid = self.token_to_id(t)
            if tid is not None:
                attr[tid] = A_USER_DEFINED
        for k in ("eos", "eot", "eom"):
            if ids.get(k) is not None:
                eog.add(ids[k])
        by_text = {self._texts[i]: i for i in eog}
        if "<|end|>" in by_text and (("<|return|>" in by_text and "<|call|>" in by_text)
                                     or ("<|calls|>" in by_text and "<|flush|>" in by_text)):
            tid = by_text["<|end|>"]
            eog.discard(tid)
            attr[tid] = A_USER_DEFINED
        if "<|tool_response>" in by_text and "</s>" in by_text:
            tid = by_text["</s>"]
            eog.discard(tid)
            attr[tid] = A_NORMAL
        self.eog_ids: frozenset[int] = frozenset(eog)

    # -- properties ----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._texts)

    def token_text(self, token_id: int) -> str:
        """The token's string as stored in the GGUF vocabulary."""
        return self._texts[token_id]

    def token_to_id(self, text: str) -> int | None:
        if self._bpe is not None:
            return self._bpe.token_to_id(text)
        return self._ids.get(text)

    def is_special(self, token_id: int) -> bool:
        """Control (and unknown) tokens: the ones `decode(skip_special=True)` leaves out."""
        return bool(self._attr[token_id] & _HIDDEN)

    def is_control(self, token_id: int) -> bool:
        """llama_vocab_is_control (after llama.cpp's text-based overrides)."""
        return bool(self._attr[token_id] & A_CONTROL)

    # -- encoding ------------------------------------------------------------------------

    def _byte_length(self, token_id: int) -> int:
        t = self._texts
        return t.byte_length(token_id) if isinstance(t, StringArray) else len(t[token_id].encode("utf-8"))

    def _specials_in(self, text: str, parse_special: bool) -> list[int]:
        """The special tokens that occur in text, longest first then by id (llama.cpp's order)."""
        attr, texts = self._attr, self._texts
        if self._bpe is not None and len(self._special_order) > _SPECIALS_BY_INDEX:
            # many specials (padded vocabularies): look every substring of a special's length
            # up in the vocabulary index instead of searching the text once per special
            wanted = (attr & _SPECIAL_CACHE) != 0
            if not parse_special:
                wanted &= (attr & (A_CONTROL | A_UNKNOWN)) == 0
            found = self._bpe.tokens_in(text.encode("utf-8"), self._special_sizes, wanted)
            return sorted(found, key=lambda i: (-self._byte_length(i), i))
        out = []
        for sid in self._special_order:
            if not parse_special and attr[sid] & (A_CONTROL | A_UNKNOWN):
                continue
            if texts[sid] in text:
                out.append(int(sid))
        return out

    def _partition(self, text: str, parse_special: bool) -> list:
        """Split text on special tokens: a list of str (raw text) and int (token ids)."""
        frags: list = [text]
        attr, texts = self._attr, self._texts
        for sid in self._specials_in(text, parse_special):
            a = int(attr[sid])
            s = texts[sid]
            out: list = []
            for f in frags:
                if isinstance(f, int) or s not in f:
                    out.append(f)
                    continue
                start, end = 0, len(f)
                while True:
                    j = f.find(s, start)
                    if j < 0:
                        if start < end:
                            out.append(f[start:])
                        break
                    left = f[start:j]
                    if a & A_LSTRIP:
                        left = left.rstrip(_ASCII_SPACE)
                    if left:
                        out.append(left)
                    out.append(sid)
                    start = j + len(s)
                    if a & A_RSTRIP:
                        while start < end and f[start] in _ASCII_SPACE:
                            start += 1
            frags = out
        return frags

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids for `text`, as llama_tokenize(add_special, parse_special) gives them."""
        if not isinstance(text, str):
            raise TypeError("text must be a str")
        frags = self._partition(text, parse_special) if text else []
        out: list[int] = []
        if add_special and self.add_bos and self.bos_id is not None:   # add_bos implies an id (checked)
            out.append(self.bos_id)
        if self.is_spm:
            prev_special = True
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                    prev_special = True
                else:
                    if self.add_space_prefix and prev_special:
                        f = " " + f
                    self._spm_tokenize(f.replace(" ", "\u2581"), out)
                    prev_special = False
        else:
            bpe = self._bpe
            assert bpe is not None   # every non-SPM vocabulary is byte-level BPE
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                else:
                    out.extend(bpe.encode_pieces([p.encode("utf-8") for p, _ in
                                                        self._split.pre_tokenize_str(f)]))
        if add_special and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _spm_tokenize(self, text: str, out: list[int]):
        """llama.cpp's SPM merge: repeatedly join the adjacent pair whose concatenation is
        the highest-scoring token (ties: leftmost), then map symbols to ids / byte tokens."""
        n = len(text)
        if n == 0:
            return
        ids, scores = self._ids, self._scores
        size = [1] * n           # length of the symbol starting at i (0: merged away)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list = []

        def add(left, right):
            if left < 0 or right < 0:
                return
            t = ids.get(text[left:right + size[right]])
            if t is not None:
                heapq.heappush(heap, (-scores[t], left, right, size[left] + size[right]))

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, total = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != total:
                continue
            size[left] = total
            size[right] = 0
            nx = nxt[right]
            nxt[left] = nx
            if nx >= 0:
                prev[nx] = left
            add(prev[left], left)
            add(left, nx)
        i = 0
        while i != -1:
            piece = text[i:i + size[i]]
            t = ids.get(piece)
            if t is not None:
                out.append(t)
            else:
                for b in piece.encode("utf-8"):
                    out.append(self._byte_token(b))
            i = nxt[i]

    def _byte_token(self, b: int) -> int:
        t = self._ids.get(f"<0x{b:02X}>")
        if t is None and b < 0x80:
            t = self._ids.get(chr(b))
        if t is None:
            if self.unk_id is None:
                raise ValueError(f"the vocabulary has no byte token for 0x{b:02X}")
            t = self.unk_id
        return t

    # -- decoding ------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (llama_token_to_piece with special=True)."""
        p = self._piece_cache.get(token_id)
        if p is not None:
            return p
        if not 0 <= token_id < len(self._texts):
            raise ValueError(f"token id {token_id} is out of range (vocabulary of {len(self._texts)})")
        a, t = self._attr[token_id], self._texts[token_id]
        if a & (_HIDDEN | A_USER_DEFINED):
            p = t.encode("utf-8")
        elif a & A_NORMAL:
            if self.is_spm:
                p = t.replace("\u2581", " ").encode("utf-8")
            else:
                p = self._byte_decode(t)
        elif a & A_BYTE:
            try:
                p = bytes([int(t[3:5], 16) & 0xFF])
            except ValueError:
                p = b"\x00"
        else:
            p = b""
        self._piece_cache[token_id] = p
        return p

    @staticmethod
    def _byte_decode(t: str) -> bytes:
        try:
            return bytes(_BYTE_DEC[c] for c in t)
        except KeyError:
            out = bytearray()
            for c in t:
                b = _BYTE_DEC.get(c)
                if b is not None:
                    out.append(b)
                else:
                    out += b"[UNK_BYTE_0x" + c.encode("utf-8").hex().encode() + t.encode("utf-8") + b"]"
            return bytes(out)

    def piece(self, token_id: int, special: bool = True) -> bytes:
        """llama_token_to_piece: empty for control/unknown tokens unless `special`."""
        if not special and self._attr[token_id] & _HIDDEN:
            if not 0 <= token_id < len(self._texts):
                raise ValueError(f"token id {token_id} is out of range")
            return b""
        return self.token_bytes(token_id)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """llama_detokenize(remove_special=skip_special, unparse_special=not skip_special)."""
        ids = [int(i) for i in ids]
        remove_space = self.add_space_prefix
        if skip_special and self.add_bos and ids and ids[0] == self.bos_id:
            remove_space = False
            ids = ids[1:]
        if skip_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        out = bytearray()
        for i in ids:
            p = self.piece(i, not skip_special)
            if remove_space and p[:1] == b" ":
                p = p[1:]
            remove_space = False
            out += p
        if self.clean_spaces:
            out = _clean_spaces(out)
        return out.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    def __repr__(self):
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, eog={sorted(self.eog_ids)})")


def _clean_spaces(t: bytearray) -> bytearray:
    """llama_detokenize's clean_up_tokenization_spaces passes, on bytes."""
    sp, ap = 0x20, 0x27
    # 1: drop the space before ? ! . ,
    out = bytearray(t[:1])
    for i in range(1, len(t)):
        if t[i - 1] == sp and t[i] in b"?!.," and out:
            out.pop()
        out.append(t[i])
    # 2: " ' " -> "'" (the space after the apostrophe is consumed once)
    t = bytearray(out)
    out = bytearray(t[:1])
    i = 1
    while i < len(t):
        x = t[i]
        if x == ap and i + 1 < len(t) and t[i - 1] == sp and t[i + 1] == sp:
            out.pop()
            i += 1
            t[i] = 0
        out.append(x)
        i += 1
    # 3: drop the space before 's 'm 're 've
    t = out
    out = bytearray(t[:1])
    n = len(t)
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == sp and x == ap and i + 1 < n:
            x1 = t[i + 1]
            if x1 in b"sm" or (i + 2 < n and (x1, t[i + 2]) in ((0x72, 0x65), (0x76, 0x65))):
                out.pop()
        out.append(x)
    return out


class StreamDecoder:
    """Incremental detokenizer: `feed` returns only complete UTF-8 text, holding back the
    bytes of a character split across tokens; `flush` returns the rest (U+FFFD for an
    incomplete tail). Invalid byte sequences come out as U+FFFD as soon as they are known
    to be invalid."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._special = not skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._dec.decode(self._tok.piece(int(token_id), self._special))

    def flush(self) -> str:
        text = self._dec.decode(b"", final=True)
        self._dec.reset()
        return text
