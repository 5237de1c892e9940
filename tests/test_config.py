"""Config: precedence, and errors that name the key, the value, the source and the rule."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.config import ConfigError, device_plan, load_settings
from tests.conftest import run_cli


def write_config(home: Path, text: str) -> None:
    (home / "config.toml").write_text(text)


def test_defaults_are_valid_and_embedded(home: Path) -> None:
    settings = load_settings(home, gpu_count=0)
    assert settings.model.base_model == "embedded:smollm2-135m-instruct"
    assert settings.server.host == "127.0.0.1"
    assert settings.db_url == f"sqlite:///{home.resolve()}/whetstone.db"
    assert set(settings.training.profiles) == {"quick_test", "standard", "full"}


def test_precedence_toml_then_env_then_cli(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(home, "[server]\nport = 9001\nmax_queue = 3\n[lora]\nr = 8\n")
    assert load_settings(home, gpu_count=0).server.port == 9001
    monkeypatch.setenv("WHETSTONE_SERVER__PORT", "9002")
    settings = load_settings(home, gpu_count=0)
    assert (settings.server.port, settings.server.max_queue, settings.lora.r) == (9002, 3, 8)
    settings = load_settings(home, {"server": {"port": 9003}}, gpu_count=0)
    assert (settings.server.port, settings.server.max_queue) == (9003, 3)


def test_tuning_one_profile_keeps_the_others(home: Path) -> None:
    write_config(home, "[training.profiles.quick_test]\nmax_steps = 7\n")
    profiles = load_settings(home, gpu_count=0).training.profiles
    assert profiles["quick_test"].max_steps == 7
    assert profiles["quick_test"].batch_size == 4  # built-in value kept
    assert profiles["standard"].max_steps == 200


def test_gpt_oss_preset_fills_the_model_section_and_explicit_keys_win(home: Path) -> None:
    write_config(home, '[model]\npreset = "gpt-oss-20b"\nmax_seq_length = 4096\n')
    model = load_settings(home, gpu_count=0).model
    assert model.base_model == "unsloth/gpt-oss-20b-unsloth-bnb-4bit"
    assert (model.chat_format, model.load_in_4bit, model.backend) == ("harmony", True, "auto")
    assert model.max_seq_length == 4096
    # Training rows and the served conversation have their own lengths.
    assert (model.context_window, model.serving_window) == (32768, 32768)


def test_the_serving_window_follows_the_training_rows_unless_set(home: Path) -> None:
    write_config(home, "[model]\nmax_seq_length = 1024\n")
    assert load_settings(home).model.serving_window == 1024
    write_config(home, "[model]\nmax_seq_length = 1024\ncontext_window = 8192\n")
    model = load_settings(home).model
    assert (model.max_seq_length, model.serving_window) == (1024, 8192)


def test_gpt_oss_preset_sets_the_notes_lora_shape_and_explicit_lora_keys_win(home: Path) -> None:
    write_config(home, '[model]\npreset = "gpt-oss-20b"\n')
    lora = load_settings(home, gpu_count=0).lora
    assert (lora.r, lora.alpha) == (8, 16)
    write_config(home, '[model]\npreset = "gpt-oss-20b"\n[lora]\nr = 32\n')
    lora = load_settings(home, gpu_count=0).lora
    assert (lora.r, lora.alpha) == (32, 16)
    write_config(home, '[model]\npreset = "smollm2-135m"\n')
    assert (load_settings(home, gpu_count=0).lora.r, load_settings(home).lora.alpha) == (16, 32)


def test_the_served_rank_reserve_covers_every_profile_and_what_the_search_may_adopt(
    home: Path,
) -> None:
    # The GPT-OSS engine sizes its compiled expert-LoRA buffers once: an adapter of a larger
    # rank than this would make it re-trace mid-serving (see production/engine.py).
    write_config(home, '[model]\npreset = "gpt-oss-20b"\n')
    settings = load_settings(home, gpu_count=0)
    assert settings.lora.r == 8 and settings.largest_lora_rank() == 32
    write_config(home, '[model]\npreset = "gpt-oss-20b"\n[experiments]\nenabled = "off"\n')
    settings = load_settings(home, gpu_count=0)
    assert settings.largest_lora_rank() == max(
        settings.lora_rank(name) for name in settings.training.profiles
    )
    write_config(
        home,
        '[model]\npreset = "gpt-oss-20b"\n[experiments]\nenabled = "off"\n'
        "[training.profiles.full]\nlora_r = 64\n",
    )
    assert load_settings(home, gpu_count=0).largest_lora_rank() == 64


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[server]\nprot = 3\n", "server.prot = 3 (from {cfg}): unknown key"),
        ("[server]\nport = 70000\n", "server.port = 70000 (from {cfg}): Input should be less"),
        (
            "[training.profiles.quick_test]\nmax_steps = -5\n",
            "training.profiles.quick_test.max_steps = -5 (from {cfg}): Input should be greater",
        ),
        ('[devices]\nproduction = "gpu"\n', "devices.production = 'gpu' (from {cfg}): allowed are"),
        ('[schedule]\nnightly_cron = "0 25 * * *"\n', "schedule.nightly_cron = '0 25 * * *'"),
        ('[training]\ndefault_profile = "huge"\n', "training.default_profile = 'huge'"),
        ("[model]\nchat_format = 'chatml'\n", "model.chat_format = 'chatml'"),
        (
            "[training.profiles.quick_test]\ndpo_sft_weight = -1\n",
            "training.profiles.quick_test.dpo_sft_weight = -1 (from {cfg}): Input should be",
        ),
        (
            '[training.profiles.quick_test]\noptimizer = "sgd"\n',
            "training.profiles.quick_test.optimizer = 'sgd' (from {cfg}): Input should be 'auto'",
        ),
        ('[schedule]\nnightly_profile = "huge"\n', "schedule.nightly_profile = 'huge' is not a"),
        ("[daemon]\nmax_restarts = -1\n", "daemon.max_restarts = -1 (from {cfg}): Input should"),
        ('[gate]\nfew_held_out = "promote"\n', "gate.few_held_out = 'promote' (from {cfg}): Input"),
        (
            "[training]\ncorrection_variants = 99\n",
            "training.correction_variants = 99 (from {cfg}): Input should be less",
        ),
        (
            "[training]\nmin_person_validation_rows = 0\n",
            "training.min_person_validation_rows = 0 (from {cfg}): Input should be greater",
        ),
        ("[watch]\nmargin = -0.5\n", "watch.margin = -0.5 (from {cfg}): Input should"),
        ('[server]\ndecode = "fast"\n', "server.decode = 'fast' (from {cfg}): Input should be"),
        (
            '[training]\npadding_free = "yes"\n',
            "training.padding_free = 'yes' (from {cfg}): Input should be 'auto'",
        ),
        (
            '[training]\nstart_from = "yesterday"\n',
            "training.start_from = 'yesterday' (from {cfg}): Input should be 'champion'",
        ),
        (
            "[training]\nearlier_rows_per_new = -1\n",
            "training.earlier_rows_per_new = -1 (from {cfg}): Input should be greater",
        ),
        (
            "[training]\ncontinue_epochs = 0\n",
            "training.continue_epochs = 0 (from {cfg}): Input should be greater",
        ),
        (
            "[training]\nmax_epochs = 0\n",
            "training.max_epochs = 0 (from {cfg}): Input should be greater",
        ),
        (
            "[training]\ncontinue_learning_rate_scale = 2\n",
            "training.continue_learning_rate_scale = 2 (from {cfg}): Input should be less",
        ),
        (
            "[model]\ncontext_window = 64\n",
            "model.context_window = 64 (from {cfg}): Input should be greater",
        ),
        (
            "[training]\nearlier_corrections_max = -1\n",
            "training.earlier_corrections_max = -1 (from {cfg}): Input should be greater",
        ),
        (
            "[training]\ncontinue_max_drift_share = -0.5\n",
            "training.continue_max_drift_share = -0.5 (from {cfg}): Input should be greater",
        ),
    ],
)
def test_bad_values_name_the_key_value_and_source(home: Path, toml: str, expected: str) -> None:
    write_config(home, toml)
    with pytest.raises(ConfigError) as err:
        load_settings(home, gpu_count=1)
    assert expected.format(cfg=home.resolve() / "config.toml") in str(err.value)


def test_cuda_device_beyond_the_machine_is_refused(home: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"devices.development = 'cuda:7': this machine has 1 GPU"
    ):
        load_settings(home, {"devices": {"development": "cuda:7"}}, gpu_count=1)
    with pytest.raises(ConfigError, match="devices.production = 'cuda': this machine has no CUDA"):
        load_settings(home, {"devices": {"production": "cuda"}}, gpu_count=0)
    ok = load_settings(home, {"devices": {"development": "cuda:1"}}, gpu_count=2)
    assert ok.devices.development == "cuda:1"


def test_env_errors_name_the_variable(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHETSTONE_SERVER__PORT", "-1")
    with pytest.raises(
        ConfigError, match=r"server.port = '-1' \(from environment WHETSTONE_SERVER"
    ):
        load_settings(home, gpu_count=0)
    monkeypatch.delenv("WHETSTONE_SERVER__PORT")
    monkeypatch.setenv("WHETSTONE_SERVR__PORT", "1")
    with pytest.raises(ConfigError, match="environment WHETSTONE_SERVR__PORT: unknown key 'servr'"):
        load_settings(home, gpu_count=0)


def test_broken_toml_is_refused_with_its_path(home: Path) -> None:
    write_config(home, "[server\nport = 1\n")
    with pytest.raises(ConfigError, match="config.toml is not valid TOML"):
        load_settings(home, gpu_count=0)


def test_cli_refuses_bad_config_with_exit_2_and_logs_resolved_config(home: Path) -> None:
    bad = run_cli("status", "--home", str(home), "--set", "server.port=70000")
    assert bad.returncode == 2
    assert "server.port = 70000 (from command line)" in bad.stderr
    junk = run_cli("status", "--home", str(home), "--set", "nonsense")
    assert junk.returncode == 2 and "expected KEY=VALUE" in junk.stderr
    good = run_cli("status", "--home", str(home), "--set", "lora.r=4", "--set", "log_level=DEBUG")
    assert good.returncode == 0, good.stderr
    assert "resolved config:" in good.stderr and '"r": 4' in good.stderr


def test_an_explicit_second_gpu_is_accepted_inside_the_worker_pinned_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """devices.development = "cuda:1" on a two-GPU machine: the daemon pins the job with
    CUDA_VISIBLE_DEVICES=1, where nvidia-smi lists one GPU; the job must not refuse its own
    config (every job used to exit with a config error)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\necho '0, NVIDIA GeForce RTX 3090, 24576, 24000'\n"
        "echo '1, NVIDIA GeForce RTX 3090, 24576, 24000'\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[devices]\nproduction = "cuda:0"\ndevelopment = "cuda:1"\n')

    assert load_settings(home).devices.development == "cuda:1"  # the daemon: two GPUs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(ConfigError, match="devices.development = 'cuda:1'"):
        load_settings(home)  # a plain process that sees one GPU is still refused
    monkeypatch.setenv("WHETSTONE_WORKER_DEVICE", "cuda:0")
    assert load_settings(home).devices.development == "cuda:1"  # the pinned job


