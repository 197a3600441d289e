"""HTTP server: OpenAI- and Ollama-compatible APIs over one `AsyncLLM` (see app.py for the map)."""
from .app import create_app

__all__ = ["create_app"]
