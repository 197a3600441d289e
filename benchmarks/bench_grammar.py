"""Grammar-library benchmark for structured output (issue 4): llguidance vs xgrammar vs outlines-core.

On the real Qwen3.5 vocabulary (248,320 wide), for three JSON schemas (flat object, nested object with
arrays/enums, tool-arguments-like), each library / schema pair in a fresh process:
- tokenizer-info build time (first use; the raw token bytes list itself is built outside the timing),
- schema compile time (compile + the first mask, since llguidance compiles lazily),
- mean / p99 time per token to compute the next-token mask while following a valid compact JSON answer
  (the answer is tokenized with our tokenizer; every step computes the full-vocab mask, then accepts),
- RSS growth of the process over all of that.
A library that is not installed is reported as such. Prints a Markdown table (not a test).

    .venv/bin/python benchmarks/bench_grammar.py
    .venv/bin/python benchmarks/bench_grammar.py --libs llguidance xgrammar --repeat 3
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

SCHEMAS: dict[str, tuple[dict, dict]] = {
    "flat": (
        {"type": "object", "additionalProperties": False, "required": ["name", "age", "email", "active"],
         "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                        "email": {"type": "string"}, "active": {"type": "boolean"}}},
        {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "active": True},
    ),
    "nested": (
        {"type": "object", "additionalProperties": False, "required": ["order_id", "status", "items", "customer"],
         "properties": {
             "order_id": {"type": "string"},
             "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
             "items": {"type": "array", "items": {
                 "type": "object", "additionalProperties": False, "required": ["sku", "qty", "tags"],
                 "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"},
                                "tags": {"type": "array", "items": {"enum": ["gift", "fragile", "bulk"]}}}}},
             "customer": {"type": "object", "additionalProperties": False, "required": ["name", "address"],
                          "properties": {"name": {"type": "string"}, "address": {
                              "type": "object", "additionalProperties": False, "required": ["city", "zip"],
                              "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}}}}}},
        {"order_id": "A-1029", "status": "shipped",
         "items": [{"sku": "X100", "qty": 2, "tags": ["gift", "fragile"]}, {"sku": "Y7", "qty": 1, "tags": []}],
         "customer": {"name": "Grace Hopper", "address": {"city": "Arlington", "zip": "22201"}}},
    ),
    "tool_args": (
        {"type": "object", "additionalProperties": False, "required": ["location", "unit", "days"],
         "properties": {"location": {"type": "string", "description": "City and country"},
                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                        "days": {"type": "integer", "minimum": 1, "maximum": 14},
                        "include_hourly": {"type": "boolean"}}},
        {"location": "Paris, France", "unit": "celsius", "days": 3, "include_hourly": False},
    ),
}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class _LLG:
    def __init__(self, tokens: list[bytes], eos: list[int], encode):
        import llguidance

        class W:
            bos_token_id = None
            eos_token_id = eos[0]

            def __init__(self):
                self.tokens = tokens

            def __call__(self, text):
                return encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)

        self.tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(W()), eos_token=eos)

    def compile(self, schema: dict):
        from llguidance import LLMatcher

        grammar = LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        m = LLMatcher(self.tok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def mask(self, m) -> None:
        m.compute_bitmask()

    def accept(self, m, t: int) -> None:
        assert m.consume_token(t), m.get_error()


class _XGR:
    def __init__(self, tokens: list[bytes], eos: list[int], encode):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo(tokens, xgr.VocabType.RAW, vocab_size=len(tokens), stop_token_ids=eos)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2)
        self.bitmask = xgr.allocate_token_bitmask(1, len(tokens))

    def compile(self, schema: dict):
        cg = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
        return self.xgr.GrammarMatcher(cg)

    def mask(self, m) -> None:
        m.fill_next_token_bitmask(self.bitmask)

    def accept(self, m, t: int) -> None:
        assert m.accept_token(t)


class _OC:
    def __init__(self, tokens: list[bytes], eos: list[int], encode):
        import outlines_core as oc

        self.oc = oc
        ids: dict[bytes, list[int]] = {}
        for i, b in enumerate(tokens):
            if b and i not in eos:
                ids.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(eos[0], ids)
        self.bitmask = np.zeros((len(tokens) + 31) // 32, dtype=np.int32)

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern="")
        return self.oc.Guide(self.oc.Index(regex, self.vocab))

    def mask(self, g) -> None:
        g.write_mask_into(self.bitmask.ctypes.data, self.bitmask.size, 4)

    def accept(self, g, t: int) -> None:
        g.advance(t, return_tokens=False)


LIBS = {"llguidance": _LLG, "xgrammar": _XGR, "outlines-core": _OC}


def run_one(lib: str, schema_name: str, repeat: int) -> dict:
    """One library, one schema, in this (fresh) process."""
    from deltarun.processor.tokenizer import Tokenizer

    tok = Tokenizer.builtin()
    tokens = [tok.id_to_token_bytes(i) for i in range(tok.vocab_size)]
    eos = list(tok.eos_token_ids)
    schema, answer = SCHEMAS[schema_name]
    ids = tok.encode(json.dumps(answer, separators=(",", ":")))
    rss0 = _rss_mb()
    t = time.perf_counter()
    try:
        impl = LIBS[lib](tokens, eos, tok.encode)
    except ImportError as e:
        return {"error": f"not installed ({e.name})"}
    t_tok = time.perf_counter() - t
    t = time.perf_counter()
    m = impl.compile(schema)
    impl.mask(m)  # llguidance compiles lazily: time compile + first mask for every library
    t_compile = time.perf_counter() - t
    steps: list[float] = []
    for r in range(repeat):
        m = impl.compile(schema) if r else m
        for i in ids:
            t = time.perf_counter()
            impl.mask(m)
            steps.append(time.perf_counter() - t)
            impl.accept(m, i)
    s = np.array(steps) * 1e3
    return {"tok_s": t_tok, "compile_ms": t_compile * 1e3, "mean_ms": float(s.mean()),
            "p99_ms": float(np.percentile(s, 99)), "tokens": len(ids), "rss_mb": _rss_mb() - rss0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--libs", nargs="+", default=list(LIBS), choices=list(LIBS))
    ap.add_argument("--schemas", nargs="+", default=list(SCHEMAS), choices=list(SCHEMAS))
    ap.add_argument("--repeat", type=int, default=3, help="passes over each answer (masks timed each pass)")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one[0], a.one[1], a.repeat)))
        return
    print("| library | schema | tokenizer build s | compile + 1st mask ms | answer tokens | mask mean ms "
          "| mask p99 ms | RSS +MB |")
    print("|---|---|---|---|---|---|---|---|")
    for lib in a.libs:
        for name in a.schemas:
            out = subprocess.run([sys.executable, __file__, "--one", lib, name, "--repeat", str(a.repeat)],
                                 capture_output=True, text=True)
            try:
                r = json.loads(out.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                r = {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:80]}
            if "error" in r:
                print(f"| {lib} | {name} | {r['error']} | | | | | |")
                continue
            print(f"| {lib} | {name} | {r['tok_s']:.2f} | {r['compile_ms']:.1f} | {r['tokens']} | "
                  f"{r['mean_ms']:.3f} | {r['p99_ms']:.3f} | {r['rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