def _fake_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    rows = "".join(f"echo '{i}, NVIDIA GeForce RTX 3090, 24576, 24000'\n" for i in range(count))
    fake.write_text(f"#!/bin/sh\n{rows}")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    for var in ("CUDA_VISIBLE_DEVICES", "WHETSTONE_GPUS", "WHETSTONE_WORKER_DEVICE"):
        monkeypatch.delenv(var, raising=False)


def test_a_training_run_started_by_the_serving_worker_goes_to_the_training_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`POST /v1/train` under `whetstone serve` starts the job from inside the API worker,
    which is pinned to the serving GPU: the job must still get the training GPU (it used to
    plan over the one GPU the worker sees, and train beside the chat)."""
    from common import devices

    _fake_gpus(tmp_path, monkeypatch, 2)
    home = tmp_path / "home"
    home.mkdir()
    settings = load_settings(home)
    serving_env, inside = devices.worker_env(device_plan(settings, 2).production)
    assert (serving_env["CUDA_VISIBLE_DEVICES"], inside) == ("0", "cuda:0")
    monkeypatch.setenv("WHETSTONE_WORKER_DEVICE", inside)
    for var, value in serving_env.items():
        monkeypatch.setenv(var, value)
    job = devices.child_env(load_settings(home), "development")
    assert (job["CUDA_VISIBLE_DEVICES"], job["WHETSTONE_WORKER_DEVICE"]) == ("1", "cuda:0")


def test_gpus_hidden_from_whetstone_stay_hidden_from_its_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started with CUDA_VISIBLE_DEVICES=2,3 on a four-GPU machine, whetstone serves on GPU 2
    and trains on GPU 3 (cuda:1 among its two), never on GPUs 0 or 1."""
    from common import devices

    _fake_gpus(tmp_path, monkeypatch, 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    home = tmp_path / "home"
    home.mkdir()
    settings = load_settings(home)
    assert devices.child_env(settings, "production")["CUDA_VISIBLE_DEVICES"] == "2"
    assert devices.child_env(settings, "development")["CUDA_VISIBLE_DEVICES"] == "3"


@pytest.mark.parametrize(
    ("setup", "env", "message"),
    [
        (lambda h: (h / "config.toml").mkdir(), {}, "config.toml is a folder"),
        (
            lambda h: (h / "config.toml").write_bytes(b"\xff\xfe[model]\n"),
            {},
            "config.toml is not UTF-8 text: byte 0xff at position 0",
        ),
        (lambda h: None, {"WHETSTONE_SERVER": "{bad"}, "environment WHETSTONE_SERVER: not valid"),
        (
            lambda h: None,
            {"WHETSTONE_DATABASE_URL": "postgresql+nope://x"},
            "database_url = 'postgresql+nope://x' (from environment WHETSTONE_DATABASE_URL)",
        ),
    ],
)
def test_broken_settings_get_a_message_not_a_traceback(tmp_path: Path, setup, env, message) -> None:
    home = tmp_path / "home"
    home.mkdir()
    setup(home)
    done = run_cli("status", "--home", str(home), env=env)
    assert done.returncode != 0
    assert message in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_status_at_a_mistyped_home_says_so_and_creates_nothing(tmp_path: Path) -> None:
    typo = tmp_path / "hoem"
    for command in ("status", "candidates"):
        done = run_cli(command, "--home", str(typo))
        assert done.returncode == 1
        assert f"no whetstone home at {typo}" in done.stderr + done.stdout
    assert not typo.exists()


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8321"),
        ("0.0.0.0", "http://127.0.0.1:8321"),
        ("::", "http://127.0.0.1:8321"),
        ("::1", "http://[::1]:8321"),
        ("fe80::2", "http://[fe80::2]:8321"),
    ],
)
def test_the_daemon_and_the_chat_reach_the_worker_at_a_url_httpx_accepts(
    home: Path, host: str, url: str
) -> None:
    import httpx

    from orchestrator.daemon import ApiSupervisor
    from tui.client import home_locator

    write_config(home, f'[server]\nhost = "{host}"\n')
    settings = load_settings(home)
    supervisor = ApiSupervisor(settings, lambda: None, ["true"])
    locate, _token = home_locator(settings)
    assert supervisor.url == locate() == url
    # An IPv6 loopback bind used to give http://::1:8321, which httpx refuses.
    assert httpx.URL(supervisor.url + "/health").port == 8321


def test_the_api_worker_keeps_its_compiled_step_in_the_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart of the worker (a crash, a reboot, systemd's private /tmp) finds torch.compile's
    and Triton's caches in the home, not in a /tmp that may be gone; the environment wins."""
    from production.model.device_pin import pin_device

    for name in (
        "TORCHINDUCTOR_CACHE_DIR",
        "TRITON_CACHE_DIR",
        "CUDA_VISIBLE_DEVICES",
        "WHETSTONE_WORKER_DEVICE",
        "PYTORCH_CUDA_ALLOC_CONF",
    ):
        # setenv first: pytest then restores the variable's absence after the test, where
        # delenv of a missing variable records nothing and pin_device's values would leak.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    settings = load_settings(tmp_path / "home", {"devices": {"production": "cpu"}})
    assert pin_device(settings, "production") == "cpu"
    compiled = tmp_path / "home" / "cache" / "compile"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(compiled / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(compiled / "triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/elsewhere")
    pin_device(settings, "production")
    assert os.environ["TRITON_CACHE_DIR"] == "/elsewhere"
