"""production.decode.decode_attention: GPT-OSS attention that reads only the tokens present.

On the CPU: the function against transformers' eager_attention_forward (prompts, steps on
full-size caches and on rings whose slots are out of order), a tiny random GPT-OSS through
prompts and one-token steps on StaticCaches with eager and with `install`, the prompt path's
chunk bound, and the compiled step tracing once. The Triton kernels run in Triton's
interpreter against the torch path, and compile for an RTX 3090 (sm_86). GPU-marked tests
run the kernels on the 20B head shape on a 32,768-slot cache, inside a captured CUDA graph,
and time them against eager; a 32,768-token prompt's memory is measured:

    pytest -q -m gpu tests/test_decode_attention.py -s
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward  # noqa: E402

from production.decode import decode_attention  # noqa: E402
from production.decode.decode_attention import attention, torch_attention  # noqa: E402
from tests.conftest import run_in_triton_interpreter  # noqa: E402

WINDOW = 8  # the tiny model's sliding window: prompts of 20 tokens pass it


def _eager(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    positions: torch.Tensor,
    scaling: float,
    window: int,
) -> torch.Tensor:
    """transformers' eager attention with the mask it builds on a full-size cache (key index ==
    position, finfo.min where masked)."""
    module = SimpleNamespace(
        num_key_value_groups=q.shape[1] // k.shape[1], sinks=sinks, training=False
    )
    key_pos = torch.arange(k.shape[2])[None, :]
    ok = key_pos <= positions[:, None]
    if window:
        ok &= key_pos > positions[:, None] - window
    mask = torch.where(ok, 0.0, torch.finfo(q.dtype).min).to(q.dtype)[None, None]
    return eager_attention_forward(module, q, k, v, mask, scaling)[0]


def _call(q, k, v, sinks, positions, scaling, window):
    module = SimpleNamespace(sinks=sinks, training=False)
    out, weights = attention(
        module,
        q,
        k,
        v,
        None,
        scaling,
        s_aux=sinks,
        sliding_window=window or None,
        position_ids=positions.view(1, -1),
    )
    assert weights is None
    return out


def _tensors(heads: int, kv_heads: int, slots: int, dim: int, seed: int = 0) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    k = torch.randn(1, kv_heads, slots, dim, generator=generator)
    v = torch.randn(1, kv_heads, slots, dim, generator=generator)
    sinks = 2 * torch.randn(heads, generator=generator)
    return k, v, sinks


@pytest.mark.parametrize("window", [0, WINDOW])
@pytest.mark.parametrize("length", [1, 5, WINDOW, WINDOW + 1, 30])
def test_a_prompt_matches_eager(window: int, length: int) -> None:
    heads, kv_heads, dim = 6, 2, 16  # three query heads a KV head
    k, v, sinks = _tensors(heads, kv_heads, 40, dim)
    q = torch.randn(1, heads, length, dim)
    positions = torch.arange(length)
    want = _eager(q, k, v, sinks, positions, 0.25, window)
    got = _call(q, k, v, sinks, positions, 0.25, window)
    assert got.shape == want.shape == (1, length, heads, dim)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("window", [0, WINDOW])
@pytest.mark.parametrize("position", [0, WINDOW - 2, WINDOW - 1, WINDOW, 20, 39])
def test_a_step_on_a_full_size_cache_matches_eager(window: int, position: int) -> None:
    heads, kv_heads, dim = 4, 2, 16
    k, v, sinks = _tensors(heads, kv_heads, 40, dim, seed=position)
    q = torch.randn(1, heads, 1, dim)
    positions = torch.tensor([position])
    want = _eager(q, k, v, sinks, positions, 0.25, window)
    torch.testing.assert_close(
        _call(q, k, v, sinks, positions, 0.25, window), want, rtol=0, atol=1e-6
    )


def _ring(k: torch.Tensor, length: int, slots: int, seed: int) -> torch.Tensor:
    """The last min(length, slots) positions of full-size keys `k` in the first slots of a
    ring, shuffled, the unused slots holding garbage no attention may read."""
    held = min(length, slots)
    order = torch.randperm(held, generator=torch.Generator().manual_seed(seed))
    ring = torch.full((*k.shape[:2], slots, k.shape[3]), 1e4, dtype=k.dtype)
    ring[:, :, order] = k[:, :, length - held : length]
    return ring


@pytest.mark.parametrize("position", [0, WINDOW - 2, WINDOW - 1, WINDOW, 20, 39])
def test_a_step_on_a_ring_matches_eager_on_the_full_cache(position: int) -> None:
    heads, kv_heads, dim = 4, 2, 16
    k, v, sinks = _tensors(heads, kv_heads, 40, dim, seed=position)
    q = torch.randn(1, heads, 1, dim)
    positions = torch.tensor([position])
    want = _eager(q, k, v, sinks, positions, 0.25, WINDOW)
    ring_k = _ring(k, position + 1, WINDOW, seed=position)
    ring_v = _ring(v, position + 1, WINDOW, seed=position)
    got = _call(q, ring_k, ring_v, sinks, positions, 0.25, WINDOW)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("window", [0, WINDOW])
def test_the_prompt_path_keeps_each_score_tensor_within_the_budget(
    window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    heads, kv_heads, dim, length = 4, 2, 16, 64
    k, v, sinks = _tensors(heads, kv_heads, length, dim)
    q = torch.randn(1, heads, length, dim)
    positions = torch.arange(length)
    whole = _call(q, k, v, sinks, positions, 0.25, window)

    sizes: list[tuple[int, int]] = []
    attend = decode_attention._attend

    def counted(query, key, *args):
        sizes.append((query.shape[0] * query.shape[1] * key.shape[1], query.shape[1]))
        return attend(query, key, *args)

    budget = heads * 16 * 4 * 4  # 16 fp32 rows of 16 keys: a quarter of the prompt's rows
    monkeypatch.setattr(decode_attention, "SCORE_BUDGET_BYTES", budget)
    monkeypatch.setattr(decode_attention, "_attend", counted)
    chunked = _call(q, k, v, sinks, positions, 0.25, window)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    assert sum(rows for _, rows in sizes) == length and len(sizes) > 1
    # One row against every key is the least a chunk holds; beyond that the budget bounds it.
    assert max(elements for elements, _ in sizes) * 4 <= max(budget, heads * length * 4)


# ----------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = GptOssForCausalLM(config).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)  # the init's 0.02 would hide the sinks
    return model


def _cache(model: torch.nn.Module, kind: str, max_len: int = 32):
    from transformers import StaticCache

    from production.decode.static_decode import _every_layer_full, _ring_layer

    if kind == "transformers":  # its sliding layers: a rolled static window
        return StaticCache(config=model.config, max_cache_len=max_len)
    cache = StaticCache(config=_every_layer_full(model.config), max_cache_len=max_len)
    if kind == "ring":
        for index, layer_type in enumerate(model.config.layer_types):
            if layer_type == "sliding_attention":
                cache.layers[index] = _ring_layer(model.config.sliding_window)
    return cache


@torch.no_grad()
def _logits(model: torch.nn.Module, cache, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """The prompt's last logits, then those of `steps` one-token steps (tokens fixed)."""
    n = len(prompt)
    positions = torch.arange(n)
    out = [
        model(
            input_ids=torch.tensor([prompt]),
            position_ids=positions.view(1, -1),
            past_key_values=cache,
            use_cache=True,
        ).logits[0, -1]
    ]
    for i in range(steps):
        pos = torch.tensor([n + i])
        step = model(
            input_ids=torch.tensor([[(7 * i + 3) % 128]]),
            position_ids=pos.view(1, 1),
            past_key_values=cache,
            use_cache=True,
        )
        out.append(step.logits[0, -1])
    return out


