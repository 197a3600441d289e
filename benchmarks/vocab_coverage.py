"""Share of real-text tokens whose id is below N, with the real Qwen3.5 tokenizer (the built-in vocabulary).

How much an MTP draft over the first N ids (EngineConfig.mtp_draft_vocab) can lose: BPE ids are merge-ranked,
so frequent tokens come first. Text comes from files already on the machine (Python sources, Debian
copyright files, the repo's docs, the vendored llama.cpp sources when present, CJK-heavy locale files).

    python benchmarks/vocab_coverage.py
    python benchmarks/vocab_coverage.py --glob 'mydocs/**/*.md'
"""
from __future__ import annotations

import argparse
import glob
import random
from pathlib import Path

from deltarun.processor.tokenizer import _builtin

ROOT = Path(__file__).resolve().parents[1]
CORPORA = {
    "python code": ["/usr/lib/python3*/**/*.py"],
    "English prose": ["/usr/share/doc/**/*copyright", str(ROOT / "docs/*.md")],
    "C/C++ code": ["/work/llama/**/src/*.cpp"],
}
LIMITS = (8192, 16384, 32768, 65536, 131072)


def cjk_files() -> list[str]:
    out = []
    for f in glob.glob("/usr/share/i18n/locales/*") + glob.glob("/usr/lib/python3*/test/**/*.txt", recursive=True):
        try:
            text = open(f, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError):
            continue
        if sum(ord(c) > 0x2E80 for c in text) > 200:
            out.append(f)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--glob", action="append", help="your own files (replaces the default corpora)")
    ap.add_argument("--files", type=int, default=60, help="files sampled per corpus (default 60)")
    a = ap.parse_args()
    tok, rng = _builtin(), random.Random(0)
    corpora = {"yours": a.glob} if a.glob else {**CORPORA, "CJK-heavy": None}
    print("| text | tokens | " + " | ".join(f"ids < {n // 1024}K" for n in LIMITS) + " |")
    print("|---|---|" + "---|" * len(LIMITS))
    for name, pats in corpora.items():
        files = cjk_files() if pats is None else sorted(f for p in pats for f in glob.glob(p, recursive=True))
        ids: list[int] = []
        for f in rng.sample(files, min(a.files, len(files))):
            ids += tok.encode(open(f, encoding="utf-8", errors="ignore").read()[:20000])
        if ids:
            shares = " | ".join(f"{sum(i < n for i in ids) / len(ids):.1%}" for n in LIMITS)
            print(f"| {name} | {len(ids)} | {shares} |")


if __name__ == "__main__":
    main()
