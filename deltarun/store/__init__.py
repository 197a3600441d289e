"""What is on this machine and how a name finds it: names.py (a model name → a folder: aliases, `org/repo`,
`demo`, quantization tags, the Hub), local.py (models in the Hugging Face cache, Ollama's store and
deltarun's folder: list, describe, copy, delete), pull.py (checked downloads). File formats live in
weights/, which imports nothing from here."""
