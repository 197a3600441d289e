"""Architecture rules, read from the source (every import statement, function bodies included): deltarun has
no import circles; weights/ (file formats) imports nothing from store/; the server and CLI use only public
names of store/; engine/ imports nothing from processor/, server/ or store/, and its scheduler no torch; the
server's routes reach a model only through the `EngineClient` protocol (client.py); model/ never names
torch.ops; no module changes its class; ops/ reads the environment only in settings.py and no model
attribute names."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "deltarun"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """deltarun module → the deltarun modules it imports anywhere in its file (names resolved to modules)."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = package.split(".")
                    pkg = pkg[:len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs + ([base] if len(subs) < len(node.names) else [])  # names from base itself
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def cycles_within(graph: dict[str, set[str]], prefixes: tuple[str, ...]) -> list[list[str]]:
    """Circles among the modules under `prefixes` (a package's __init__ re-exporting is an edge too)."""
    nodes = {n for n in graph if n.startswith(prefixes)}
    found, state = [], {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph[n] & nodes):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2
    for n in sorted(nodes):
        if n not in state:
            visit(n, [n])
    return found


def test_the_graph_sees_function_body_imports():
    g = import_graph()
    assert "deltarun.server.model_manager" in g["deltarun.cli.main"]  # imported inside cmd_serve
    assert "deltarun.cli.options" in g["deltarun.cli.chat"]


def test_no_import_circles():
    """Anywhere in deltarun, function-local and TYPE_CHECKING imports included."""
    assert cycles_within(import_graph(), ("deltarun",)) == []


def test_routers_do_not_import_the_app():
    g = import_graph()
    for router in ("openai", "openai_completions", "ollama", "manage", "model_manager", "common", "anthropic",
                   "anthropic_stream", "anthropic_convert", "responses", "responses_input", "responses_stream",
                   "responses_store"):
        assert "deltarun.server.app" not in g[f"deltarun.server.{router}"], router


def test_the_finder_finds_a_circle():
    assert cycles_within({"a.x": {"a.y"}, "a.y": {"a.x"}, "b": set()}, ("a.",)) == [["a.x", "a.y", "a.x"]]


def test_weights_and_store_one_way():
    g = import_graph()
    assert not any(d.startswith("deltarun.store") for m, deps in g.items() if m.startswith("deltarun.weights")
                   for d in deps)
    assert cycles_within(g, ("deltarun.weights", "deltarun.store")) == []


def test_server_and_cli_use_only_public_names_of_the_store():
    import re

    for path in [*(ROOT / "server").glob("*.py"), *(ROOT / "cli").glob("*.py")]:
        text = path.read_text()
        store = "|".join(p.stem for p in (ROOT / "store").glob("*.py"))
        assert not re.search(rf"\b({store})\._\w", text), path.name
        assert not re.search(r"from \.\.store\.\w+ import [^\n]*\b_\w", text), path.name


def test_the_engine_speaks_token_ids():
    """engine/ imports nothing from processor/ (text, templates, media decoding), server/ or store/: what
    crosses its boundary lives in deltarun/inputs.py."""
    g = import_graph()
    for m, deps in g.items():
        if m.startswith("deltarun.engine"):
            assert not [d for d in deps if d.startswith(("deltarun.processor", "deltarun.server", "deltarun.store"))], m


def test_model_code_calls_ops_not_torch_ops():
    """model/ reaches the C++ kernels only through ops/ functions (each beside its reference)."""
    for path in (ROOT / "model").glob("*.py"):
        assert "torch.ops" not in path.read_text(), path.name


def test_no_module_changes_class():
    """Routes are chosen by the loader (ops/routes.py), never by swapping a module's class."""
    import re

    for path in ROOT.rglob("*.py"):
        assert not re.search(r"\.__class__\s*=[^=]", path.read_text()), path.relative_to(ROOT)


def test_switches_are_read_in_one_place():
    """The kernels' DELTARUN_* switches are read by ops/settings.py only; ops/ reads no model attribute names
    (the fused layers get named parts from the layer)."""
    import re

    for path in (ROOT / "ops").glob("*.py"):
        text = path.read_text()
        if path.name != "settings.py":
            assert "os.environ" not in text and "getenv" not in text, path.name
        assert not re.search(r"\.(mlp|linear_attn|self_attn|input_layernorm|post_attention_layernorm|language_model)\b",
                             text), path.name


def test_the_scheduler_does_no_tensor_work():
    g = import_graph()
    text = (ROOT / "engine" / "scheduler.py").read_text()
    assert "import torch" not in text and "deltarun.model" not in " ".join(g["deltarun.engine.scheduler"])


def test_routes_reach_models_through_the_engine_client():
    """Only server/targets.py (which loads the local `AsyncLLM`) may import async_llm or engine/; every route
    calls the `EngineClient` protocol, so a remote replica can stand behind it. client.py and the request
    loop (request_stream.py) import no engine code either."""
    g = import_graph()
    engine_side = ("deltarun.async_llm", "deltarun.engine", "deltarun.llm")
    for m, deps in g.items():
        if m.startswith("deltarun.server") and m != "deltarun.server.targets":
            assert not [d for d in deps if d.startswith(engine_side)], m
    for m in ("deltarun.client", "deltarun.request_stream"):
        assert not [d for d in g[m] if d.startswith(engine_side)], m
