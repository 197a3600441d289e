"""`deltarun batch` on this machine (deltarun/scale/batch_local.py): the OpenAI Batch format in and out, error
lines for bad lines, resuming by custom_id; and `--ray` without Ray installed (one line, exit 1)."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from server_helpers import shared_llm

from deltarun.scale.batch_lines import line_id

HERE = Path(__file__).parent


def request(cid: str, i: int, **body) -> dict:
    if i % 2:
        return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 5,
                         "temperature": 0, **body}}
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
            "body": {"prompt": f"text number {i}", "max_tokens": 5, "temperature": 0, **body}}


def write_input(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def read_output(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for raw in path.read_text().splitlines():
        line = json.loads(raw)
        assert line["custom_id"] not in out, f"{line['custom_id']} answered twice"
        out[line["custom_id"]] = line
    return out


def answer_text(line: dict) -> str:
    body = line["response"]["body"]
    choice = body["choices"][0]
    return choice["text"] if body["object"] == "text_completion" else choice["message"]["content"]


def run(llm, src: Path, dst: Path, **kw):
    from deltarun.scale.batch_local import run_local

    return asyncio.run(run_local(llm, "tiny", src, dst, progress=False, **kw))


def test_format_errors_and_resume(chat_ckpt, tmp_path):
    llm = shared_llm(chat_ckpt)
    good = [request(f"r{i}", i) for i in range(8)]
    bad = ["{not json", json.dumps(["a list"]), {"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},
           {"custom_id": "wrong-url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
           request("other-model", 0, model="gpt-4o"),
           {"custom_id": "bad-body", "method": "POST", "url": "/v1/completions",
            "body": {"prompt": "x", "max_tokens": -1}}]
    src = write_input(tmp_path / "in.jsonl", good + bad + [request("r0", 0)])  # r0 twice: answered once
    dst = tmp_path / "out.jsonl"
    bar = run(llm, src, dst, max_in_flight=3)
    out = read_output(dst)
    assert set(out) == {f"r{i}" for i in range(8)} | {line_id("{not json"), line_id(json.dumps(["a list"])),
                                                      line_id(json.dumps(bad[2])), "wrong-url", "other-model",
                                                      "bad-body"}
    for i in range(8):
        line = out[f"r{i}"]
        assert line["error"] is None and line["response"]["status_code"] == 200 and line["id"].startswith("batch_req_")
        body = line["response"]["body"]
        assert body["object"] == ("chat.completion" if i % 2 else "text_completion") and body["model"] == "tiny"
        assert body["usage"]["completion_tokens"] == 5
    assert out[line_id("{not json")]["error"]["code"] == "invalid_json"
    assert out["wrong-url"]["error"]["code"] == "invalid_url"
    assert out["other-model"]["error"]["code"] == "model_mismatch" and out["other-model"]["response"] is None
    assert out[line_id(json.dumps(bad[2]))]["error"]["code"] == "missing_custom_id"
    assert out["bad-body"]["response"]["status_code"] == 400 and "max_tokens" in json.dumps(out["bad-body"])
    assert bar.done == len(out) and bar.errors == 6 and bar.tokens == 40

    # the same answers alone, greedy: batching changed nothing
    alone = read_output(dst)
    for i in (0, 1):
        single = tmp_path / f"one{i}.jsonl"
        run(llm, write_input(tmp_path / f"in{i}.jsonl", [request(f"r{i}", i)]), single)
        assert answer_text(read_output(single)[f"r{i}"]) == answer_text(alone[f"r{i}"])

    # resume: lines in OUT are skipped, a half-written last line is cut and runs again
    kept = [raw for raw in dst.read_text().splitlines() if json.loads(raw)["custom_id"] in ("r1", "r2", "r3")]
    dst.write_text("\n".join(kept) + "\n" + kept[0][:40])
    bar = run(llm, src, dst)
    again = read_output(dst)
    assert set(again) == set(out) and bar.skipped == 3 and bar.done == len(out) - 3
    assert [again[c]["id"] for c in ("r1", "r2", "r3")] == [out[c]["id"] for c in ("r1", "r2", "r3")]
    assert all(answer_text(again[f"r{i}"]) == answer_text(out[f"r{i}"]) for i in range(8))
    bar = run(llm, src, dst)  # nothing left
    assert bar.done == 0 and read_output(dst) == again


@pytest.mark.parametrize("argv", [["serve", "MODEL", "--ray"], ["batch", "MODEL", "IN", "OUT", "--ray"]])
def test_ray_missing_is_one_line(argv, tmp_path):
    """Without Ray installed (hidden here), --ray prints how to install it: one line, exit code 1."""
    src = write_input(tmp_path / "in.jsonl", [request("a", 0)])
    argv = [str(src) if a == "IN" else str(tmp_path / "out.jsonl") if a == "OUT" else a for a in argv]
    code = ("import sys; sys.modules['ray'] = None\n"
            "from deltarun.cli import main\n"
            f"sys.exit(main({argv!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DELTARUN_HOME": str(tmp_path / "home")})
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'deltarun[ray]'" in lines[0], r.stderr
