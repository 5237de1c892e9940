"""The API worker, layered (pyproject.toml's import-linter contract, top to bottom):

- `server`: the process entry point (`python -m production.server`);
- `api/`: the FastAPI app;
- `worker`: the one generation thread, which owns the engine;
- `engine`: the base model and its adapters, sampling one answer;
- `decode/` | `model/`: the decoders and logits steering | loading the base model;
- `chat/`: the chat format, torch-free.
"""
