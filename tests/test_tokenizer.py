"""OPTTokenizer against the published OPT ids, transformers' tokenizer and a pure-Python GPT-2 BPE.

Expected values come from the OPT facts (published ids), from `transformers` (AutoTokenizer on the
same files, i.e. GPT2Tokenizer) and from an independent pure-Python implementation of GPT-2's BPE
(OpenAI's encoder.py algorithm) written below; never from the code under test.
"""

from __future__ import annotations

import json
import random
import shutil
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from hub_cache import make_hub_cache

from optlite.tokenizer import BatchEncoding, OPTTokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "opt_tokenizer"
FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
needs_files = pytest.mark.skipif(
    not all((SHARED / f).is_file() for f in FILES), reason=f"OPT tokenizer files not found in {SHARED}"
)

PUBLISHED = {  # OPT_FACTS.md §4
    "Hello, my dog is cute": [2, 31414, 6, 127, 2335, 16, 11962],
    "A photo of a cat": [2, 250, 1345, 9, 10, 4758],
    "This is a test": [2, 713, 16, 10, 1296],
    "I like you.": [2, 100, 101, 47, 4],
}


# ---------------------------------------------------------------------- a varied, deterministic corpus

# fmt: off
FRAGMENTS = [
    # English, contractions
    "Hello", "world", "the", "quick brown fox", "jumps", "don't", "I'm", "we'll", "it's", "they've",
    # Latin with accents
    "café", "naïve", "résumé", "Ærøskøbing", "straße", "Łódź", "São Paulo", "façade", "über", "ÉCOLE",
    # Cyrillic, Greek, CJK, Korean
    "Привет", "мир", "Москва", "Ελληνικά", "αβγ", "Καλημέρα",
    "中文", "你好世界", "日本語のテキスト", "한국어",
    # Arabic, Hindi, Hebrew, Thai, Vietnamese
    "مرحبا", "بالعالم", "नमस्ते", "हिन्दी", "שלום", "ไทย", "Tiếng Việt",
    # emoji (skin tones, ZWJ families, flags, variation selectors), symbols, odd spaces
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "👩🏽‍💻", "❤️", "🇫🇷", "∑∫√∞", "→", "©®™", "\u00a0", "\u200b",
    # code
    "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) { a[i] += 1; }",
    "<div class=\"a\">b</div>", "print('hi')", "x = {'a': [1, 2, 3]}", "SELECT * FROM t WHERE id=42;",
    "#include <stdio.h>", "$HOME/.bashrc",
    # digits and numbers
    "0", "7", "42", "1234567", "3.14159", "-17", "1e-5", "2024-01-31", "12:30", "1,000,000", "0x1F",
    # punctuation, URLs
    "!!!", "...", "?", "--", "(", ")", "\"quoted\"", "'single'", "@user", "#tag", "http://example.com/a?b=c",
    # special-token look-alikes
    "</s>", "<pad>", "<s>", "<unk>", "<mask>", "</s></s>", "a</s>b", "<pad><pad>", "< /s>", "</ s>",
]
SEPARATORS = [" ", " ", " ", "", "  ", "   ", "\n", "\n\n", "\t", " \t ", "\r\n", " \n "]
EDGE_CASES = [
    "", " ", "  ", "\n", "\t", "   trailing   ", "x ", " x", "a  b", "a\n\nb", "\n\n\n", "tab\tsep\t",
    "</s>", "<pad>", "<s>", " </s> ", "</s>hello", "hello</s>", "<s>hello</s>", "a<pad>b", "<pad> x",
    "’", "‘quoted’", "ﬁ ligature", "Ａｂｃ fullwidth", "e\u0301 combining", "\ufeffbom",
]
# fmt: on


def make_corpus(n: int = 2400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    corpus = list(EDGE_CASES)
    while len(corpus) < n:
        parts = [rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12))]
        text = parts[0]
        for part in parts[1:]:
            text += rng.choice(SEPARATORS) + part
        if rng.random() < 0.15:
            text += rng.choice([" ", "  ", "\n", "\t", " \n"])  # trailing whitespace
        if rng.random() < 0.1:
            text = rng.choice([" ", "\n", "  "]) + text  # leading whitespace
        corpus.append(text)
    return corpus


