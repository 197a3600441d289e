"""HTTP server: OpenAI- and Ollama-compatible APIs over `EngineClient`s (deltarun/client.py); app.py has the map."""
from .app import create_app

__all__ = ["create_app"]