@pytest.mark.parametrize("length", [5, 20])  # below and above the sliding window
@pytest.mark.parametrize("kind", ["transformers", "full", "ring"])
def test_the_model_with_install_answers_as_eager(
    tiny: torch.nn.Module, kind: str, length: int
) -> None:
    prompt = [(11 * i + 1) % 128 for i in range(length)]
    # Eager on full-size caches is the reference (it cannot read a ring).
    want = _logits(
        tiny, _cache(tiny, "transformers" if kind == "transformers" else "full"), prompt, 6
    )
    assert decode_attention.install(tiny)
    try:
        assert tiny.model.layers[0].self_attn.config._attn_implementation == decode_attention.NAME
        got = _logits(tiny, _cache(tiny, kind), prompt, 6)
    finally:
        decode_attention.uninstall(tiny)
    assert tiny.config._attn_implementation == "eager"
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_install_builds_no_mask_and_uninstall_restores_eager(tiny: torch.nn.Module) -> None:
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    cache = _cache(tiny, "full")
    embeds = torch.zeros(1, 20, tiny.config.hidden_size)
    arguments = {
        "config": tiny.config,
        "inputs_embeds": embeds,
        "attention_mask": None,
        "past_key_values": cache,
        "position_ids": torch.arange(20).view(1, -1),
    }
    assert create_causal_mask(**arguments) is not None  # eager: a [1, 1, 20, 32] mask
    assert decode_attention.install(tiny)
    assert decode_attention.install(tiny)  # a second install changes nothing
    try:
        assert create_causal_mask(**arguments) is None
        assert create_sliding_window_causal_mask(**arguments) is None
    finally:
        decode_attention.uninstall(tiny)
    assert tiny.config._attn_implementation == "eager"
    assert create_causal_mask(**arguments) is not None


