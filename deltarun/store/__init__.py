"""What is on this machine and how a name finds it. names.py parses names (aliases, `org/repo`, `demo`,
quantization tags); resolve.py turns one into a folder to run; records.py (LocalModel, facts on disk),
listing.py (the models: HF cache, deltarun's folder, all; `find_local`), ollama_store.py (Ollama's store),
aliases.py (copied names), info.py (`show`), operations.py (copy, delete), pull.py (checked downloads),
progress.py (their progress bars). File formats live in weights/, which imports nothing from here."""
