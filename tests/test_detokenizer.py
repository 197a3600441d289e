"""IncrementalDetokenizer equals one-shot decode; StopChecker catches stop strings across token boundaries."""

from __future__ import annotations

import random

import pytest

from deltarun.processor.detokenizer import IncrementalDetokenizer, StopChecker
from deltarun.processor.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.builtin()


@pytest.fixture(scope="module")
def byte_ids(tok) -> dict[int, int]:
    """byte value -> id of the single-byte token."""
    table = {}
    for i in range(300):
        data = tok.id_to_token_bytes(i)
        if len(data) == 1:
            table[data[0]] = i
    assert len(table) == 256
    return table


@pytest.fixture(scope="module")
def partial_ids(tok) -> list[int]:
    """Ids whose bytes are not valid UTF-8 on their own (pieces of multi-byte characters)."""
    out = []
    for i in range(248044):
        try:
            tok.id_to_token_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            out.append(i)
    assert len(out) > 500
    return out


def _stream(tok: Tokenizer, ids: list[int], skip: bool) -> tuple[str, list[str]]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return "".join(pieces), pieces


def _assert_no_broken_chars(pieces: list[str]) -> None:
    for p in pieces:
        p.encode("utf-8")  # lone surrogates would fail here
        assert not any(0xD800 <= ord(c) <= 0xDFFF for c in p)


def test_split_multibyte_chars(tok, byte_ids):
    text = "a你😀é👨‍👩‍👧b"
    ids = [byte_ids[b] for b in text.encode()]
    out, pieces = _stream(tok, ids, skip=True)
    assert out == text
    assert pieces[1:4] == ["", "", "你"]  # held until the third byte of 你
    assert pieces[4:8] == ["", "", "", "😀"]


def test_never_completing_sequence(tok, byte_ids):
    ids = [byte_ids[0xE4], byte_ids[0xBD], byte_ids[ord("x")], byte_ids[0xF0], byte_ids[0x9F]]
    out, pieces = _stream(tok, ids, skip=True)
    assert out == tok.decode(ids) == "\ufffdx\ufffd"
    assert pieces[2] == "\ufffdx" and pieces[-1] == "\ufffd"  # the tail is only given up at flush
    lone = [byte_ids[0x80], byte_ids[0xFF], byte_ids[ord("y")]]
    assert _stream(tok, lone, skip=True)[0] == tok.decode(lone) == "\ufffd\ufffdy"


@pytest.mark.parametrize("seed", range(4))
def test_random_sequences_equal_decode(tok, partial_ids, seed):
    rng = random.Random(seed)
    specials = sorted(tok.added_tokens.values())
    for _ in range(250):
        ids = []
        for _ in range(rng.randint(0, 40)):
            r = rng.random()
            if r < 0.5:
                ids.append(rng.choice(partial_ids))
            elif r < 0.9:
                ids.append(rng.randrange(tok.vocab_size))
            elif r < 0.97:
                ids.append(rng.choice(specials))
            else:
                ids.append(rng.randrange(248077, 248320))  # padded embedding rows: no text
        for skip in (True, False):
            out, pieces = _stream(tok, ids, skip)
            assert out == tok.decode(ids, skip_special_tokens=skip)
            _assert_no_broken_chars(pieces)


def test_real_text_roundtrip(tok):
    text = "思考：👍🏽 naïve café — 東京タワー\n<think>\nx\n</think>\n\nOK"
    ids = tok.encode(text + "<|im_end|>")
    assert _stream(tok, ids, skip=True)[0] == text
    assert _stream(tok, ids, skip=False)[0] == text + "<|im_end|>"


def test_stop_checker_basic():
    sc = StopChecker(["STOP", "\n\nUser:"])
    assert sc.feed("hello ST") == ("hello ", False)
    assert sc.feed("O") == ("", False)
    assert sc.feed("P and more") == ("", True)
    assert sc.stopped and sc.matched == "STOP"
    assert sc.feed("x") == ("", True) and sc.flush() == ""


def test_stop_checker_false_alarm_and_flush():
    sc = StopChecker(["abc"])
    assert sc.feed("xxab") == ("xx", False)
    assert sc.feed("d") == ("abd", False)
    assert sc.feed("a") == ("", False)
    assert sc.flush() == "a"
    empty = StopChecker([])
    assert empty.feed("abc") == ("abc", False) and empty.flush() == ""


def test_stop_checker_earliest_stop_wins():
    sc = StopChecker(["bcd", "ab"])
    assert sc.feed("xabcd") == ("x", True) and sc.matched == "ab"


def _reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    positions = [text.find(s) for s in stops if s and s in text]
    return (text[: min(positions)], True) if positions else (text, False)


@pytest.mark.parametrize("seed", range(3))
def test_stop_strings_across_token_boundaries(tok, seed):
    rng = random.Random(100 + seed)
    words = ["Hello", " world", "<|", "im", "_end", "|>", "\n", "\n\n", "User", ":", "你", "好", "😀", " STOP", "S",
             "TO", "P", "###", "#"]
    stops = ["\n\nUser:", "STOP", "###", "好😀"]
    for _ in range(300):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
        ids = tok.encode(text)
        detok, checker = IncrementalDetokenizer(tok, skip_special_tokens=False), StopChecker(stops)
        shown, stopped = [], False
        for i in ids:
            emit, stopped = checker.feed(detok.add(i))
            shown.append(emit)
            if stopped:
                break
        if not stopped:
            emit, stopped = checker.feed(detok.flush())
            shown.append(emit)
            shown.append(checker.flush())
        assert ("".join(shown), stopped) == _reference_cut(tok.decode(ids), stops)


def test_stop_checker_random_chunking():
    rng = random.Random(5)
    alphabet = "ab\nc"
    stops = ["abc", "\n\n", "cab"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        sc, out, stopped, pos = StopChecker(stops), [], False, 0
        while pos < len(text) and not stopped:
            step = rng.randint(1, 4)
            emit, stopped = sc.feed(text[pos : pos + step])
            out.append(emit)
            pos += step
        out.append(sc.flush())
        assert ("".join(out), stopped) == _reference_cut(text, stops)
