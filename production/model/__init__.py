"""The base model: preparing it (`base_model`, `python -m production.model.base_model`),
loading it onto a device (`loading.load_model`, shared by serving and the training jobs),
GPT-OSS's bnb-4bit layout (`gpt_oss_layout`), pinning a worker to its device before torch
loads (`device_pin`), GPU memory limits and peaks (`gpu_memory`), and the environment check
(`doctor`, `python -m production.model.doctor`).

Nothing here decodes: `development` imports this package and `production.chat` only (a
contract in pyproject.toml), so a training job never loads the serving decoders.
"""
