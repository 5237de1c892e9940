"""Serving benchmark: plain generate() vs the HTTP API, and an adapter hot swap vs a restart.

    python -m benchmarks.serving [--home H] [--requests 20] [--max-tokens 64]
    python -m benchmarks.serving --model-dir DIR [--restarts 1]     # on a GPU

All on the embedded SmolLM2-135M-Instruct (or the local model folder --model-dir, e.g. the
random 1.07 B Llama of benchmarks.gpu_suite), greedy, one prompt that asks for a long answer:

1. In-process baseline: the prepared model in bf16 on the device the server would use (cuda:0
   if there is one, else cpu), `model.generate()` with a streamer that timestamps each token.
   TTFT = call to first new token (chat template included); decode tokens/s = (new tokens - 1)
   / (first to last token). The model is freed before the server starts, so neither shares
   the cores with the other.
2. HTTP: the real `python -m production.server` in a throwaway home on a free 127.0.0.1 port,
   streamed SSE. TTFT = request sent to the first chunk with non-empty content; decode
   tokens/s = (usage.completion_tokens - 1) / (first to last content chunk).
3. Adapter swap: two real LoRAs (r=8 on q_proj, v_proj) promoted alternately with the
   registry; time from POST /admin/reload sent to the first content token of the next streamed
   request. Against a full restart: terminate the worker, promote, start a new worker, first
   content token of a streamed request.

On CUDA the memory-bandwidth bound is printed too: bandwidth (measured here, a device copy)
/ weight bytes = the most tokens/s any batch-1 decode loop can reach; the server's decode is
quoted as a fraction of it and against the plain loop.

Every figure is p50/p90 over the stated number of runs (after 2 warm-ups for 1 and 2, and one
unmeasured first swap for 3), timed with time.perf_counter in this process. The table is
printed and the same figures go to benchmarks/results/serving-<hostname>-<date>.json.

--home names a whetstone home whose embedded model is used (prepared there if missing); the
default is the test cache, .cache/test-models. The server always runs in a throwaway home
that links that model, so no benchmark conversations or candidates land in a real home.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_HOME = REPO / ".cache" / "test-models"
RESULTS_DIR = REPO / "benchmarks" / "results"
BASE_MODEL = "embedded:smollm2-135m-instruct"
PROMPT = "Write a long story about a dragon."
MESSAGES = [{"role": "user", "content": PROMPT}]
WARMUPS = 2
SWAPS = 5
ADAPTER_RUNS = 3
RESTARTS = 3
LORAS = ("bench-lora-a", "bench-lora-b")

log = logging.getLogger("benchmarks.serving")


# ------------------------------------------------------------------------------ figures


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "min": min(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
        "values": [round(v, 6) for v in values],
    }


@dataclass
class Sample:
    """One generation: seconds to first token, decode rate, tokens produced, how it ended."""

    ttft_s: float
    decode_tps: float
    tokens: int
    finish: str
    first_at: float  # perf_counter of the first content token
    adapter_id: str | None = None


def _decode_rate(tokens: int, first: float | None, last: float | None) -> float:
    if first is None or last is None or tokens < 2 or last <= first:
        return float("nan")
    return (tokens - 1) / (last - first)


# ----------------------------------------------------------------------------- hardware


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: other work on the machine skews every figure."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def machine_busy_s() -> float:
    """CPU-seconds the whole machine has been busy (or stolen by the hypervisor) since boot."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU-seconds of this process and its waited-for children (the servers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def environment(device: str) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    return {
        "hostname": socket.gethostname(),
        "device": device,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


# ---------------------------------------------------------------------------- in-process


def run_baseline(model_dir: Path, device: str, runs: int, max_tokens: int) -> dict[str, Any]:
    """Plain generate() on the prepared model; the model is freed before this returns."""
    import torch

    samples, prompt_tokens = _baseline_samples(model_dir, device, runs, max_tokens)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return _generation_figures(samples) | {"prompt_tokens": prompt_tokens}


