"""`whetstone doctor`'s checks: the embedded default model prepared once, the torch probe
(each in its own process: the orchestrator never imports torch), the database; and the
report as the table the command prints."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from rich.table import Table

from common.config import EMBEDDED_MODEL, Settings
from common.entrypoint import whetstone_command
from orchestrator.cli_output import fail

if TYPE_CHECKING:
    from data.store import Store


def machine_report(settings: Settings, *, prepare: bool) -> dict[str, Any]:
    """Prepare the embedded model (with `prepare`, when it is the one configured), then ask
    the torch probe about this machine; its report, with the home's settings added."""
    paths = settings.paths.create()
    if prepare and settings.model.base_model == EMBEDDED_MODEL:
        # Runs in its own process: the conversion imports torch, the orchestrator never does.
        code = subprocess.call(
            [sys.executable, "-m", "production.model.base_model", "--home", str(paths.root)],
            stdout=subprocess.DEVNULL,
        )
        if code != 0:
            raise fail("preparing the embedded default model failed (see above)")
        # Its answers to the replay prompts are made by the daemon once its API is up (the
        # person chats meanwhile), or by the first training run: not here, where they held
        # `make run`'s first chat back 155 s.
    probe = subprocess.run(
        [sys.executable, "-m", "production.model.doctor", "--home", str(paths.root)],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        raise fail(f"the torch probe failed:\n{probe.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(probe.stdout.strip().splitlines()[-1])
    report["home"] = str(paths.root)
    report["config_file"] = str(paths.config_file) if paths.config_file.exists() else None
    report["model_profile"] = settings.model.model_dump()
    report["devices"] = settings.devices.model_dump()
    return report


def database_report(settings: Settings, store: Store) -> dict[str, Any]:
    """The store's URL and schema revision."""
    from data.db import schema_version

    return {"url": settings.db_url, "schema_version": schema_version(store.engine)}


def report_table(settings: Settings, report: dict[str, Any]) -> Table:
    """The report as a two-column table: versions, GPUs, whether the model loads and fits."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("home", report["home"])
    table.add_row("python", report["python"])
    table.add_row("torch", f"{report['torch']} (CUDA {report['cuda_version'] or 'none'})")
    if report["cuda_devices"]:
        for dev in report["cuda_devices"]:
            table.add_row(
                f"cuda:{dev['index']}",
                f"{dev['name']}: {dev['free_gib']} GiB free of {dev['total_gib']} GiB",
            )
    else:
        table.add_row("GPUs", "none: serving and training run on the CPU")
    for name, version in report["versions"].items():
        table.add_row(name, version or "not installed")
    model = report["model"]
    table.add_row("model profile", f"{settings.model.preset}: {settings.model.base_model}")
    if model["loadable"]:
        took = f" (loads in {model['load_seconds']} s)" if "load_seconds" in model else ""
        table.add_row("model", f"[green]loadable here[/]{took}: {model.get('path')}")
    else:
        table.add_row("model", "[red]cannot load here[/]: " + "; ".join(model["problems"]))
    fit = report.get("memory_fit")
    if fit and fit.get("kv_cache_gib") is not None:
        table.add_row(
            "serving window",
            f"{fit['serving_window']:,} tokens (model.context_window): "
            f"{fit['kv_cache_gib']} GiB of KV cache reserved at start-up",
        )
    for gpu in (fit or {}).get("gpus", []):
        roles = " + ".join(gpu["roles"]) or "nothing planned"
        verdict = "[green]fits[/]" if gpu["fits"] else "[red]does not fit[/]: "
        table.add_row(
            f"cuda:{gpu['index']} memory",
            f"{roles}: needs ~{gpu['need_gib']} of {gpu['total_gib']} GiB (measured), "
            + verdict
            + "; ".join(gpu["problems"]),
        )
    table.add_row("database", f"{settings.db_url} (schema {report['database']['schema_version']})")
    return table


def next_step(settings: Settings) -> str:
    """What to run after a doctor that found the model loadable."""
    command, home_arg = whetstone_command(), f"--home {settings.paths.root}"
    return (
        f"next: `{command} up {home_arg}` starts the daemon (`make run` starts it right after "
        f"this); then, in a second terminal, `{command} chat {home_arg}`: ask, rate 1-5, "
        "correct with c; it trains by itself"
    )