CORPUS = make_corpus()


# ---------------------------------------------------------------------- an independent GPT-2 BPE


class PythonGPT2BPE:
    """OpenAI's GPT-2 encoder.py algorithm (bytes -> unicode, regex split, rank-ordered merges).

    `</s>` and `<pad>` (the special tokens of OPT's config) are split off first, as transformers'
    tokenizers do with added tokens.
    """

    def __init__(self, folder: Path) -> None:
        import regex

        self.encoder = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        bs = (
            list(range(ord("!"), ord("~") + 1))
            + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1))
        )
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        self.byte_encoder = dict(zip(bs, map(chr, cs), strict=True))
        self.pat = regex.compile(
            r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
        )
        self.special = regex.compile(r"(</s>|<pad>)")
        self.bpe = lru_cache(maxsize=None)(self._bpe)

    def _bpe(self, token: str) -> tuple[str, ...]:
        word = tuple(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for chunk in self.special.split(text):
            if chunk in ("</s>", "<pad>"):
                ids.append(self.encoder[chunk])
                continue
            for piece in self.pat.findall(chunk):
                mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                ids.extend(self.encoder[t] for t in self.bpe(mapped))
        return ids


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok() -> OPTTokenizer:
    if not all((SHARED / f).is_file() for f in FILES):
        pytest.skip(f"OPT tokenizer files not found in {SHARED}")
    return OPTTokenizer.from_pretrained(SHARED)


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory):
    """transformers' tokenizer as AutoTokenizer builds it for an OPT hub repo (the 4 files + config.json)."""
    if not all((SHARED / f).is_file() for f in FILES):
        pytest.skip(f"OPT tokenizer files not found in {SHARED}")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("opt_ref")
    for name in FILES:
        (folder / name).symlink_to(SHARED / name)
    # Hub repos ship config.json with model_type "opt"; AutoTokenizer picks the class from it.
    (folder / "config.json").write_text(json.dumps({"model_type": "opt", "vocab_size": 50272}))
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    assert type(reference).__name__ == "GPT2Tokenizer"
    return reference


@pytest.fixture(scope="module")
def py_bpe() -> PythonGPT2BPE:
    pytest.importorskip("regex")
    if not all((SHARED / f).is_file() for f in FILES):
        pytest.skip(f"OPT tokenizer files not found in {SHARED}")
    return PythonGPT2BPE(SHARED)


def ids_and_masks(enc) -> tuple:
    return enc["input_ids"], enc["attention_mask"]


# ---------------------------------------------------------------------- published facts


@needs_files
@pytest.mark.parametrize("text", list(PUBLISHED))
def test_published_ids(tok: OPTTokenizer, text: str) -> None:
    assert tok(text).input_ids == PUBLISHED[text]
    assert tok.encode(text) == PUBLISHED[text]
    assert tok(text, add_special_tokens=False).input_ids == PUBLISHED[text][1:]