def _baseline_samples(
    model_dir: Path, device: str, runs: int, max_tokens: int
) -> tuple[list[Sample], int]:
    """Greedy generate() with the server's stop tokens, after WARMUPS unmeasured runs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from production.chat.formats import plain_stop_ids

    class Stamps(BaseStreamer):
        """generate() puts the prompt first, then each new token: stamp the new ones."""

        def __init__(self) -> None:
            self.prompt_seen = False
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            count = len(value.reshape(-1).tolist())  # tolist: the token really exists now
            now = time.perf_counter()
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.times.extend([now] * count)

        def end(self) -> None:
            pass

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model.to(device).eval()
    stops = plain_stop_ids(tokenizer)
    pad = tokenizer.pad_token_id or stops[0]

    def once() -> tuple[Sample, int]:
        stamps = Stamps()
        started = time.perf_counter()
        ids = tokenizer.apply_chat_template(
            MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        input_ids = torch.tensor([list(ids)], device=device)
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                eos_token_id=stops,
                pad_token_id=pad,
                max_new_tokens=max_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                streamer=stamps,
            )
        times = stamps.times
        tokens = len(times)
        sample = Sample(
            ttft_s=times[0] - started,
            decode_tps=_decode_rate(tokens, times[0], times[-1]),
            tokens=tokens,
            finish="length" if tokens >= max_tokens else "stop",
            first_at=times[0],
        )
        return sample, input_ids.shape[1]

    for _ in range(WARMUPS):
        once()
    samples = []
    prompt_tokens = 0
    for i in range(runs):
        sample, prompt_tokens = once()
        samples.append(sample)
        log.info("in-process %d/%d: ttft %.0f ms", i + 1, runs, sample.ttft_s * 1000)
    return samples, prompt_tokens


def _generation_figures(samples: list[Sample]) -> dict[str, Any]:
    finishes: dict[str, int] = {}
    for s in samples:
        finishes[s.finish] = finishes.get(s.finish, 0) + 1
    return {
        "ttft_s": summary([s.ttft_s for s in samples]),
        "decode_tokens_per_s": summary([s.decode_tps for s in samples]),
        "completion_tokens": summary([float(s.tokens) for s in samples]),
        "finish_reasons": finishes,
    }


# ---------------------------------------------------------------------------------- HTTP


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A real `python -m production.server` on 127.0.0.1, its output in <home>/<log_name>."""

    def __init__(self, home: Path, log_name: str, checkout: Path = REPO) -> None:
        """`checkout`: the code to serve (`-m` runs the modules of its working directory)."""
        import httpx

        self.home = home
        self.log_path = home / log_name
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("WHETSTONE_")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "production.server",
                "--home",
                str(home),
                "--port",
                self.url.rsplit(":", 1)[1],
            ],
            cwd=checkout,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.url, timeout=300)

    def wait_ready(self, timeout: float = 300, poll_s: float = 0.05) -> None:
        import httpx

        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                if self.client.get("/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(poll_s)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.output()}")

    def output(self, tail: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text()[-tail:]

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def stream_chat(server: Server, max_tokens: int) -> Sample:
    """One streamed chat request; times are taken when each line arrives, before parsing."""
    body = {
        "messages": MESSAGES,
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    first: float | None = None
    last: float | None = None
    usage: dict[str, int] | None = None
    finish = adapter_id = None
    started = time.perf_counter()
    with server.client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"chat answered {response.status_code}: {response.text}")
        for line in response.iter_lines():
            now = time.perf_counter()
            if not line.startswith("data: "):
                continue
            payload = line[len("data: ") :]
            if payload == "[DONE]":
                break
            event = json.loads(payload)
            if "error" in event:
                raise RuntimeError(f"generation failed: {event['error']}")
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    first = first or now
                    last = now
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                    adapter_id = event.get("adapter_id")
            if event.get("usage"):
                usage = event["usage"]
    if first is None or usage is None:
        raise RuntimeError(f"no content or no usage chunk (usage={usage})")
    tokens = usage["completion_tokens"]
    return Sample(
        ttft_s=first - started,
        decode_tps=_decode_rate(tokens, first, last),
        tokens=tokens,
        finish=finish or "?",
        first_at=first,
        adapter_id=adapter_id,
    )


def run_http(server: Server, runs: int, max_tokens: int) -> dict[str, Any]:
    for _ in range(WARMUPS):
        stream_chat(server, max_tokens)
    samples = []
    for i in range(runs):
        samples.append(stream_chat(server, max_tokens))
        log.info("http %d/%d: ttft %.0f ms", i + 1, runs, samples[-1].ttft_s * 1000)
    return _generation_figures(samples)


# -------------------------------------------------------------------- adapters and swaps


def make_lora(
    registry: Any, candidate_id: str, model_dir: Path, seed: int, base_model: str = BASE_MODEL
) -> None:
    """A real LoRA (r=8, q_proj/v_proj) with random B, so it changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from candidates import CandidateMeta

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(base, config)
    registry.create(CandidateMeta(id=candidate_id, base_model=base_model), model.save_pretrained)
    del model, base
    gc.collect()


def _other(current: str | None) -> str:
    return LORAS[1] if current == LORAS[0] else LORAS[0]


def _swap_once(server: Server, registry: Any, max_tokens: int, base_model: str) -> dict[str, Any]:
    target = _other(registry.current_id())
    registry.promote(target, base_model=base_model)
    sent = time.perf_counter()
    reply = server.client.post("/admin/reload")
    reloaded = time.perf_counter()
    if reply.status_code != 200:
        raise RuntimeError(f"/admin/reload answered {reply.status_code}: {reply.text}")
    info = reply.json()
    sample = stream_chat(server, max_tokens)
    if sample.adapter_id != target:
        raise RuntimeError(f"swapped to {target} but the answer came from {sample.adapter_id}")
    return {
        "target": target,
        # False: the server's 1 s watch of candidates/current began the swap first, so this
        # reload only waited for part of it; such a run is not counted.
        "changed_by_reload": bool(info.get("changed")),
        "total_s": sample.first_at - sent,
        "reload_s": reloaded - sent,
        "server_swap_s": info.get("seconds"),
        "ttft_after_s": sample.ttft_s,
    }


def run_swaps(
    server: Server, registry: Any, swaps: int, max_tokens: int, base_model: str
) -> dict[str, Any]:
    first = _swap_once(server, registry, max_tokens, base_model)  # base -> LoRA: wraps in PeftModel
    runs: list[dict[str, Any]] = []
    raced = 0
    while len(runs) < swaps and raced < swaps:
        run = _swap_once(server, registry, max_tokens, base_model)
        if not run["changed_by_reload"]:
            raced += 1
            continue
        runs.append(run)
        log.info("swap %d/%d: %.0f ms", len(runs), swaps, run["total_s"] * 1000)
    steady = [stream_chat(server, max_tokens) for _ in range(ADAPTER_RUNS)]
    return {
        "first_swap_from_base_s": first["total_s"],
        "reload_to_first_token_s": summary([r["total_s"] for r in runs]),
        "reload_request_s": summary([r["reload_s"] for r in runs]),
        "server_reported_swap_s": summary([r["server_swap_s"] for r in runs]),
        "uncounted_raced_with_watcher": raced,
        "ttft_with_adapter_no_swap_s": summary([s.ttft_s for s in steady]),
        "runs": runs,
    }


def run_restarts(
    server: Server, home: Path, registry: Any, restarts: int, max_tokens: int, base_model: str
) -> tuple[Server, dict[str, Any]]:
    """Stop the worker, promote the other adapter, start a new one, first content token."""
    runs = []
    for i in range(restarts):
        started = time.perf_counter()
        server.stop()
        stopped = time.perf_counter()
        target = _other(registry.current_id())
        registry.promote(target, base_model=base_model)
        server = Server(home, f"server-restart-{i + 1}.log")
        server.wait_ready()
        ready = time.perf_counter()
        sample = stream_chat(server, max_tokens)
        if sample.adapter_id != target:
            raise RuntimeError(f"restarted on {target}, answered by {sample.adapter_id}")
        runs.append(
            {
                "target": target,
                "total_s": sample.first_at - started,
                "stop_s": stopped - started,
                "start_to_ready_s": ready - stopped,
                "ready_to_first_token_s": sample.first_at - ready,
            }
        )
        log.info("restart %d/%d: %.0f ms", i + 1, restarts, runs[-1]["total_s"] * 1000)
    figures = {
        key: summary([r[key] for r in runs])
        for key in ("total_s", "stop_s", "start_to_ready_s", "ready_to_first_token_s")
    }
    return server, figures | {"runs": runs}


# ---------------------------------------------------------------------------------- main


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _table(results: dict[str, Any]) -> str:
    env, cfg = results["environment"], results["settings"]
    base, http = results["in_process"], results["http"]
    swap, restart = results["swap"], results["restart"]
    lines = [
        f"whetstone serving benchmark — {env['device_name']} ({env['device']}, "
        f"{env['torch_threads']} torch threads), torch {env['torch']}, "
        f"transformers {env['transformers']}",
        f"prompt {cfg['prompt']!r} ({base['prompt_tokens']} tokens), max_tokens "
        f"{cfg['max_tokens']}, temperature 0, bf16; warm-ups {cfg['warmups']}; load average "
        f"before {env['load_average_before'][:1]}, after {env['load_average_after'][:1]}",
        "",
        f"{'':44}{'n':>4}{'p50':>10}{'p90':>10}",
    ]

    def row(label: str, fig: dict[str, Any], scale: float = 1000.0, unit: str = "") -> None:
        p50, p90 = fig["p50"] * scale, fig["p90"] * scale
        lines.append(f"{label:44}{fig['n']:>4}{p50:>10.1f}{p90:>10.1f}{unit}")

    def ratio(label: str, a: dict[str, Any], b: dict[str, Any]) -> None:
        r50, r90 = _ratio(a["p50"], b["p50"]), _ratio(a["p90"], b["p90"])
        lines.append(f"{label:44}{'':>4}{r50:>9.2f}x{r90:>9.2f}x")

    row("TTFT in-process (ms)", base["ttft_s"])
    row("TTFT HTTP (ms)", http["ttft_s"])
    ratio("  HTTP / in-process", http["ttft_s"], base["ttft_s"])
    row("decode in-process (tok/s)", base["decode_tokens_per_s"], 1.0)
    row("decode HTTP (tok/s)", http["decode_tokens_per_s"], 1.0)
    ratio("  HTTP / in-process", http["decode_tokens_per_s"], base["decode_tokens_per_s"])
    if results.get("bound"):
        bound = results["bound"]
        lines.append(
            f"{'bound: ' + str(bound['bandwidth_gbs']) + ' GB/s / weights (tok/s)':44}"
            f"{'':>4}{bound['tok_s']:>10.1f}"
        )
        for label, fig in (("in-process", base), ("HTTP", http)):
            share = fig["decode_tokens_per_s"]["p50"] / bound["tok_s"]
            lines.append(f"{'  decode ' + label + ' / bound':44}{'':>4}{share:>9.1%}")
    row("completion tokens in-process", base["completion_tokens"], 1.0)
    row("completion tokens HTTP", http["completion_tokens"], 1.0)
    row("swap: reload sent -> first token (ms)", swap["reload_to_first_token_s"])
    row("  of which POST /admin/reload (ms)", swap["reload_request_s"])
    row("  server-reported swap (ms)", swap["server_reported_swap_s"])
    row("TTFT with adapter, no swap (ms)", swap["ttft_with_adapter_no_swap_s"])
    row("restart: terminate -> first token (ms)", restart["total_s"])
    row("  stop (ms)", restart["stop_s"])
    row("  start -> /health ready (ms)", restart["start_to_ready_s"])
    row("  ready -> first token (ms)", restart["ready_to_first_token_s"])
    ratio("  restart / swap", restart["total_s"], swap["reload_to_first_token_s"])
    lines.append("")
    lines.append(
        f"finish reasons: in-process {base['finish_reasons']}, HTTP {http['finish_reasons']}; "
        f"first swap from base {swap['first_swap_from_base_s'] * 1000:.0f} ms (not counted); "
        f"swaps raced by the watcher (not counted): {swap['uncounted_raced_with_watcher']}"
    )
    lines.append(
        f"other processes used {env['other_processes_cpu_s']:.0f} CPU-s during the run "
        f"({env['other_processes_share']:.0%} of the machine): above a few % the figures are noisy"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--home",
        type=Path,
        default=DEFAULT_MODEL_HOME,
        help="home whose embedded model to use (default: the test cache)",
    )
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="a local model folder instead of SmolLM2"
    )
    parser.add_argument("--requests", type=int, default=20, help="measured runs per figure")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--restarts", type=int, default=RESTARTS, help="worker restarts timed")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.max_tokens < 2:
        parser.error("--requests must be >= 1 and --max-tokens >= 2")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)

    import torch
    from transformers.utils import logging as hf_logging

    from candidates import Registry
    from common.home import Home
    from production.model.base_model import prepare_embedded

    hf_logging.disable_progress_bar()
    started = datetime.now(UTC)
    load_before = load_average()
    busy_before, own_before, wall_before = machine_busy_s(), own_cpu_s(), time.perf_counter()
    if load_before and load_before[0] > 0.5:
        print(f"warning: load average {load_before[0]:.2f} before start: other work is running")
    if args.model_dir:
        model_dir, base_model = args.model_dir.resolve(), str(args.model_dir.resolve())
    else:
        model_dir = prepare_embedded(Home(args.home.expanduser().resolve()), show_progress=False)
        base_model = BASE_MODEL
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    bound = None
    if device.startswith("cuda"):
        from benchmarks.gpu_suite import bandwidth_gbs

        weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        bandwidth = bandwidth_gbs()
        bound = {
            "bandwidth_gbs": round(bandwidth, 1),
            "weight_bytes": weights,
            "tok_s": round(bandwidth * 1e9 / weights, 1),
        }
    print(f"model {model_dir} on {device}; {args.requests} runs, max_tokens {args.max_tokens}")

    print("1/4 in-process generate() ...", flush=True)
    baseline = run_baseline(model_dir, device, args.requests, args.max_tokens)

    with tempfile.TemporaryDirectory(prefix="whetstone-bench-") as tmp:
        home = Path(tmp) / "home"
        (home / "models").mkdir(parents=True)
        # The kept prompt cache off: every request repeats one prompt, and TTFT is compared
        # with generate() prefilling it whole (benchmarks.moe_decode measures the cache).
        server = "[server]\nprompt_cache = false\n"
        if args.model_dir:
            (home / "config.toml").write_text(
                f'[model]\npreset = "custom"\nbase_model = "{model_dir}"\nmin_vram_gb = 0.1\n\n'
                + server
            )
        else:
            (home / "config.toml").write_text(server)
            (home / "models" / model_dir.name).symlink_to(model_dir, target_is_directory=True)
        registry = Registry(home / "candidates")
        for seed, candidate in enumerate(LORAS):
            make_lora(registry, candidate, model_dir, seed, base_model)

        print("2/4 HTTP streaming ...", flush=True)
        server = Server(home, "server.log")
        try:
            cold = time.perf_counter()
            server.wait_ready()
            cold_start_s = time.perf_counter() - cold
            status = server.client.get("/v1/status").json()
            http = run_http(server, args.requests, args.max_tokens)
            print(f"3/4 adapter swaps ({SWAPS}) ...", flush=True)
            swap = run_swaps(server, registry, SWAPS, args.max_tokens, base_model)
            print(f"4/4 worker restarts ({args.restarts}) ...", flush=True)
            server, restart = run_restarts(
                server, home, registry, args.restarts, args.max_tokens, base_model
            )
        except Exception:
            print(f"server log tail:\n{server.output()}", file=sys.stderr)
            raise
        finally:
            server.stop()

    wall_s = time.perf_counter() - wall_before
    foreign_s = (machine_busy_s() - busy_before) - (own_cpu_s() - own_before)
    if status.get("device") != device:
        print(f"note: the server ran on {status.get('device')}, the baseline on {device}")
    results = {
        "benchmark": "serving",
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.now(UTC) - started).total_seconds(), 1),
        "environment": environment(device)
        | {
            "server_device": status.get("device"),
            "server_backend": status.get("backend"),
            "server_decode": status.get("decode"),
            "load_average_before": load_before,
            "load_average_after": load_average(),
            # CPU time the machine spent on anything but this benchmark and its servers.
            "other_processes_cpu_s": round(foreign_s, 1),
            "other_processes_share": round(foreign_s / (wall_s * (os.cpu_count() or 1)), 3),
        },
        "settings": {
            "model": base_model,
            "model_dir": str(model_dir),
            "dtype": "bfloat16",
            "prompt": PROMPT,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "requests": args.requests,
            "warmups": WARMUPS,
            "swaps": SWAPS,
            "restarts": args.restarts,
            "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        },
        "bound": bound,
        "in_process": baseline,
        "http": http | {"cold_start_to_ready_s": cold_start_s},
        "ratios_p50": {
            "ttft_http_over_in_process": _ratio(http["ttft_s"]["p50"], baseline["ttft_s"]["p50"]),
            "decode_http_over_in_process": _ratio(
                http["decode_tokens_per_s"]["p50"], baseline["decode_tokens_per_s"]["p50"]
            ),
            "decode_http_over_bound": _ratio(
                http["decode_tokens_per_s"]["p50"], bound["tok_s"] if bound else float("nan")
            ),
            "restart_over_swap": _ratio(
                restart["total_s"]["p50"], swap["reload_to_first_token_s"]["p50"]
            ),
        },
        "swap": swap,
        "restart": restart,
    }
    table = _table(results)
    print()
    print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    where = device_name(device) if bound else socket.gethostname()
    where = where.replace("NVIDIA ", "").replace(" ", "-").lower()
    out = RESULTS_DIR / f"serving-{where}-{started.astimezone():%Y-%m-%d-%H%M%S}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    if os.environ.get("OUT"):  # the device tool brings back what a run leaves there
        Path(os.environ["OUT"], out.name).write_text(out.read_text())
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
