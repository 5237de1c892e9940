"""`doctor` on the person's preset says, per GPU, whether serving and training fit, from the
peaks measured on the GPT-OSS-20B shape (benchmarks.gpt_oss_24gb), for the device plan the
daemon would use."""

from __future__ import annotations

from pathlib import Path

from common.config import load_settings
from production.model.doctor import MEASURED_GIB, memory_fit

RTX_3090 = 23.69  # GiB torch reports for a 24 GB card


def _gpus(*totals: float) -> list[dict]:
    return [{"index": i, "total_gib": t} for i, t in enumerate(totals)]


def _settings(tmp_path: Path, more: str = ""):
    (tmp_path / "config.toml").write_text(f'[model]\npreset = "gpt-oss-20b"\n{more}')
    return load_settings(tmp_path)


def test_two_24gb_cards_serve_on_one_and_train_on_the_other(tmp_path: Path) -> None:
    fit = memory_fit(_settings(tmp_path), _gpus(RTX_3090, RTX_3090))
    assert fit["measured_gib"] == MEASURED_GIB["gpt-oss-20b"]
    serving, training = fit["gpus"]
    assert (serving["roles"], serving["fits"]) == (["serving"], True)
    assert (training["roles"], training["fits"]) == (["training"], True)
    assert training["need_gib"] == MEASURED_GIB["gpt-oss-20b"]["training"]


def test_one_24gb_card_cannot_hold_the_worker_and_a_job_at_once(tmp_path: Path) -> None:
    (gpu,) = memory_fit(_settings(tmp_path), _gpus(RTX_3090))["gpus"]
    assert gpu["roles"] == ["serving", "training"] and not gpu["fits"]
    assert "together need about 37.5 GiB" in gpu["problems"][0]
    # A 48 GB card holds both.
    (big,) = memory_fit(_settings(tmp_path), _gpus(47.5))["gpus"]
    assert big["fits"]


def test_a_16gb_card_or_a_tighter_cap_is_named_per_role(tmp_path: Path) -> None:
    small = memory_fit(_settings(tmp_path), _gpus(15.9, 15.9))["gpus"]
    assert small[0]["fits"] is False
    assert "serving needs about 19.1 GiB" in small[0]["problems"][0]
    assert "32768-token window: lower model.context_window" in small[0]["problems"][0]
    assert "training needs about 18.4 GiB" in small[1]["problems"][0]
    # Serving a 32,768-token window needs more than training (measured: 19.1 and 18.4 GiB).
    capped = memory_fit(
        _settings(tmp_path, "[devices]\nmemory_limit_gb = 20\n"), _gpus(RTX_3090, RTX_3090)
    )["gpus"]
    assert not capped[0]["fits"] and capped[1]["fits"]


def test_presets_without_measured_figures_get_no_verdict(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("")
    assert memory_fit(load_settings(tmp_path), _gpus(RTX_3090)) is None


def test_the_serving_window_moves_the_need_by_its_kv_cache(tmp_path: Path) -> None:
    """The preset serves 32,768 tokens, as measured: 0.75 GiB of keys and values (the sliding
    layers keep their last 128 positions); another window moves the need by the difference."""
    fit = memory_fit(_settings(tmp_path), _gpus(RTX_3090, RTX_3090))
    assert (fit["serving_window"], fit["kv_cache_gib"]) == (32768, 0.75)
    assert fit["gpus"][0]["need_gib"] == MEASURED_GIB["gpt-oss-20b"]["serving"] == 19.1
    short = memory_fit(_settings(tmp_path, "context_window = 2048\n"), _gpus(RTX_3090, RTX_3090))
    assert (short["kv_cache_gib"], short["gpus"][0]["need_gib"]) == (0.05, 18.4)
    huge = memory_fit(_settings(tmp_path, "context_window = 131072\n"), _gpus(RTX_3090, RTX_3090))
    assert huge["kv_cache_gib"] == 3.0 and huge["gpus"][0]["need_gib"] == 21.4