@needs_files
def test_special_token_layout(tok: OPTTokenizer) -> None:
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4, 5, 50264]) == [
        "<s>",
        "<pad>",
        "</s>",
        "<unk>",
        ".",
        "Ġthe",
        "<mask>",
    ]
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("</s>", "</s>", "</s>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (2, 2, 2, 1)
    assert tok.vocab_size == 50265 and len(tok) == 50265
    assert tok("").input_ids == [2]  # exactly one </s> prepended, none appended


# ---------------------------------------------------------------------- parity on the corpus


@needs_files
def test_corpus_is_large_and_varied() -> None:
    assert len(CORPUS) >= 2000 and len(set(CORPUS)) > 1900
    for needle in ("</s>", "<pad>", "<s>", "\t", "\n", "‍", "é", "и", "λ", "中", "م", "न", "def "):
        assert any(needle in text for text in CORPUS), needle


@needs_files
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_corpus_ids_match_transformers(tok, ref, add_special_tokens: bool) -> None:
    ours = tok(CORPUS, add_special_tokens=add_special_tokens)
    theirs = ref(CORPUS, add_special_tokens=add_special_tokens)
    assert ids_and_masks(ours) == ids_and_masks(theirs)
    for text in CORPUS[::25]:  # single-string calls and encode take the same path
        assert (
            tok(text, add_special_tokens=add_special_tokens).input_ids
            == ref(text, add_special_tokens=add_special_tokens).input_ids
        )
        assert tok.encode(text, add_special_tokens=add_special_tokens) == ref.encode(
            text, add_special_tokens=add_special_tokens
        )


@needs_files
def test_corpus_ids_match_python_bpe(tok, py_bpe) -> None:
    ours = tok(CORPUS).input_ids
    for text, ids in zip(CORPUS, ours, strict=True):
        assert ids == [2] + py_bpe.encode(text), repr(text)
    for text, ids in PUBLISHED.items():  # the reference itself reproduces the published ids
        assert [2] + py_bpe.encode(text) == ids


@needs_files
def test_special_tokens_inside_text(tok, ref) -> None:
    # transformers makes only the configured special tokens (</s>, <pad>) atomic; <s>, <unk>, <mask> split.
    text = "a</s>b <pad> c<s>d <unk> <mask> x </s> y"
    assert tok(text).input_ids == ref(text).input_ids
    assert tok.convert_ids_to_tokens(tok(text).input_ids)[:7] == [
        "</s>",
        "a",
        "</s>",
        "b",
        "Ġ",
        "<pad>",
        "Ġc",
    ]


@needs_files
@pytest.mark.parametrize("skip", [False, True])
def test_decode_matches_transformers(tok, ref, skip: bool) -> None:
    rows = ref(CORPUS[:600], padding=True).input_ids
    assert tok.batch_decode(rows, skip_special_tokens=skip) == ref.batch_decode(
        rows, skip_special_tokens=skip
    )
    for row in rows[::20]:
        assert tok.decode(row, skip_special_tokens=skip) == ref.decode(row, skip_special_tokens=skip)
        assert tok.decode(torch.tensor(row), skip_special_tokens=skip) == ref.decode(
            row, skip_special_tokens=skip
        )
    tensor = torch.tensor(rows[:8])
    assert tok.batch_decode(tensor, skip_special_tokens=skip) == ref.batch_decode(
        tensor, skip_special_tokens=skip
    )
    rng = random.Random(1)  # random ids: partial UTF-8 byte sequences, specials in odd places
    noise = [[rng.randrange(50265) for _ in range(rng.randint(0, 20))] for _ in range(200)]
    assert tok.batch_decode(noise, skip_special_tokens=skip) == ref.batch_decode(
        noise, skip_special_tokens=skip
    )
    assert tok.decode(5) == ref.decode(5)


@needs_files
def test_decode_round_trips_text(tok) -> None:
    for text in CORPUS[:300]:
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text.replace("</s>", "").replace(
            "<pad>", ""
        )


@needs_files
def test_clean_up_tokenization_spaces(tok, ref) -> None:
    ids = tok.encode("Hello , world . do n't ? I 'm")
    assert ref.clean_up_tokenization_spaces is False and tok.clean_up_tokenization_spaces is False
    assert tok.decode(ids) == ref.decode(ids) == "</s>Hello , world . do n't ? I 'm"
    # transformers 5 ignores an explicit True for BPE tokenizers; we apply its documented clean-up.
    assert tok.decode(ids, clean_up_tokenization_spaces=True) == ref.clean_up_tokenization(ref.decode(ids))


# ---------------------------------------------------------------------- padding and truncation

BATCH = ["Hello, my dog is cute", "A", "", "日本語のテキスト and more words here", "x </s> y <pad>"]
CALLS = [
    {"padding": True},
    {"padding": "longest", "padding_side": "left"},
    {"padding": True, "padding_side": "right"},
    {"padding": "max_length", "max_length": 20},
    {"padding": "max_length", "max_length": 20, "padding_side": "left"},
    {"padding": "max_length", "max_length": 4, "truncation": True},
    {"padding": "max_length", "max_length": 4},  # no truncation: long rows stay long
    {"padding": True, "truncation": True, "max_length": 8, "pad_to_multiple_of": 4},
    {"padding": True, "max_length": 3, "truncation": True, "padding_side": "left"},
    {"truncation": True, "max_length": 3},
    {"truncation": True, "max_length": 1},
    {"max_length": 2},  # transformers: max_length alone truncates
    {"padding": True, "max_length": 2},  # ... but not together with padding=True
    {"padding": True, "pad_to_multiple_of": 8},
    {"padding": True, "add_special_tokens": False},
    {"padding": True, "return_attention_mask": False},
]


@needs_files
@pytest.mark.filterwarnings(
    "ignore:`max_length` is ignored"
)  # transformers' warning for {padding: True, max_length}
@pytest.mark.parametrize("kwargs", CALLS, ids=[str(c) for c in CALLS])
def test_padding_truncation_match_transformers(tok, ref, kwargs: dict) -> None:
    ours, theirs = tok(BATCH, **kwargs), ref(BATCH, **kwargs)
    assert dict(ours) == dict(theirs)
    if len({len(row) for row in theirs["input_ids"]}) > 1:  # ragged: both refuse to make tensors
        with pytest.raises(ValueError):
            ref(BATCH, return_tensors="pt", **kwargs)
        with pytest.raises(ValueError, match="padding=True"):
            tok(BATCH, return_tensors="pt", **kwargs)
    else:
        ours, theirs = tok(BATCH, return_tensors="pt", **kwargs), ref(BATCH, return_tensors="pt", **kwargs)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].dtype == torch.long and torch.equal(ours[key], theirs[key])
    assert tok(BATCH[0], **kwargs) == dict(ref(BATCH[0], **kwargs))