def test_install_leaves_other_models_and_implementations_alone(tiny: torch.nn.Module) -> None:
    llama = SimpleNamespace(
        config=SimpleNamespace(model_type="llama", _attn_implementation="eager")
    )
    llama.modules = lambda: iter(())
    assert not decode_attention.install(llama)
    assert llama.config._attn_implementation == "eager"
    tiny.config._attn_implementation = "flex_attention"
    try:
        assert not decode_attention.install(tiny)
        assert tiny.config._attn_implementation == "flex_attention"
    finally:
        tiny.config._attn_implementation = "eager"


def test_a_compiled_step_traces_once_for_every_length() -> None:
    """The step as static_decode compiles it (fullgraph): the length is a tensor read inside
    the op, so a longer conversation neither breaks the graph nor recompiles."""
    from torch._dynamo.testing import CompileCounter

    heads, kv_heads, dim, slots = 4, 2, 16, 64
    k, v, sinks = _tensors(heads, kv_heads, slots, dim)
    module = SimpleNamespace(sinks=sinks, training=False)
    pos = torch.zeros(1, dtype=torch.long)

    def step(q: torch.Tensor) -> torch.Tensor:
        return attention(
            module,
            q,
            k,
            v,
            None,
            0.25,
            s_aux=sinks,
            sliding_window=WINDOW,
            position_ids=pos.view(1, 1),
        )[0]

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for position in (3, 40, 63):
        pos.fill_(position)
        q = torch.randn(1, heads, 1, dim)
        want = _eager(q, k, v, sinks, torch.tensor([position]), 0.25, WINDOW)
        torch.testing.assert_close(compiled(q), want, rtol=0, atol=1e-6)
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------- interpreter

# Two interpreter bugs of Triton 3.6, patched in the subprocess only (the compiled kernels do
# not run this code): with numpy >= 2.4 a loop bound read from memory fails `int()` (it is a
# one-element array; triton-lang/triton#9171), and tl.dot multiplies bf16 operands as their raw
# uint16 bits.
_INTERPRETER_FIXES = """
import numpy as np
import triton.language as tl
import triton.runtime.interpreter as ti

_patch = ti._patch_lang_tensor
def _patch_lang_tensor(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
ti._patch_lang_tensor = _patch_lang_tensor

_dot = ti.InterpreterBuilder.create_dot
def _widen(handle):
    if handle.dtype != tl.bfloat16:
        return handle
    return ti.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
ti.InterpreterBuilder.create_dot = lambda self, a, b, d, *rest: _dot(
    self, _widen(a), _widen(b), d, *rest
)
"""

