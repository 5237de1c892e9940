"""The CLI on a real home: status, candidates, promote/rollback with the audit log, export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from candidates import Registry
from data.store import Store
from tests.conftest import run_cli
from tests.test_registry import make_meta, write_fake_adapter

BASE = "embedded:smollm2-135m-instruct"


def add_candidate(home: Path, candidate_id: str, *, base_model: str = BASE) -> Path:
    registry = Registry(home / "candidates")
    return registry.create(make_meta(candidate_id, base_model=base_model), write_fake_adapter).path


def cli_json(*args: str) -> object:
    result = run_cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_status_of_a_fresh_home(home: Path) -> None:
    data = cli_json("status", "--home", str(home))
    assert data["run_state"] == "stopped"
    assert data["current_adapter"] is None
    assert data["counts"]["conversations"] == 0
    assert (home / "whetstone.db").exists()


def test_promote_needs_the_gate_or_force_and_is_audited(home: Path) -> None:
    add_candidate(home, "cand-a")
    add_candidate(home, "cand-b")

    refused = run_cli("promote", "cand-a", "--home", str(home))
    assert refused.returncode == 1
    assert "has not passed the gate: it has no evaluation yet" in refused.stderr
    assert not (home / "candidates" / "current").exists()

    assert run_cli("promote", "cand-a", "--home", str(home), "--force").returncode == 0
    store = Store(f"sqlite:///{home}/whetstone.db")
    store.record_evaluation("cand-b", decision="promote", rule="beat champion by 0.05")
    passed = run_cli("promote", "cand-b", "--home", str(home))
    assert passed.returncode == 0, passed.stderr
    assert os.readlink(home / "candidates" / "current") == "cand-b"
    assert os.readlink(home / "candidates" / "previous") == "cand-a"

    rows = {row["id"]: row for row in cli_json("candidates", "--home", str(home))}
    assert rows["cand-b"]["current"] and rows["cand-a"]["previous"]
    assert rows["cand-b"]["decision"] == "promote"

    back = run_cli("rollback", "--home", str(home))
    assert back.returncode == 0, back.stderr
    assert os.readlink(home / "candidates" / "current") == "cand-a"
    log = [(p.action, p.candidate_id, p.forced) for p in reversed(store.list_promotions())]
    assert log == [
        ("promote", "cand-a", True),
        ("promote", "cand-b", False),
        ("rollback", "cand-a", False),
    ]
    status = cli_json("status", "--home", str(home))
    assert status["current_adapter"] == "cand-a"
    assert status["last_promotion"]["action"] == "rollback"


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("truncate", "truncated"),
        ("no-config", "adapter_config.json"),
        ("other-base", "was trained on"),
    ],
)
def test_broken_candidates_are_refused_even_with_force(
    home: Path, breakage: str, message: str
) -> None:
    add_candidate(home, "good")
    assert run_cli("promote", "good", "--home", str(home), "--force").returncode == 0
    folder = add_candidate(
        home, "bad", base_model="some/other-model" if breakage == "other-base" else BASE
    )
    if breakage == "truncate":
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-10])
    elif breakage == "no-config":
        (folder / "adapter_config.json").unlink()
    result = run_cli("promote", "bad", "--home", str(home), "--force")
    assert result.returncode == 1
    assert message in result.stderr
    assert os.readlink(home / "candidates" / "current") == "good"


def test_bad_ids_and_nothing_to_roll_back(home: Path) -> None:
    traversal = run_cli("promote", "../../etc", "--home", str(home), "--force")
    assert traversal.returncode == 1 and "invalid candidate id" in traversal.stderr
    nothing = run_cli("rollback", "--home", str(home))
    assert nothing.returncode == 1 and "nothing to roll back" in nothing.stderr


def test_export_writes_trl_files(home: Path, tmp_path: Path) -> None:
    store = Store(f"sqlite:///{home}/whetstone.db")
    conv = store.create_conversation(system_prompt="Be brief.")
    store.add_message(conv.id, "user", "Where do I live?")
    answer = store.add_message(conv.id, "assistant", "Paris.", finish_reason="stop")
    store.add_feedback(answer.id, rating=2, correction="You live in Lyon.")
    out = tmp_path / "export"
    result = run_cli("export", "--home", str(home), "--out", str(out))
    assert result.returncode == 0, result.stderr
    sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    assert sft[0]["messages"][-1] == {"role": "assistant", "content": "You live in Lyon."}
    dpo = json.loads((out / "dpo.jsonl").read_text().splitlines()[0])
    assert (
        dpo["chosen"][0]["content"] == "You live in Lyon."
        and dpo["rejected"][0]["content"] == "Paris."
    )


def test_export_to_a_place_it_cannot_write_is_a_message(home: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker / "export", Path("/proc/whetstone-export")):  # root ignores modes
        result = run_cli("export", "--home", str(home), "--out", str(out))
        assert result.returncode == 1
        assert f"cannot write the export to {out}" in result.stderr + result.stdout
        assert "Traceback" not in result.stderr


def test_a_run_queued_before_the_machine_went_off_still_waits_for_the_daemon(home: Path) -> None:
    """No daemon runs; a run queued with one hours ago (it never got a process) stays queued
    through `status`, so the daemon starts it when it next runs (it used to be marked failed
    after 10 minutes by any command that looked)."""
    from datetime import UTC, datetime, timedelta

    from data.models import TrainingRun

    assert run_cli("status", "--home", str(home)).returncode == 0  # creates the database
    with Store(f"sqlite:///{home}/whetstone.db") as store:
        run = store.create_run("quick_test", "nightly")
        with store.session() as session:
            session.get(TrainingRun, run.id).created_at = datetime.now(UTC) - timedelta(hours=9)
    for _ in range(2):
        shown = run_cli("status", "--home", str(home), "--json")
        assert shown.returncode == 0, shown.stderr
    with Store(f"sqlite:///{home}/whetstone.db") as store:
        kept = store.get_run(run.id)
    assert (kept.status, kept.error) == ("queued", None)


def test_serving_with_a_token_others_can_read_is_a_message(home: Path) -> None:
    token = home / "token"
    token.write_text("secret-token\n")
    token.chmod(0o644)
    for command in ("serve", "up"):
        result = run_cli(command, "--home", str(home), timeout=120)
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"{token} is readable by others (mode 644); run: chmod 600" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_swap_whose_audit_row_was_never_written_is_recorded_on_the_next_look(
    home: Path,
) -> None:
    """A promotion killed between moving `current` and writing its audit row (the state a
    kill -9 leaves): the next `status` (or daemon start, promote, rollback) writes the row,
    once, saying it was recovered."""
    add_candidate(home, "cand-a")
    add_candidate(home, "cand-b")
    assert run_cli("promote", "cand-a", "--home", str(home), "--force").returncode == 0
    Registry(home / "candidates").promote("cand-b", base_model=None, force=True)  # no row

    for _ in range(2):
        assert cli_json("status", "--home", str(home))["current_adapter"] == "cand-b"
    store = Store(f"sqlite:///{home}/whetstone.db")
    log = [(p.action, p.candidate_id, p.previous_id, p.actor) for p in store.list_promotions()]
    assert log[0] == ("promote", "cand-b", "cand-a", "recovery")
    assert len(log) == 2
    assert "recovered" in store.list_promotions(limit=1)[0].reason


@pytest.fixture
def read_only_home(tmp_path: Path):
    """A home with a database, on a file system mounted read-only (a full or failing disk,
    a backup mounted ro); skipped where this user cannot mount (root ignores file modes)."""
    import shutil
    import subprocess

    mount = tmp_path / "mnt"
    mount.mkdir()
    if (
        shutil.which("mount") is None
        or (
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mount)], capture_output=True)
        ).returncode
    ):
        pytest.skip("cannot mount a tmpfs here")
    try:
        home = mount / "home"
        assert run_cli("export", "--home", str(home)).returncode == 0  # creates it
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield home
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_every_command_on_a_read_only_home_is_a_message(read_only_home: Path) -> None:
    before = (read_only_home / "whetstone.db").read_bytes()
    for command in (
        ["status"],
        ["candidates"],
        ["export"],
        ["rollback"],
        ["token"],
        ["train"],
        ["promote", "cand-x"],
    ):
        done = run_cli(*command, "--home", str(read_only_home))
        assert done.returncode != 0, command
        assert "error:" in done.stderr, (command, done.stderr[-500:])
        assert "Traceback" not in done.stderr, (command, done.stderr[-2000:])
    assert (read_only_home / "whetstone.db").read_bytes() == before


def test_what_a_newcomer_reads_names_things_as_they_are(home: Path) -> None:
    """Seen by a first-hour user: a candidate that does not exist was "not passed the gate",
    run counts printed as a Python dict, ids cut at 80 columns, flags shown as `<bool>`."""
    for command in ("promote", "report"):
        missing = run_cli(command, "cand-nope", "--home", str(home))
        assert missing.returncode == 1
        assert "there is no candidate cand-nope: `whetstone candidates` lists them" in (
            missing.stderr
        ), missing.stderr
    long_id = "cand-20261206-165959-0123abcd"
    add_candidate(home, long_id)
    narrow = {"COLUMNS": "80"}
    listed = run_cli("candidates", "--home", str(home), env=narrow)
    assert long_id in listed.stdout, listed.stdout
    # A path printed for the person to copy (or a script to open) stays on one line, piped
    # (80 columns) or not: `train --wait | tee log` cut the report's path in two.
    folder = home / "candidates" / long_id
    (folder / "report.md").write_text("# Evaluation report\n")
    page = str(folder / "report.html")
    assert len(page) > 80
    assert run_cli("report", long_id, "--html", "--home", str(home), env=narrow).stdout == (
        page + "\n"
    )
    shown = run_cli("report", long_id, "--home", str(home), env=narrow).stdout
    assert f"HTML with plots: {page}\n" in shown, shown
    status = run_cli("status", "--home", str(home), env=narrow)
    assert "runs: none" in status.stdout and "{" not in status.stdout, status.stdout
    assert "after 25 more rating(s) or correction(s)" in " ".join(status.stdout.split())
    for command, flag in (("train", "--wait"), ("status", "--json"), ("promote", "--force")):
        shown = run_cli(command, "--help", env=narrow)
        for option in (flag, "--help"):
            line = next(x for x in shown.stdout.splitlines() if option in x)
            assert "<bool>" not in line, line


def test_the_banner_names_whetstone_as_the_shell_can_run_it(monkeypatch) -> None:
    """After `make run`, .venv/bin is not on the PATH: `whetstone chat` was `command not
    found`. The banner's command is the full path then, the bare name when the shell finds
    this installation's script."""
    import sys

    from common.entrypoint import whetstone_command

    script = Path(sys.executable).with_name("whetstone")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert whetstone_command() == str(script)
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")
    assert whetstone_command() == "whetstone"


def test_doctor_ends_with_what_to_do_next(home_with_model: Path) -> None:
    done = run_cli("doctor", "--home", str(home_with_model), env={"COLUMNS": "300"})
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("next: `") and f"chat --home {home_with_model}`" in last, last