LONG = ["Hello, my dog is cute and it likes to play in the park with the other dogs.", "A photo of a cat",
        "This is a test of windows that overlap, as question answering needs for long contexts."]
WINDOWS = [
    dict(truncation=True, max_length=8, stride=3, return_overflowing_tokens=True),
    dict(truncation=True, max_length=8, stride=0, return_overflowing_tokens=True),
    dict(truncation=True, max_length=10, stride=4, return_overflowing_tokens=True, padding=True),
    dict(truncation=True, max_length=10, stride=4, return_overflowing_tokens=True, padding="max_length"),
    dict(truncation=True, max_length=8, stride=2),  # no overflow asked: plain truncation
    dict(return_overflowing_tokens=True),  # nothing truncated: one row per text
]


@needs_files
@pytest.mark.parametrize("kwargs", WINDOWS, ids=[str(c) for c in WINDOWS])
def test_stride_and_overflowing_tokens_match_transformers(tok, ref, kwargs: dict) -> None:
    assert dict(tok(LONG, **kwargs)) == dict(ref(LONG, **kwargs))
    assert dict(tok(LONG[0], **kwargs)) == dict(ref(LONG[0], **kwargs))


@needs_files
def test_question_answering_windows_match_transformers(tok, ref) -> None:
    questions = ["What does the dog like?", "Who?"]
    kwargs = dict(truncation="only_second", max_length=16, stride=4, return_overflowing_tokens=True,
                  padding="max_length", return_tensors="pt")
    ours, theirs = tok(questions, LONG[::2], **kwargs), ref(questions, LONG[::2], **kwargs)
    assert ours.keys() == theirs.keys() and ours["input_ids"].shape[0] > 2  # several windows per context
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    with pytest.raises(ValueError, match=r"stride \(16\) must be smaller than max_length \(16\)"):
        tok(questions, LONG[::2], **{**kwargs, "stride": 16})


