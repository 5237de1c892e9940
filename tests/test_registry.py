"""The candidate registry on real folders and real symlinks (no mocks of the file system)."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from candidates import (
    AlreadyCurrent,
    CandidateExists,
    CandidateMeta,
    CandidateNotFound,
    InvalidCandidate,
    InvalidCandidateId,
    NothingToRollBack,
    Registry,
    new_id,
    read_meta,
    update_meta,
    write_meta,
)

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
LORA_PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"


def write_fake_adapter(folder: Path, *, base_model: str = BASE, rank: int = 4) -> None:
    """Write a small but real PEFT LoRA adapter (config + safetensors weights) into folder."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{LORA_PREFIX}.lora_A.weight": torch.randn(rank, 16),
        f"{LORA_PREFIX}.lora_B.weight": torch.zeros(16, rank),
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj"],
        "base_model_name_or_path": base_model,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def make_meta(candidate_id: str, *, base_model: str = BASE, **fields) -> CandidateMeta:
    return CandidateMeta(id=candidate_id, base_model=base_model, **fields)


_clock = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)


def add(registry: Registry, candidate_id: str) -> str:
    """Create a valid candidate; created_at increases with every call so order is known."""
    global _clock
    _clock += timedelta(minutes=1)
    registry.create(make_meta(candidate_id, created_at=_clock), write_fake_adapter)
    return candidate_id


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "home" / "candidates")


def work_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-")))


# -- meta.json ------------------------------------------------------------------------------


def test_meta_round_trip_and_update(tmp_path: Path) -> None:
    meta = make_meta("m1", config={"lr": 2e-4}, data={"sft": 12}, duration_s=3.5)
    write_meta(tmp_path, meta)
    assert read_meta(tmp_path) == meta
    assert read_meta(tmp_path).created_at.tzinfo is not None

    updated = update_meta(tmp_path, metrics={"win_rate": 0.61}, status="evaluated")
    assert read_meta(tmp_path) == updated
    assert updated.metrics == {"win_rate": 0.61} and updated.config == {"lr": 2e-4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]  # no temp left

    with pytest.raises(ValidationError, match="metircs"):
        update_meta(tmp_path, metircs={"x": 1})
    with pytest.raises(ValueError, match="id"):
        update_meta(tmp_path, id="other")
    assert read_meta(tmp_path) == updated


def test_meta_rejects_unknown_keys_newer_schema_and_naive_time(tmp_path: Path) -> None:
    payload = json.loads(make_meta("m1").model_dump_json())
    (tmp_path / "meta.json").write_text(json.dumps({**payload, "lerning_rate": 1}))
    with pytest.raises(InvalidCandidate, match="lerning_rate"):
        read_meta(tmp_path)

    (tmp_path / "meta.json").write_text(json.dumps({**payload, "schema_version": 2, "new": 1}))
    with pytest.raises(InvalidCandidate, match="schema_version 2, newer than"):
        read_meta(tmp_path)
    with pytest.raises(ValidationError, match="newer than"):
        make_meta("m1", schema_version=2)

    with pytest.raises(ValidationError, match="timezone"):
        make_meta("m1", created_at=datetime(2026, 1, 1))


# -- ids ------------------------------------------------------------------------------------


def test_new_id_is_sortable_and_valid(registry: Registry) -> None:
    ids = [new_id(), registry.new_id()]
    for candidate_id in ids:
        assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", candidate_id)
        assert registry.validate_id(candidate_id) == candidate_id
    assert ids[0][:15] <= ids[1][:15]


