"""pp512 / tg128 of deltarun at two source trees, side by side: fresh processes, reps interleaved (the order
alternates each rep), medians with every rep printed, for a refactor's "did anything move" check.

    git worktree add --detach /tmp/before <rev>
    python benchmarks/bench_ab.py --before /tmp/before --after . --reps 5 --variants bf16,int8,int4

A switch on one tree: `--before . --after . --before-env DELTARUN_HUGEPAGES=0` (each `--*-env NAME=VALUE`, repeatable,
is set for that side's runs only).

Each run is `python -m deltarun.bench --child` (the `deltarun bench` measurement) with PYTHONPATH set to
its tree, on the random 0.8B-shape checkpoint (written once to ~/.cache/deltarun/bench-0.8b). A first
untimed run per tree builds that tree's CPU kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

MODEL = Path("~/.cache/deltarun/bench-0.8b").expanduser()


def run(tree: Path, model: Path, variant: str, threads: int, extra: dict[str, str] | None = None) -> dict:
    spec = json.dumps({"folder": str(model), "variant": variant, "prompt_lens": [512], "gen_len": 128,
                       "threads": threads})
    env = {**os.environ, "PYTHONPATH": str(tree), "TOKENIZERS_PARALLELISM": "false", **(extra or {})}
    p = subprocess.run([sys.executable, "-m", "deltarun.bench", "--child", spec], capture_output=True, text=True,
                       env=env, cwd=tree)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{tree} {variant}: {(p.stderr or p.stdout)[-1500:]}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, required=True)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variants", default="bf16,int8,int4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--before-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--after-env", action="append", default=[], metavar="NAME=VALUE")
    a = p.parse_args(argv)
    if bad := [e for e in a.before_env + a.after_env if "=" not in e]:
        p.error(f"--before-env / --after-env take NAME=VALUE, not {bad[0]!r}")
    envs = {side: dict(e.split("=", 1) for e in getattr(a, f"{side}_env")) for side in ("before", "after")}
    if not (a.model / "config.json").is_file():
        from deltarun.weights.random_init import write_random_checkpoint
        write_random_checkpoint("0.8B", a.model, seed=0, tokenizer=False)
    trees = {"before": a.before.resolve(), "after": a.after.resolve()}
    variants = a.variants.split(",")
    for t, tree in trees.items():  # builds the tree's kernels, untimed
        run(tree, a.model, variants[0], a.threads, envs[t])
    res: dict[tuple[str, str], list[dict]] = {(t, v): [] for t in trees for v in variants}
    for rep in range(a.reps):
        for v in variants:
            for t in (("before", "after") if rep % 2 == 0 else ("after", "before")):
                r = run(trees[t], a.model, v, a.threads, envs[t])
                res[t, v].append(r)
                print(f"rep {rep + 1} {v:6} {t:6} pp512 {r['pp512']:7.1f} tg128 {r['tg128']:6.2f} "
                      f"rss {r['rss_gb']:.2f}", flush=True)
    print("\n| variant | metric | before: median (reps) | after: median (reps) | after / before |")
    print("|---|---|---|---|---|")
    for v in variants:
        for m in ("pp512", "tg128"):
            b, af = ([r[m] for r in res[t, v]] for t in ("before", "after"))
            show = lambda xs: f"{statistics.median(xs):.1f} ({', '.join(f'{x:.1f}' for x in xs)})"  # noqa: E731
            print(f"| {v} | {m} | {show(b)} | {show(af)} | {statistics.median(af) / statistics.median(b):.3f} |")


if __name__ == "__main__":
    main()