@needs_files
def test_one_tokenizer_shared_by_threads_keeps_each_call_settings(tok) -> None:
    import sys
    import threading

    texts = ["Hello there my friend", "A photo of a cat sitting on a mat"]
    calls = {"left": dict(padding=True, padding_side="left"), "max": dict(padding="max_length", max_length=12),
             "cut": dict(truncation=True, max_length=4), "windows": dict(truncation=True, max_length=5, stride=1,
                                                                        return_overflowing_tokens=True)}
    want = {name: dict(tok(texts, **kw)) for name, kw in calls.items()}
    wrong: list[str] = []

    def work(name: str) -> None:
        for _ in range(400):
            if dict(tok(texts, **calls[name])) != want[name]:
                wrong.append(name)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, between setting options and encoding
    try:
        threads = [threading.Thread(target=work, args=(name,)) for name in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert wrong == []


@needs_files
def test_invalid_text_and_ids_are_named(tok) -> None:
    with pytest.raises(ValueError, match=r"text\[1\] holds a lone surrogate '\\ud800' at character 1"):
        tok(["fine", "a\ud800b"])
    with pytest.raises(ValueError, match=r"text_pair\[0\] holds a lone surrogate"):
        tok(["fine"], ["x\udfff"])
    for call in (lambda: tok.decode([5, -1]), lambda: tok.batch_decode([[5], [-1]]),
                 lambda: tok.convert_ids_to_tokens([-1]), lambda: tok.decode(-3)):
        with pytest.raises(ValueError, match=r"token ids must be ints in \[0, 50265\), got -"):
            call()


@needs_files
def test_padding_side_attribute_and_pairs(tok, ref) -> None:
    left = OPTTokenizer.from_pretrained(SHARED, padding_side="left")
    assert left(BATCH, padding=True) == dict(ref(BATCH, padding=True, padding_side="left"))
    assert tok(BATCH, padding=True) == dict(ref(BATCH, padding=True))  # the shared one is unchanged
    pairs = (["Hello world", "a", "question?"], ["a b c d", "second text here", ""])
    assert tok(*pairs) == dict(ref(*pairs))
    assert tok(*pairs, max_length=5, truncation=True, padding=True) == dict(
        ref(*pairs, max_length=5, truncation=True, padding=True)
    )
    assert tok("Hello world", "a b c d") == dict(ref("Hello world", "a b c d"))


@needs_files
def test_tensors_and_batch_encoding(tok, ref) -> None:
    enc = tok("Hello, my dog is cute", return_tensors="pt")
    assert isinstance(enc, BatchEncoding) and enc.input_ids.shape == (1, 7)
    assert torch.equal(enc["input_ids"], ref("Hello, my dog is cute", return_tensors="pt")["input_ids"])
    assert enc.to("cpu") is enc and enc.attention_mask.device.type == "cpu"
    assert torch.equal(
        tok.encode("This is a test", return_tensors="pt"), ref.encode("This is a test", return_tensors="pt")
    )
    assert set(dict(**enc)) == {"input_ids", "attention_mask"}
    with pytest.raises(AttributeError):
        _ = enc.token_type_ids
    assert tok.convert_tokens_to_ids(["Ġthe", "nope-not-a-token", "</s>"]) == ref.convert_tokens_to_ids(
        ["Ġthe", "nope-not-a-token", "</s>"]
    )
    assert tok.convert_ids_to_tokens([0, 1, 2, 5], skip_special_tokens=True) == ref.convert_ids_to_tokens(
        [0, 1, 2, 5], skip_special_tokens=True
    )
    assert tok.convert_ids_to_tokens(5) == ref.convert_ids_to_tokens(5)
    assert tok.all_special_ids == ref.all_special_ids


# ---------------------------------------------------------------------- save_pretrained round trips


@needs_files
def test_save_pretrained_round_trip(tok, ref, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    written = tok.save_pretrained(tmp_path / "saved")
    assert {p.name for p in written} == {
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == sorted(
        p.name for p in written
    )  # no temp files
    sample = CORPUS[:400]
    expected = ref(sample, padding=True)
    variants = {"tokenizer.json": tmp_path / "saved", "vocab+merges": tmp_path / "no_json"}
    shutil.copytree(tmp_path / "saved", variants["vocab+merges"])
    (variants["vocab+merges"] / "tokenizer.json").unlink()
    for label, folder in variants.items():
        for loaded in (
            transformers.AutoTokenizer.from_pretrained(folder),
            OPTTokenizer.from_pretrained(folder),
        ):
            assert dict(loaded(sample, padding=True)) == dict(expected), (label, type(loaded))
            assert dict(loaded(sample[:50], padding=True, padding_side="left")) == dict(
                ref(sample[:50], padding=True, padding_side="left")
            )
            assert loaded.batch_decode(expected["input_ids"]) == ref.batch_decode(expected["input_ids"])
            assert loaded.batch_decode(expected["input_ids"], skip_special_tokens=True) == ref.batch_decode(
                expected["input_ids"], skip_special_tokens=True
            )
            assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (1, 2, 2)


@needs_files
def test_save_after_padded_call_stores_no_padding(tok, tmp_path: Path) -> None:
    tok(BATCH, padding="max_length", max_length=9, truncation=True)
    tok.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert saved["padding"] is None and saved["truncation"] is None
    assert tok(BATCH[0]).input_ids == PUBLISHED[BATCH[0]]


# ---------------------------------------------------------------------- training

TINY_CORPUS = [
    "The cat sat on the mat. The dog sat on the log.",
    "Cats and dogs are friends; the cat likes the dog.",
    "Le chat est sur le tapis. Der Hund schläft. Собака спит. 猫が寝ている。",
    "def train(model, data):\n    for batch in data:\n        model.step(batch)\n",
] * 20


def test_train_layout_and_round_trip(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    trained = OPTTokenizer.train(TINY_CORPUS, vocab_size=400)
    assert trained.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "<pad>", "</s>", "<unk>"]
    assert (trained.bos_token_id, trained.eos_token_id, trained.pad_token_id) == (2, 2, 1)
    assert 260 <= trained.vocab_size <= 400
    texts = ["The cat sat.", "a new word: zebra 🦓", "", "x</s>y <pad> <s>", "Собака и кот"]
    ids = trained(texts).input_ids
    assert all(
        row[0] == 2 and row.count(2) == 1 + text.count("</s>") for row, text in zip(ids, texts, strict=True)
    )
    assert trained.batch_decode(ids, skip_special_tokens=True) == [
        t.replace("</s>", "").replace("<pad>", "") for t in texts
    ]

    trained.save_pretrained(tmp_path / "trained")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "trained")
    again = OPTTokenizer.from_pretrained(tmp_path / "trained")
    for loaded in (theirs, again):
        assert dict(loaded(texts, padding=True)) == dict(trained(texts, padding=True))
        assert loaded.batch_decode(ids) == trained.batch_decode(ids)


def test_train_from_file(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TINY_CORPUS), encoding="utf-8")
    from_file = OPTTokenizer.train(corpus, vocab_size=300)
    from_list = OPTTokenizer.train([str(corpus)], vocab_size=300)
    assert from_file.get_vocab() == from_list.get_vocab()
    assert from_file("The cat").input_ids[0] == 2 and from_file.vocab_size <= 300
    with pytest.raises(ValueError, match="vocab_size"):
        OPTTokenizer.train(TINY_CORPUS, vocab_size=100)
    with pytest.raises(FileNotFoundError, match="training file .*missing.txt"):
        OPTTokenizer.train(tmp_path / "missing.txt", vocab_size=300)


# ---------------------------------------------------------------------- the hub path (offline cache)


@needs_files
def test_hub_cache_offline_env(tmp_path: Path, hf_offline: None) -> None:
    make_hub_cache(tmp_path, "org/opt-tok", {name: SHARED / name for name in FILES})
    loaded = OPTTokenizer.from_pretrained("org/opt-tok", cache_dir=tmp_path)
    assert [loaded(t).input_ids for t in PUBLISHED] == list(PUBLISHED.values())
    with pytest.raises(FileNotFoundError, match=r"vocab\.json.*org/absent"):
        OPTTokenizer.from_pretrained("org/absent", cache_dir=tmp_path)


@needs_files
def test_hub_cache_local_files_only_and_revision(tmp_path: Path) -> None:
    make_hub_cache(tmp_path, "org/opt-tok", {name: SHARED / name for name in FILES}, revision="v1")
    loaded = OPTTokenizer.from_pretrained(
        "org/opt-tok", revision="v1", cache_dir=tmp_path, local_files_only=True
    )
    assert loaded("This is a test").input_ids == PUBLISHED["This is a test"]
    only_json = {"vocab.json": SHARED / "vocab.json", "tokenizer_config.json": b"{}"}
    make_hub_cache(tmp_path, "org/broken", only_json)
    with pytest.raises(FileNotFoundError, match=r"merges\.txt.*org/broken"):
        OPTTokenizer.from_pretrained("org/broken", cache_dir=tmp_path, local_files_only=True)


@needs_files
def test_hub_cache_tokenizer_json_only(tok, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path / "saved")
    make_hub_cache(tmp_path / "cache", "org/fast", {"tokenizer.json": tmp_path / "saved" / "tokenizer.json"})
    loaded = OPTTokenizer.from_pretrained("org/fast", cache_dir=tmp_path / "cache", local_files_only=True)
    assert [loaded(t).input_ids for t in PUBLISHED] == list(PUBLISHED.values())


# ---------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small() -> OPTTokenizer:
    return OPTTokenizer.train(TINY_CORPUS, vocab_size=300)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda t: t(["ok", 3]), TypeError, r"text\[1\] is int, expected str"),
        (lambda t: t(["ok", None]), TypeError, r"text\[1\] is NoneType"),
        (lambda t: t(42), TypeError, "text must be a string or a list of strings"),
        (lambda t: t("a", ["b"]), ValueError, "text_pair must match"),
        (lambda t: t.encode(["a"]), TypeError, "encode takes one string"),
        (lambda t: t("a", max_length=0), ValueError, "max_length must be a positive int"),
        (lambda t: t("a", max_length=-3, truncation=True), ValueError, "max_length must be a positive int"),
        (lambda t: t("a", padding="maximum"), ValueError, "padding must be"),
        (lambda t: t("a", padding=2), ValueError, "padding must be"),
        (lambda t: t("a", truncation="sideways"), ValueError, "truncation must be"),
        (lambda t: t("a", return_tensors="np"), ValueError, "return_tensors must be None or 'pt'"),
        (
            lambda t: t("a", padding=True, padding_side="middle"),
            ValueError,
            "padding_side must be 'left' or 'right'",
        ),
        (lambda t: t(["a", "b"], padding="max_length"), ValueError, "padding='max_length' needs max_length"),
        (
            lambda t: t(["a", "a longer text"], return_tensors="pt"),
            ValueError,
            r"lengths \[2, \d+\].*padding=True",
        ),
        (lambda t: t.decode([[1, 2], [3]]), ValueError, "use batch_decode"),
        (
            lambda t: t(["a"], padding=True, truncation=True, max_length=5, pad_to_multiple_of=4),
            ValueError,
            r"max_length \(5\) must be a multiple of pad_to_multiple_of \(4\)",
        ),
    ],
)
def test_bad_input(small: OPTTokenizer, call, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call(small)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'vocab\.json' not found in directory '.*empty'"):
        (tmp_path / "empty").mkdir()
        OPTTokenizer.from_pretrained(tmp_path / "empty")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"'merges\.txt' not found in directory '.*half'"):
        OPTTokenizer.from_pretrained(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="is not a directory and not a valid hub repo id"):
        OPTTokenizer.from_pretrained(tmp_path / "does" / "not" / "exist")
