"""A live deltarun server around one `ModelManager`, for the multi-model server tests, and the models it
serves: deltarun's folder (DELTARUN_HOME) with two different tiny chat models, a copy of one and a broken
one; the HF cache and Ollama's store empty."""
import shutil
import socket
import threading
import time

import ollama
import openai
import pytest

from deltarun.server.model_manager import ModelManager

OPTIONS = {"dtype": "float32", "device": "cpu", "max_num_seqs": 4}
_DIRS: dict = {}  # built once per session, shared by the test modules that use them


def model_dirs(tmp_path_factory, chat_ckpt):
    from tiny import make_checkpoint, tiny_config

    if "root" in _DIRS:
        return _DIRS["root"]
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(chat_ckpt, root / "d" / "tiny-a")
    shutil.copytree(chat_ckpt, root / "d" / "tiny-a2")  # same weights, another model to the scheduler
    shutil.copytree(chat_ckpt, root / "d" / "tiny-b")  # the same tokenizer files, other weights:
    weights = make_checkpoint(root / "b-weights", tiny_config(vocab_size=248320), seed=11)
    for f in weights.glob("model.safetensors*"):
        shutil.copy(f, root / "d" / "tiny-b" / f.name)
    broken = root / "d" / "broken"
    shutil.copytree(chat_ckpt, broken)
    for shard in broken.glob("*.safetensors"):
        shard.write_bytes(shard.read_bytes()[:1000])  # truncated: the loader must refuse it
    _DIRS["root"] = root
    return root


@pytest.fixture(scope="module")
def home(tmp_path_factory, chat_ckpt):
    """deltarun's folder of `model_dirs`, set (with empty other stores) for the whole module."""
    from deltarun.processor.tokenizer import Tokenizer

    root = model_dirs(tmp_path_factory, chat_ckpt)
    tokenizers, read = {}, Tokenizer.from_folder
    with pytest.MonkeyPatch.context() as mp:  # module-wide: the server (a thread here) reads them per request
        # the 248K-entry tokenizer.json takes ~2 s to parse, most of a tiny model's load: read once per folder
        mp.setattr(Tokenizer, "from_folder", staticmethod(
            lambda folder: tokenizers.get(str(folder)) or tokenizers.setdefault(str(folder), read(folder))))
        mp.setenv("DELTARUN_HOME", str(root / "d"))
        mp.setenv("HF_HUB_CACHE", str(root / "hf"))
        mp.setenv("OLLAMA_MODELS", str(root / "ollama"))
        yield root / "d"


class Server:
    """A live server around one ModelManager, stopped (models unloaded) at the end of the test."""

    def __init__(self, manager: ModelManager):
        import uvicorn

        from deltarun.server import create_app

        self.models = manager
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(manager), host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "server start")
        self.ollama = ollama.Client(host=self.url)
        self.openai = openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0)

    def ps(self) -> list[str]:
        return [m.model for m in self.ollama.ps().models]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def serve(home):
    servers = []

    def start(**kw) -> Server:
        servers.append(Server(ModelManager(OPTIONS, **kw)))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def gen(srv: Server, model: str, **kw):
    return srv.ollama.generate(model=model, prompt="Hello", options={"num_predict": 3, "temperature": 0}, **kw)
