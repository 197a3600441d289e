"""Structured output masks (llguidance): only grammar-valid tokens survive; with thinking, after </think>."""
import json

import torch

from deltarun.processor.tokenizer import Tokenizer
from deltarun.server.structured import Structured, compile_grammar

SCHEMA = {"type": "object", "properties": {"n": {"type": "boolean"}}, "required": ["n"],
          "additionalProperties": False}


def _greedy_walk(mask, tok, steps, prefer):
    """Drive the mask with logits that favour `prefer` tokens; return the text the sequence writes."""
    out = []
    for _ in range(steps):
        logits = torch.zeros(248320)
        logits[prefer] = 5.0
        mask(logits)
        t = int(logits.argmax())
        mask.accept(t)
        if t in tok.eos_token_ids:
            break
        out.append(t)
    return tok.decode(out)


def test_schema_mask_forces_valid_json():
    tok = Tokenizer.builtin()
    make = Structured(tok, compile_grammar("json_schema", SCHEMA), thinking=False)
    prefer = tok.encode("hello world, no json here")
    text = _greedy_walk(make(), tok, 40, prefer)
    assert set(json.loads(text)) == {"n"}


def test_mask_waits_for_think_end():
    tok = Tokenizer.builtin()
    make = Structured(tok, compile_grammar("json_object"), thinking=True)
    m = make()
    logits = torch.zeros(248320)
    m(logits)
    assert torch.isfinite(logits).all()  # reasoning is free text
    m.accept(tok.token_to_id("</think>"))
    m(logits)
    allowed = torch.isfinite(logits).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t]).startswith("{") for t in allowed)