_KERNEL_CHECK = """
import torch
from production.decode import decode_attention as da

W, S = 8, 300
cases = 0
for heads, kv_heads, dim, dtype in ((4, 2, 16, torch.float32), (6, 2, 24, torch.float32),
                                    (4, 1, 16, torch.bfloat16)):
    g = torch.Generator().manual_seed(heads * dim)
    # [1, S, KV, D] transposed: the kernel must follow the strides, not assume a layout
    k_full = torch.randn(1, S, kv_heads, dim, generator=g).transpose(1, 2)
    v_full = torch.randn(1, S, kv_heads, dim, generator=g).transpose(1, 2)
    for sink_scale in (0.1, 8.0):  # a sink that barely counts, one that takes most weight
        sinks = sink_scale * torch.randn(heads, generator=g)
        for length in (1, W - 1, W, W + 1, 257, S):
            q = torch.randn(1, heads, 1, dim, generator=g)
            pos = torch.tensor([[length - 1]])
            for layout in ("full", "sliding", "ring"):
                window = 0 if layout == "full" else W
                k, v = k_full, v_full
                if layout == "ring":
                    held = min(length, W)
                    order = torch.randperm(held, generator=g)
                    k = torch.full((1, kv_heads, W, dim), 1e4)
                    v = torch.full((1, kv_heads, W, dim), 1e4)
                    k[:, :, order] = k_full[:, :, length - held:length]
                    v[:, :, order] = v_full[:, :, length - held:length]
                want = da.torch_attention(q, k_full, v_full, sinks, pos, 0.3, window)
                # four splits of 16-key tiles (empty, partial and many-tile splits), and the
                # default (one 64-key tile a split here)
                for splits, tile in ((4, {"BLOCK_N": 16}), (None, None))[: 1 + (length == S)]:
                    got = da.decode_step(q.to(dtype), k.to(dtype), v.to(dtype), sinks, pos, 0.3,
                                         window, splits=splits, tile=tile)
                    assert got.dtype == dtype and got.shape == (1, 1, heads, dim)
                    # bf16: the interpreter truncates (the GPU rounds) q, k, v, p and the output
                    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
                    error = (got.float() - want).abs().max().item()
                    assert error < tolerance, (heads, dim, dtype, length, layout, splits, error)
                    cases += 1
print("kernels agree", cases)
"""


