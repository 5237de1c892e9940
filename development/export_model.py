"""A candidate for other runtimes: merged 16-bit safetensors (transformers, vLLM), a GGUF of the
merged model and a GGUF LoRA adapter (llama.cpp, Ollama).

    python -m development.export_model ID --format merged|gguf|lora-gguf [--out DIR]
        [--outtype f16] [--home H]
    python -m development.export_model --fetch-converters     # once; `make install` does it

`whetstone export-model` runs this. The GGUF files are written by llama.cpp's own converters
(`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py` and their `gguf-py`), taken from the
llama-cpp-python source distribution on PyPI (LLAMA_CPP_PYTHON below) into
`<prefix>/share/whetstone/llama.cpp-<version>`: the writers llama.cpp reads are the ones that
write, and no GGUF writer lives here. Every export is built in a temp folder and renamed into
place, with a `whetstone-export.json` saying what it is.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from candidates import Registry, RegistryError
from common.config import Settings
from common.entrypoint import add_settings_arguments, settings_from_args

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "0.3.36"  # its vendor/llama.cpp holds the converters this was tested with
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "LICENSE")
CONVERTER_DIRS = ("conversion", "gguf-py")
FORMATS = ("merged", "gguf", "lora-gguf")
# llama.cpp's --outtype values both converters take; f16 is what llama.cpp and Ollama load
# everywhere, q8_0 halves it again for CPU inference.
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
MERGED_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}  # torch's names
META = "whetstone-export.json"


class ExportError(RuntimeError):
    """The export cannot be made: the message says why and what to do."""


def converters_dir() -> Path:
    """Where llama.cpp's converters are (or go): $WHETSTONE_LLAMA_CPP, else the prefix's
    share folder."""
    override = os.environ.get("WHETSTONE_LLAMA_CPP")
    if override:
        return Path(override)
    return Path(sys.prefix) / "share" / "whetstone" / f"llama.cpp-{LLAMA_CPP_PYTHON}"


def fetch_converters(target: Path | None = None) -> Path:
    """Download llama-cpp-python's source distribution once and keep its converters."""
    target = target or converters_dir()
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    log.info("fetching llama.cpp's converters (llama-cpp-python %s, ~75 MB)", LLAMA_CPP_PYTHON)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        download = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp,
        ]  # fmt: skip
        done = subprocess.run(download, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise ExportError(
                f"could not download llama-cpp-python {LLAMA_CPP_PYTHON}'s source from the "
                f"package index: {done.stderr.strip()[-400:]}"
            )
        prefix = f"{sdists[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        staged = Path(tmp) / "llama.cpp"
        with tarfile.open(sdists[0]) as archive:
            for member in archive.getmembers():
                if not member.name.startswith(prefix) or not member.isfile():
                    continue
                relative = member.name[len(prefix) :]
                top = relative.split("/", 1)[0]
                if relative in CONVERTER_FILES or top in CONVERTER_DIRS:
                    archive.extract(member, tmp, filter="data")
        shutil.move(Path(tmp) / prefix, staged)
        if not (staged / "convert_hf_to_gguf.py").is_file():
            raise ExportError(f"llama-cpp-python {LLAMA_CPP_PYTHON} has no convert_hf_to_gguf.py")
        os.replace(staged, target)
    return target


def _convert(script: str, args: list[str], log_file: Path) -> None:
    """Run one of llama.cpp's converters; its output goes to `log_file`."""
    folder = fetch_converters()
    command = [sys.executable, str(folder / script), *args]
    with log_file.open("w") as out:
        code = subprocess.call(command, cwd=folder, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-12:]
        raise ExportError(f"llama.cpp's {script} failed (exit {code}):\n" + "\n".join(tail))


def _base_path(settings: Settings, fmt: str) -> str:
    from production.model import base_model

    path = base_model.resolve(settings)
    if fmt != "lora-gguf" and (settings.model.load_in_4bit or base_model.saved_quantized(path)):
        raise ExportError(
            f"the base model {settings.model.base_model} is loaded in 4 bits: folding the "
            "adapter into 16-bit weights needs the 16-bit base checkpoint. Point "
            "model.base_model at it (with model.load_in_4bit = false) for the export, e.g. "
            "`--set model.base_model=/path/to/gpt-oss-20b --set model.load_in_4bit=false`, "
            "or export the adapter alone with --format lora-gguf"
        )
    return path


def merge(settings: Settings, adapter: Path, base: str, out: Path, dtype: Any) -> None:
    """The adapter folded into the base weights, saved as safetensors with the tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.to(dtype).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    _plain_byte_level(out / "tokenizer.json")


def _plain_byte_level(path: Path) -> None:
    """A byte-level BPE tokenizer.json as its model card wrote it.

    transformers' GGUF import (how the embedded SmolLM2 is prepared) saves byte-level BPE
    with `byte_fallback` on and a SentencePiece-style decoder chain around the ByteLevel
    decoder. Encoding is unchanged by either, but llama.cpp's converter then takes it for a
    Llama SentencePiece vocabulary: the GGUF got `tokenizer.ggml.model = llama` and no merges,
    and read back it decoded to `ĊĊThe`. With the plain form it writes `gpt2` / `smollm`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    model, decoder = data.get("model") or {}, data.get("decoder") or {}
    pre = json.dumps(data.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or '"ByteLevel"' not in pre or decoder.get("type") != "Sequence":
        return
    byte_level = [d for d in decoder.get("decoders", []) if d.get("type") == "ByteLevel"]
    if not byte_level:
        return
    model["byte_fallback"] = False
    data["decoder"] = byte_level[0]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def export(
    settings: Settings,
    candidate_id: str,
    fmt: str,
    out: Path | None = None,
    outtype: str = "f16",
    progress: Any = None,
) -> Path:
    """Write the export into `out` (default <home>/exports/<id>-<format>); returns it."""
    import torch

    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype must be one of {', '.join(OUTTYPES)}; got {outtype!r}")
    if fmt == "merged" and outtype not in MERGED_DTYPES:
        raise ExportError(
            f"--outtype {outtype} is a GGUF quantization: merged safetensors are "
            f"{', '.join(MERGED_DTYPES)}"
        )
    registry = Registry(settings.paths.candidates_dir)
    try:
        registry.validate(candidate_id, base_model=settings.model.base_model)
    except RegistryError as exc:
        raise ExportError(str(exc)) from None
    adapter = registry.path(candidate_id)
    out = (out or settings.paths.root / "exports" / f"{candidate_id}-{fmt}").resolve()
    if out.exists():
        raise ExportError(f"{out} exists: remove it or choose another --out")
    base = _base_path(settings, fmt)
    step = progress or (lambda message: log.info("%s", message))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    started = time.monotonic()
    try:
        if fmt == "lora-gguf":
            step("converting the adapter with llama.cpp's convert_lora_to_gguf.py")
            outfile = staging / f"{candidate_id}-lora.gguf"
            _convert(
                "convert_lora_to_gguf.py",
                [str(adapter), "--base", base, "--outfile", str(outfile), "--outtype", outtype],
                staging / "convert.log",
            )
        else:
            # A GGUF is converted from full precision: llama.cpp rounds once, to --outtype.
            dtype = torch.float32 if fmt == "gguf" else getattr(torch, MERGED_DTYPES[outtype])
            merged_dir = staging if fmt == "merged" else staging / "merged"
            step(f"merging {candidate_id} into {settings.model.base_model}")
            merge(settings, adapter, base, merged_dir, dtype)
            if fmt == "gguf":
                step("converting with llama.cpp's convert_hf_to_gguf.py")
                outfile = staging / f"{candidate_id}.gguf"
                _convert(
                    "convert_hf_to_gguf.py",
                    [str(merged_dir), "--outfile", str(outfile), "--outtype", outtype],
                    staging / "convert.log",
                )
                shutil.rmtree(merged_dir)
        meta = {
            "candidate_id": candidate_id,
            "base_model": settings.model.base_model,
            "format": fmt,
            "outtype": outtype,
            "llama_cpp_python": LLAMA_CPP_PYTHON if fmt != "merged" else None,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - started, 1),
        }
        (staging / META).write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("candidate", nargs="?", help="candidate id to export")
    add_settings_arguments(parser)
    parser.add_argument("--format", choices=FORMATS, default="gguf")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--outtype", choices=OUTTYPES, default="f16")
    parser.add_argument("--fetch-converters", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.fetch_converters:
        try:
            sys.stdout.write(f"{fetch_converters()}\n")
        except ExportError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 2
        return 0
    if not args.candidate:
        parser.error("name the candidate to export (or --fetch-converters)")
    settings = settings_from_args(args)
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("starting", total=None)
        try:
            out = export(
                settings,
                args.candidate,
                args.format,
                args.out,
                args.outtype,
                progress=lambda message: bar.update(task, description=message),
            )
        except ExportError as exc:
            bar.stop()
            sys.stderr.write(f"error: {exc}\n")
            return 1
        bar.update(task, description="done", total=1, completed=1)
    sys.stdout.write(f"exported {args.candidate} ({args.format}) to {out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
