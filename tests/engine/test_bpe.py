"""engine.bpe: the flat-table BPE against its plain Python twin and against `tokenizers`' BPE
(an independent implementation), on the default model's vocabulary and the committed
Qwen3.5/3.6 slice; the vocabulary index; special tokens found through the index.

(End to end, engine.tokenizer runs this BPE against llama.cpp's ids in test_tokenizer.py.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models as hf_models
from tokenizers import pre_tokenizers as hf_pre

from engine import bpe
from engine import tokenizer as tokenizer_module
from engine.bpe import BYTE_CHARS, BytePairEncoder, encode_pieces_ref
from engine.string_array import StringArray
from engine.tokenizer import _PRE, Tokenizer
from tools.make_tokenizer_expected import read_meta

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer"

ALPHABET = ("abcdefghij klmnopqrstuvwxyz ABCXYZ 0123456789 .,;:!?'\"()[]{}\n\t  éèüß日本語中文한국어"
            "🙂🚀—–…ǅ\u0301\u200b")


def _vocab(meta) -> tuple[StringArray, StringArray, bool, str]:
    tokens = meta["tokenizer.ggml.tokens"]
    merges = meta["tokenizer.ggml.merges"]
    pre = meta.get("tokenizer.ggml.pre", "")
    return StringArray.from_strings(tokens), StringArray.from_strings(merges), _PRE[pre][1], pre


@pytest.fixture(scope="module", params=["smollm2", "qwen36_16k"])
def vocab(request, smol_meta_path):
    path = smol_meta_path if request.param == "smollm2" else FIXTURES / "qwen36_16k.gguf"
    tokens, merges, ignore, pre = _vocab(read_meta(path))
    enc = BytePairEncoder(tokens, merges, ignore)
    token_list = list(tokens)
    ids = {t: i for i, t in enumerate(token_list)}
    ranks = {}
    for r, m in enumerate(merges):
        cut = m.find(" ", 1)
        a, b = m[:cut], m[cut + 1:]
        if cut > 0 and a in ids and b in ids and a + b in ids and (ids[a], ids[b]) not in ranks:
            ranks[(ids[a], ids[b])] = r
    split = hf_pre.Sequence([hf_pre.Split(Regex(r), behavior="isolated") for r in _PRE[pre][0]])
    return dict(enc=enc, ids=ids, ranks=ranks, split=split, merges=merges, ignore=ignore, pre=pre)


@pytest.fixture(scope="module")
def smol_meta_path(request):
    import os

    env = os.environ.get("DELTATALK_TEST_MODEL")
    if env:
        return Path(env)
    local = Path("/work/dl/smollm2.gguf")
    return local if local.exists() else request.getfixturevalue("default_model_path")


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 120))) for _ in range(n)]
    # long single pieces: the merge heap's worst cases
    texts += ["a" * 3000, "ab" * 1500, " " * 700, "1234567890" * 50, "ſ" * 400,
              json.dumps({"k": list(range(200))})]
    return texts


def _pieces(split, text: str) -> list[bytes]:
    return [p.encode("utf-8") for p, _ in split.pre_tokenize_str(text)]


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_kernel_matches_python_twin(vocab, ignore_merges):
    enc = vocab["enc"]
    enc.ignore_merges = ignore_merges
    try:
        for text in _random_texts(150):
            pieces = _pieces(vocab["split"], text)
            want = encode_pieces_ref(pieces, vocab["ids"], vocab["ranks"], ignore_merges)
            assert enc.encode_pieces(pieces) == want, text[:60]
    finally:
        enc.ignore_merges = vocab["ignore"]


def test_kernel_matches_tokenizers_bpe(vocab):
    """The Rust BPE of `tokenizers`, built from the same vocabulary and merges, agrees."""
    merges = []
    for m in vocab["merges"]:
        cut = m.find(" ", 1)
        a, b = m[:cut], m[cut + 1:]
        if cut > 0 and a in vocab["ids"] and b in vocab["ids"] and a + b in vocab["ids"]:
            merges.append((a, b))
    hf = HFTokenizer(hf_models.BPE(vocab=vocab["ids"], merges=merges, ignore_merges=vocab["ignore"]))
    hf.pre_tokenizer = hf_pre.Sequence([*(hf_pre.Split(Regex(r), behavior="isolated") for r in _PRE[vocab["pre"]][0]),
                                        hf_pre.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                                         use_regex=False)])
    texts = _random_texts(200, seed=1) + [Path(tokenizer_module.__file__).read_text()]
    for text in texts:
        assert vocab["enc"].encode_pieces(_pieces(vocab["split"], text)) == \
            hf.encode(text, add_special_tokens=False).ids, text[:60]


def test_vocabulary_index_finds_every_token_and_nothing_else(vocab):
    enc, ids = vocab["enc"], vocab["ids"]
    for text, i in ids.items():
        assert enc.token_to_id(text) == i
    for text in ("", "not a token at all 12345", "\x00", "Ġ" * 300 + "q"):
        assert enc.token_to_id(text) is None


def test_merge_table_holds_the_ranks(vocab):
    enc = vocab["enc"]
    assert enc.n_merges == len(vocab["ranks"])
    for (a, b), r in list(vocab["ranks"].items())[::97]:
        assert enc.merge_rank(a, b) == r
    assert enc.merge_rank(0, 0) is None or (0, 0) in vocab["ranks"]


def test_tables_are_compact(vocab):
    """Flat tables: tens of bytes per token and merge (tokenizers' BPE: ~300)."""
    enc = vocab["enc"]
    assert enc.nbytes < 64 * (len(enc.tokens) + len(vocab["merges"]))


def test_tokens_in_matches_substring_search(vocab):
    enc, ids = vocab["enc"], vocab["ids"]
    rng = np.random.default_rng(3)
    wanted = rng.random(len(ids)) < 0.3
    texts = list(ids)
    for k in range(40):
        text = "".join(texts[i] for i in rng.integers(0, len(texts), 6)) + " plain text"
        data = text.encode("utf-8")
        sizes = np.unique([len(t.encode("utf-8")) for t, i in ids.items() if wanted[i]])
        want = sorted(i for t, i in ids.items() if wanted[i] and t.encode("utf-8") in data)
        assert enc.tokens_in(data, sizes, wanted) == want


def _tiny(tokens, merges, ignore=False):
    return BytePairEncoder(StringArray.from_strings(tokens), StringArray.from_strings(merges), ignore)


def test_duplicate_tokens_are_refused():
    with pytest.raises(ValueError, match=r"duplicate token in vocabulary: 'ab' has ids 1 and 3"):
        _tiny(["a", "ab", "b", "ab"], [])


def test_unusable_merges_are_skipped_and_missing_bytes_dropped():
    # "a b" and "ab c" usable; "x y" names unknown tokens; "abc" has no space; "b c" makes no token
    enc = _tiny(["a", "b", "c", "ab", "abc"], ["x y", "abc", "a b", "b c", "ab c", "a b"])
    assert enc.n_merges == 2
    assert enc.merge_rank(0, 1) == 2 and enc.merge_rank(3, 2) == 4   # a repeated merge keeps its first rank
    assert enc.encode_pieces([b"abc", b"cab", b"ad", b"zz"]) == [4, 2, 3, 0]   # d, z: no token, dropped
    vocab = {t: i for i, t in enumerate(["a", "b", "c", "ab", "abc"])}
    assert encode_pieces_ref([b"abc", b"cab", b"ad", b"zz"], vocab, {(0, 1): 2, (3, 2): 4}) == [4, 2, 3, 0]


def test_ignore_merges_takes_whole_pieces():
    # "bc" is a token but no merge makes it: only ignore_merges emits it for the piece "bc"
    tokens = ["a", "b", "c", "bc", BYTE_CHARS[ord(" ")], BYTE_CHARS[ord(" ")] + "a"]
    enc = _tiny(tokens, [f"{BYTE_CHARS[32]} a"])
    assert enc.encode_pieces([b"bc", b" a"]) == [1, 2, 5]
    enc.ignore_merges = True
    assert enc.encode_pieces([b"bc", b" a"]) == [3, 5]


def test_specials_found_through_the_index_equal_the_scan(monkeypatch):
    """Vocabularies with many special tokens (padded ones) look specials up in the index;
    the result equals the per-special scan, checked against llama.cpp's fixture ids."""
    meta = read_meta(FIXTURES / "qwen36_16k.gguf")
    doc = json.loads((FIXTURES / "qwen36_16k_expected.json").read_text())
    monkeypatch.setattr(tokenizer_module, "_SPECIALS_BY_INDEX", 0)
    tok = Tokenizer.from_metadata(meta)
    cases = doc["vocabs"]["qwen36_16k"]["cases"]
    assert any(c["parse_special"] and "<|" in c["text"] for c in cases)
    for c in cases:
        assert tok.encode(c["text"], add_special=c["add_special"], parse_special=c["parse_special"]) == c["ids"]


def test_kernel_constants_match_the_byte_map():
    for b, ch in enumerate(BYTE_CHARS):
        e = ch.encode("utf-8")
        assert bytes(bpe.BYTE_UTF8[b, : bpe.BYTE_UTF8_LEN[b]]) == e
    assert len(set(BYTE_CHARS)) == 256