def test_the_triton_kernels_compute_the_torch_path_in_the_interpreter() -> None:
    """The decode kernels the GPU runs, executed by Triton's interpreter on the CPU: GQA
    (groups 2, 3 and 4), a head size that is no power of two, strided caches, lengths around
    the window, full / sliding / ring layouts, several and the default splits."""
    pytest.importorskip("triton")
    run = run_in_triton_interpreter(_INTERPRETER_FIXES + _KERNEL_CHECK)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "kernels agree" in run.stdout


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_kernels_compile_for_an_rtx_3090(dtype: str) -> None:
    """Ahead of time, no GPU needed: the kernels lower for Ampere (sm_86) within its 99 KB of
    shared memory a block, specialised as the JIT specialises them on a real cache (16-byte
    aligned buffers, unit stride along D, row strides a multiple of 16)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = decode_attention._triton_kernels()
    itemsize = 2 if dtype == "bf16" else 4
    tile = decode_attention._tile(64, itemsize)
    target = GPUTarget("cuda", 86, 32)
    split = kernels["split"]
    signature = {name: "i32" for name in split.arg_names}
    signature.update({name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr")})
    signature.update(pos_ptr="*i64", m_ptr="*fp32", l_ptr="*fp32", o_ptr="*fp32")
    signature["scale_log2"] = "fp32"
    constants = {
        "q_sd": 1,
        "k_sd": 1,
        "v_sd": 1,
        "GROUPS": 8,
        "HEAD_DIM": 64,
        "SPLITS": 64,
        "BLOCK_G": 16,
        "BLOCK_N": tile["BLOCK_N"],
        "BLOCK_D": tile["BLOCK_D"],
        "PRECISION": "ieee" if dtype == "fp32" else "tf32",
    }
    signature.update(dict.fromkeys(constants, "constexpr"))
    aligned = ("q_ptr", "k_ptr", "v_ptr", "pos_ptr", "m_ptr", "l_ptr", "o_ptr")
    aligned += ("q_sh", "k_sh", "k_ss", "v_sh", "v_ss", "slots")
    attrs = {(split.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    options = {"num_warps": tile["num_warps"], "num_stages": tile["num_stages"]}
    compiled = triton.compile(ASTSource(split, signature, constants, attrs), target, options)
    assert compiled.metadata.shared <= 99 * 1024
    assert "cp.async" in compiled.asm["ptx"]  # the K/V tiles are pipelined

    combine = kernels["combine"]
    signature = {name: "i32" for name in combine.arg_names}
    signature.update({name: "*fp32" for name in ("m_ptr", "l_ptr", "o_ptr")})
    signature.update(sink_ptr=f"*{dtype}", out_ptr=f"*{dtype}")
    constants = {"HEAD_DIM": 64, "SPLITS": 64, "BLOCK_S": 64, "BLOCK_D": 64}
    signature.update(dict.fromkeys(constants, "constexpr"))
    compiled = triton.compile(ASTSource(combine, signature, constants), target)
    assert compiled.metadata.shared <= 99 * 1024


# ----------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SLOTS = 32_768  # the serving window
H, KV, D = 64, 8, 64  # GPT-OSS-20B's attention
SLIDING = 128


def _cache_20b(slots: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    k = torch.randn(1, KV, slots, D, device="cuda", dtype=torch.bfloat16, generator=generator)
    v = torch.randn(1, KV, slots, D, device="cuda", dtype=torch.bfloat16, generator=generator)
    sinks = torch.randn(H, device="cuda", generator=generator).to(torch.bfloat16)
    return k, v, sinks


@pytest.mark.gpu
@needs_cuda
def test_the_kernel_matches_the_torch_path_on_the_20b_shape() -> None:
    k, v, sinks = _cache_20b(SLOTS)
    k32, v32, sinks32 = k.float(), v.float(), sinks.float()
    scaling = D**-0.5
    worst = {}
    for length in (1, 127, 128, 129, 2048, 2049, 5000, SLOTS):
        q = torch.randn(1, H, 1, D, device="cuda", dtype=torch.bfloat16)
        pos = torch.tensor([[length - 1]], device="cuda")
        for layout in ("full", "sliding", "ring"):
            window = 0 if layout == "full" else SLIDING
            want = torch_attention(q.float(), k32, v32, sinks32, pos, scaling, window)
            ring_k, ring_v = k, v
            if layout == "ring":
                held = min(length, SLIDING)
                order = torch.randperm(held, device="cuda")
                ring_k = torch.full((1, KV, SLIDING, D), 1e4, device="cuda", dtype=k.dtype)
                ring_v = torch.full_like(ring_k, 1e4)
                ring_k[:, :, order] = k[:, :, length - held : length]
                ring_v[:, :, order] = v[:, :, length - held : length]
            got = _call(q, ring_k, ring_v, sinks, pos, scaling, window)
            error = (got.float() - want).abs()
            worst[(length, layout)] = error.max().item()
            # bf16 output (half an ulp: 2^-9 of |out| <= 1) and bf16 probabilities into P @ V
            assert error.max().item() < 1.5e-2 and error.mean().item() < 2e-3, (length, layout)
    print("max |kernel - fp32 torch|:", worst)


@pytest.mark.gpu
@needs_cuda
def test_a_captured_step_serves_two_lengths_without_recompiling() -> None:
    from torch._dynamo.utils import counters

    k, v, sinks = _cache_20b(SLOTS, seed=1)
    for buffer in (k, v):  # as StaticCache marks its buffers: read in place, never copied in
        torch._dynamo.mark_static_address(buffer)
    module = SimpleNamespace(sinks=sinks, training=False)
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    q = torch.zeros(1, H, 1, D, dtype=torch.bfloat16, device="cuda")

    def step(q: torch.Tensor) -> torch.Tensor:
        return attention(
            module,
            q,
            k,
            v,
            None,
            D**-0.5,
            s_aux=sinks,
            sliding_window=None,
            position_ids=pos.view(1, 1),
        )[0]

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for length in (100, 5000, 32_768):
        pos.fill_(length - 1)
        for _ in range(3):  # the first calls warm up and record; later ones replay
            q.copy_(torch.randn_like(q))
            torch.compiler.cudagraph_mark_step_begin()
            got = compiled(q).clone()
            want = torch_attention(q.float(), k.float(), v.float(), sinks.float(), pos, D**-0.5)
            assert (got.float() - want).abs().max().item() < 1.5e-2, length
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["inductor"]["cudagraph_skips"]


@pytest.mark.gpu
@needs_cuda
def test_a_step_costs_what_is_present_not_what_is_reserved() -> None:
    """Microseconds per call, one layer of the 20B shape on a 32,768-slot cache: eager (as
    transformers runs a step on a StaticCache: every slot, a [1, 1, 1, S] mask) against this
    kernel, called from Python and replayed in a CUDA graph (as the served step runs)."""
    k, v, sinks = _cache_20b(SLOTS, seed=2)
    q = torch.randn(1, H, 1, D, device="cuda", dtype=torch.bfloat16)
    pos = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    mask = torch.zeros(1, 1, 1, SLOTS, device="cuda", dtype=torch.bfloat16)
    eager_module = SimpleNamespace(num_key_value_groups=H // KV, sinks=sinks, training=False)

    def eager() -> torch.Tensor:
        return eager_attention_forward(eager_module, q, k, v, mask, D**-0.5)[0]

    def kernel() -> torch.Tensor:
        return _call(q, k, v, sinks, pos, D**-0.5, 0)

    def median_us(fn, graph: bool) -> float:
        if graph:
            for _ in range(3):
                fn()
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured):
                fn()
            fn = captured.replay
        for _ in range(20):
            fn()
        times = []
        for _ in range(300):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000)
        return sorted(times)[len(times) // 2]

    print("\n", torch.cuda.get_device_name(), "us per call (median of 300)")
    for length in (256, 4096, SLOTS):
        pos.fill_(length - 1)
        mask.fill_(0)
        mask[..., length:] = torch.finfo(mask.dtype).min
        row = {
            name: median_us(fn, graph)
            for name, fn, graph in (
                ("eager", eager, False),
                ("kernel", kernel, False),
                ("eager graph", eager, True),
                ("kernel graph", kernel, True),
            )
        }
        print(f"L={length:>6}", "  ".join(f"{n}: {t:8.1f}" for n, t in row.items()))
        assert row["kernel graph"] < row["eager graph"], (length, row)


@pytest.mark.gpu
@needs_cuda
def test_a_32k_prompt_stays_within_a_few_score_budgets() -> None:
    """A 32,768-token prompt through one full and one sliding layer of the 20B shape: eager
    would build [64, 32768, 32768] scores (128 GiB in bf16); the chunks stay near the budget."""
    k, v, sinks = _cache_20b(SLOTS, seed=3)
    q = torch.randn(1, H, SLOTS, D, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(SLOTS, device="cuda").view(1, -1)
    for window in (0, SLIDING):
        _call(q[:, :, :256], k, v, sinks, positions[:, :256], D**-0.5, window)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = _call(q, k, v, sinks, positions, D**-0.5, window)
        end.record()
        end.synchronize()
        extra = torch.cuda.max_memory_allocated() - before - out.numel() * out.element_size()
        print(
            f"\n32,768-token prompt, window {window}: {start.elapsed_time(end) / 1000:.2f} s, "
            f"{extra / 2**30:.2f} GiB beyond its output"
        )
        assert extra < 6 * decode_attention.SCORE_BUDGET_BYTES
        # Its last query row is a step at the same position: the kernel must agree (within
        # eager's bf16 scores and softmax, which the prompt path keeps).
        last = _call(q[:, :, -1:], k, v, sinks, positions[:, -1:], D**-0.5, window)
        assert (out[:, -1:].float() - last.float()).abs().max().item() < 3e-2