BAD_IDS = [
    "../x",
    "../../etc/passwd",
    "/etc",
    "a/b",
    "",
    "current",
    "previous",
    "Current",
    ".hidden",
    "-dash",
    "a..b",
    "x" * 101,
    "id\n",
    "a b",
    "escape",  # a symlink under root pointing outside it (made in the test)
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_are_refused_everywhere(registry: Registry, tmp_path: Path, bad: str) -> None:
    outside = tmp_path / "outside"
    write_fake_adapter(outside)
    write_meta(outside, make_meta("escape"))
    (registry.root / "escape").symlink_to(outside)
    good = add(registry, "good")
    registry.promote(good)

    for call in (
        lambda: registry.get(bad),
        lambda: registry.validate(bad),
        lambda: registry.promote(bad),
        lambda: registry.promote(bad, force=True),
    ):
        with pytest.raises(InvalidCandidateId) as info:
            call()
        assert repr(bad) in str(info.value)

    called = []
    with pytest.raises(InvalidCandidateId):
        registry.create(CandidateMeta.model_construct(id=bad, base_model=BASE), called.append)
    assert called == []  # refused before the trainer is asked to write anything
    assert os.readlink(registry.root / "current") == good
    assert [c.id for c in registry.list()] == [good]


# -- create ---------------------------------------------------------------------------------


def test_create_writes_a_complete_valid_candidate(registry: Registry) -> None:
    candidate = registry.create(make_meta("c1", parent=None), write_fake_adapter)
    assert candidate.valid and candidate.meta is not None and candidate.meta.id == "c1"
    assert candidate.path == registry.root / "c1"
    assert {p.name for p in candidate.path.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "meta.json",
    }
    assert registry.validate("c1", base_model=BASE).id == "c1"
    assert work_entries(registry.root) == []
    with pytest.raises(CandidateExists, match="c1"):
        registry.create(make_meta("c1"), write_fake_adapter)


def test_create_failure_in_write_files_leaves_nothing(registry: Registry) -> None:
    def half_then_fail(folder: Path) -> None:
        write_fake_adapter(folder)
        raise RuntimeError("trainer died while saving")

    with pytest.raises(RuntimeError, match="trainer died"):
        registry.create(make_meta("c1"), half_then_fail)
    assert not os.path.lexists(registry.root / "c1")
    assert work_entries(registry.root) == []
    assert registry.list() == []


def test_create_refuses_incomplete_output(registry: Registry) -> None:
    def config_only(folder: Path) -> None:
        write_fake_adapter(folder)
        (folder / "adapter_model.safetensors").unlink()

    with pytest.raises(InvalidCandidate, match="no adapter weights"):
        registry.create(make_meta("c1"), config_only)
    assert not os.path.lexists(registry.root / "c1")
    assert work_entries(registry.root) == []


def test_crash_before_rename_leaves_nothing_promotable(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object) -> None:
        raise OSError("simulated crash just before the rename")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        registry.create(make_meta("c1"), write_fake_adapter)
    assert work_entries(registry.root) == []
    with pytest.raises(CandidateNotFound):
        registry.promote("c1")

    # kill -9 variant: the cleanup never runs either, so the temp folder stays behind.
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(OSError, match="simulated crash"):
        registry.create(make_meta("c2"), write_fake_adapter)
    monkeypatch.undo()

    (leftover,) = work_entries(registry.root)
    assert registry.list() == []
    assert registry.current_id() is None
    for candidate_id in ("c2", leftover):
        with pytest.raises((CandidateNotFound, InvalidCandidateId)):
            registry.promote(candidate_id)
    # Our own pid is alive, so it is not pruned by pid; the age rule still applies.
    assert registry.prune_temp() == []
    assert registry.prune_temp(max_age_s=0) == [leftover]
    assert work_entries(registry.root) == []


def test_stale_temp_of_dead_process_is_pruned_at_open(registry: Registry) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = registry.root / f".tmp-c1-{child.pid}-0a0b0c0d"
    write_fake_adapter(dead)
    alive = registry.root / f".trash-c2-{os.getpid()}-01020304"
    alive.mkdir()
    Registry(registry.root)
    assert work_entries(registry.root) == [alive.name]


# -- promote / rollback ---------------------------------------------------------------------


def test_promote_and_rollback_swap_relative_links(registry: Registry, tmp_path: Path) -> None:
    a, b, c = add(registry, "a"), add(registry, "b"), add(registry, "c")
    current, previous = registry.root / "current", registry.root / "previous"
    assert registry.current_id() is None and registry.previous_id() is None

    result = registry.promote(a, base_model=BASE)
    assert (result.new_current, result.previous) == (a, None)
    assert os.readlink(current) == a and not os.path.lexists(previous)

    result = registry.promote(b)
    assert (result.new_current, result.previous) == (b, a)
    assert (os.readlink(current), os.readlink(previous)) == (b, a)
    with pytest.raises(AlreadyCurrent, match="already current"):
        registry.promote(b)

    registry.rollback()
    assert (os.readlink(current), os.readlink(previous)) == (a, b)
    registry.rollback()
    assert (os.readlink(current), os.readlink(previous)) == (b, a)

    flags = {x.id: (x.is_current, x.is_previous) for x in registry.list()}
    assert flags == {a: (False, True), b: (True, False), c: (False, False)}
    assert [e["action"] for e in registry.history()] == ["promote"] * 2 + ["rollback"] * 2

    # Relative links: the whole home can be moved and still resolves.
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "home", moved)
    registry = Registry(moved / "candidates")
    assert registry.current_id() == b
    assert (moved / "candidates" / "current" / "adapter_config.json").is_file()


def test_force_is_recorded_but_never_skips_validation(registry: Registry) -> None:
    a = add(registry, "a")
    result = registry.promote(a, force=True)
    assert result.forced and registry.history()[-1]["forced"] is True
    b = add(registry, "b")
    (registry.root / b / "adapter_config.json").unlink()
    with pytest.raises(InvalidCandidate, match=r"adapter_config\.json is missing"):
        registry.promote(b, force=True)
    assert registry.current_id() == a


def test_crash_between_swaps_keeps_current_complete(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = add(registry, "a"), add(registry, "b")
    registry.promote(a)
    real_replace = os.replace
    calls = []

    def replace_then_crash(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash between the two swaps")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_crash)
    with pytest.raises(OSError, match="between the two swaps"):
        registry.promote(b)
    monkeypatch.undo()

    assert [Path(str(p)).name for p in calls] == ["previous", "current"]
    assert os.readlink(registry.root / "current") == a
    assert registry.validate(registry.current_id(), base_model=BASE).id == a
    assert (registry.root / "current" / "adapter_model.safetensors").is_file()
    assert work_entries(registry.root) == []
    assert registry.promote(b).previous == a  # and the retry just works


def test_rollback_without_usable_previous(registry: Registry) -> None:
    with pytest.raises(NothingToRollBack):
        registry.rollback()
    a, b = add(registry, "a"), add(registry, "b")
    registry.promote(a)
    # After the first promotion, rollback returns to the base model; again, to `a`.
    assert registry.rollback().new_current is None
    assert (registry.current_id(), registry.previous_id()) == (None, a)
    assert registry.rollback().new_current == a
    assert (registry.current_id(), registry.previous_id()) == (a, None)
    registry.promote(b)
    (registry.root / a / "meta.json").unlink()
    with pytest.raises(NothingToRollBack, match=r"cannot roll back to a: .*meta.json is missing"):
        registry.rollback()
    assert (registry.current_id(), registry.previous_id()) == (b, a)


def test_dangling_current_is_reported_not_crashed_on(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = add(registry, "a"), add(registry, "b")
    registry.promote(a)
    shutil.rmtree(registry.root / a)
    with caplog.at_level(logging.WARNING, logger="candidates.registry"):
        assert registry.current_id() == a
    assert "dangling" in caplog.text
    assert [c.id for c in registry.list()] == [b]
    with pytest.raises(CandidateNotFound):
        registry.get(a)
    result = registry.promote(b)
    assert (result.new_current, result.previous) == (b, None)  # not kept as previous


# -- validation -----------------------------------------------------------------------------


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    payload = json.loads(path.read_text())
    change(payload)
    path.write_text(json.dumps(payload))


def _truncate(path: Path, drop: int) -> None:
    os.truncate(path, path.stat().st_size - drop)


def _garble_header(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"\xff\x00{["
    path.write_bytes(bytes(raw))


def _huge_header_length(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[:8] = struct.pack("<Q", 2**40)
    path.write_bytes(bytes(raw))


def _wrong_offsets(path: Path) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n :])


def _bin_instead(folder: Path, *, truncate: bool) -> None:
    import torch

    (folder / "adapter_model.safetensors").unlink()
    torch.save({f"{LORA_PREFIX}.lora_A.weight": torch.ones(4, 16)}, folder / "adapter_model.bin")
    if truncate:
        _truncate(folder / "adapter_model.bin", 100)


def _replace_with_file(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.write_text("not a folder")


CFG, WEIGHTS, META = "adapter_config.json", "adapter_model.safetensors", "meta.json"
BROKEN = {
    "missing folder": (lambda f: shutil.rmtree(f), "does not exist"),
    "not a directory": (_replace_with_file, "is not a directory"),
    "no adapter config": (lambda f: (f / CFG).unlink(), "adapter_config.json is missing"),
    "no weights": (lambda f: (f / WEIGHTS).unlink(), "no adapter weights"),
    "config not json": (lambda f: (f / CFG).write_text("{oops"), "not valid JSON"),
    "config no peft_type": (
        lambda f: _edit_json(f / CFG, lambda d: d.pop("peft_type")),
        "has no peft_type",
    ),
    "config no r": (lambda f: _edit_json(f / CFG, lambda d: d.pop("r")), "has no rank 'r'"),
    "config bad r": (lambda f: _edit_json(f / CFG, lambda d: d.update(r=0)), "r=0"),
    # Every file intact, but PEFT would refuse the shapes: found before `current` moves.
    "config r edited": (
        lambda f: _edit_json(f / CFG, lambda d: d.update(r=8)),
        "rank 4, but adapter_config.json says r=8: the adapter would not load",
    ),
    "weights truncated": (lambda f: _truncate(f / WEIGHTS, 10), "is truncated"),
    "weights cut in header": (lambda f: os.truncate(f / WEIGHTS, 20), "header alone needs"),
    "weights tiny": (lambda f: (f / WEIGHTS).write_bytes(b"\x01\x02"), "shorter than"),
    "weights garbled header": (lambda f: _garble_header(f / WEIGHTS), "header is not valid JSON"),
    "weights huge header": (lambda f: _huge_header_length(f / WEIGHTS), "implausible"),
    "weights bad offsets": (lambda f: _wrong_offsets(f / WEIGHTS), "does not fit"),
    "weights trailing bytes": (
        lambda f: (f / WEIGHTS).open("ab").write(b"\0" * 8),
        "trailing bytes",
    ),
    "bin truncated": (lambda f: _bin_instead(f, truncate=True), "adapter_model.bin is corrupt"),
    "meta missing": (lambda f: (f / META).unlink(), "meta.json is missing"),
    "meta not json": (lambda f: (f / META).write_text("[1,"), "meta.json is not valid JSON"),
    "meta unknown key": (
        lambda f: _edit_json(f / META, lambda d: d.update(metircs={})),
        "metircs: Extra inputs are not permitted",
    ),
    "meta newer schema": (
        lambda f: _edit_json(f / META, lambda d: d.update(schema_version=9)),
        "schema_version 9, newer than",
    ),
    "meta id mismatch": (
        lambda f: _edit_json(f / META, lambda d: d.update(id="other")),
        "says id 'other', which does not match 'bad'",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_promote_refuses_invalid_folders(registry: Registry, case: str) -> None:
    good, bad = add(registry, "good"), add(registry, "bad")
    registry.promote(good)
    breaker, message = BROKEN[case]
    breaker(registry.root / bad)

    with pytest.raises(InvalidCandidate) as info:
        registry.promote(bad, force=True)
    assert message in str(info.value)
    assert str(registry.root / bad) in str(info.value)
    assert os.readlink(registry.root / "current") == good
    assert registry.previous_id() is None
    if case not in ("missing folder", "not a directory"):
        (listed,) = [c for c in registry.list() if c.id == bad]
        assert not listed.valid and message in (listed.error or "")


def test_base_model_mismatch_is_refused(registry: Registry) -> None:
    a = add(registry, "a")
    with pytest.raises(InvalidCandidate, match=r"candidate a was trained on .*SmolLM2-135M"):
        registry.promote(a, base_model="unsloth/gpt-oss-20b-unsloth-bnb-4bit")
    with pytest.raises(InvalidCandidate, match=r"the configured base model is other/model$"):
        registry.validate(a, base_model="other/model")
    assert registry.current_id() is None


def test_bin_weights_are_accepted(registry: Registry) -> None:
    def write_bin_adapter(folder: Path) -> None:
        write_fake_adapter(folder)
        _bin_instead(folder, truncate=False)

    registry.create(make_meta("b1"), write_bin_adapter)
    assert registry.promote("b1").new_current == "b1"


# -- retention ------------------------------------------------------------------------------


def test_retain_keeps_current_previous_and_newest(registry: Registry) -> None:
    ids = [add(registry, f"c{i}") for i in range(6)]
    registry.promote(ids[0])
    registry.promote(ids[1])

    assert registry.retain(2) == ["c2", "c3"]
    assert [c.id for c in registry.list()] == ["c0", "c1", "c4", "c5"]
    assert work_entries(registry.root) == []
    assert registry.retain(10) == []
    assert registry.retain(0) == ["c4", "c5"]
    assert (registry.current_id(), registry.previous_id()) == ("c1", "c0")
    with pytest.raises(ValueError):
        registry.retain(-1)


# -- concurrency ----------------------------------------------------------------------------


def _promote_many(root: str, candidate_id: str, times: int) -> None:
    registry = Registry(root)
    for _ in range(times):
        with contextlib.suppress(AlreadyCurrent):
            registry.promote(candidate_id)
        time.sleep(0.001)


def test_concurrent_promotes_never_leave_current_dangling(registry: Registry) -> None:
    a, b = add(registry, "a"), add(registry, "b")
    registry.promote(a)
    link = registry.root / "current"
    # fork: the children only touch the registry, and spawning would re-import torch.
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_promote_many, args=(str(registry.root), x, 20)) for x in (a, b)
    ]
    for worker in workers:
        worker.start()
    seen = set()
    while any(w.is_alive() for w in workers):
        target = os.readlink(link)  # must always exist: each swap is one rename
        assert target in (a, b), target
        assert (registry.root / target / "meta.json").is_file()
        seen.add(target)
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
    assert registry.current_id() in (a, b)
    assert {registry.current_id(), registry.previous_id()} == {a, b}
    assert work_entries(registry.root) == []
    assert len(registry.history()) >= 2
    assert seen


def test_package_does_not_import_torch() -> None:
    # The orchestrator imports this package and must never load torch or peft.
    code = (
        "import sys, candidates, candidates.registry, candidates.meta; "
        "bad = {'torch', 'transformers', 'peft', 'safetensors'} & set(sys.modules); "
        "sys.exit(f'imported {sorted(bad)}' if bad else 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def _write_expert_adapter(folder: Path, *, experts: int = 4, rank: int = 4) -> None:
    """A LoRA on GPT-OSS's 3-D expert weights as PEFT's target_parameters saves it (Unsloth
    targets them so): one rank-r factor per expert, stacked, beside a plain q_proj LoRA."""
    import torch
    from safetensors.torch import load_file, save_file

    write_fake_adapter(folder, rank=rank)

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    experts_prefix = "base_model.model.model.layers.0.mlp.experts.base_layer"
    tensors[f"{experts_prefix}.lora_A.weight"] = torch.randn(rank * experts, 16)
    tensors[f"{experts_prefix}.lora_B.weight"] = torch.zeros(32, rank * experts)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    (folder / "adapter_config.json").write_text(json.dumps(config))


def test_an_expert_lora_stacked_per_expert_is_valid_and_an_edited_r_still_caught(
    registry: Registry,
) -> None:
    # The GPU run of the person's model (GPT-OSS, Unsloth) saved exactly this: the rank check
    # refused the stacked [r x experts, in] factors and no GPT-OSS candidate was ever written.
    registry.create(make_meta("moe"), _write_expert_adapter)
    registry.promote("moe")
    assert registry.current_id() == "moe"

    registry.create(make_meta("moe-edited"), _write_expert_adapter)
    _edit_json(registry.root / "moe-edited" / CFG, lambda d: d.update(r=3))
    with pytest.raises(InvalidCandidate, match="says r=3: the adapter would not load"):
        registry.promote("moe-edited")
    assert registry.current_id() == "moe"
