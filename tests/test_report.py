"""development/report.py: the files a person reads to see why a candidate was promoted or not."""

from __future__ import annotations

import base64
import copy
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from development import report as report_mod

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = '<script>alert("x")</script> & <b>bold</b>'
METRIC_INFO = {
    "holdout_nll": {"label": "Holdout target NLL (per token)", "better": "lower"},
    "preference_accuracy": {
        "label": "Holdout preference accuracy",
        "better": "higher",
        "percent": True,
    },
    "preference_margin": {"label": "Preference margin", "better": "higher"},
    "rating_separation": {"label": "Rating separation", "better": "higher"},
    "general_nll": {"label": "General-probe NLL", "better": "lower"},
    "general_facts": {"label": "General facts answered", "better": "higher"},
    "sanity_pass_rate": {"label": "Sanity pass rate", "better": "higher", "percent": True},
    "ms_per_token": {"label": "Latency (ms/token)", "better": "lower"},
}


def _metrics(**overrides: Any) -> dict[str, Any]:
    values = {
        "holdout_nll": 1.23,
        "preference_accuracy": 0.75,
        "preference_margin": 3.2,
        "rating_separation": 0.4,
        "general_nll": 1.9,
        "general_facts": 5,
        "sanity_pass_rate": 1.0,
        "ms_per_token": 51.2,
    }
    return {**values, **overrides}


def full_report() -> dict[str, Any]:
    return {
        "candidate_id": "cand-20261121-031500-ab12",
        "champion_id": "cand-20261101-020000-cd34",
        "base_model": "embedded:smollm2-135m-instruct",
        "created_at": "2026-11-21T03:20:00+00:00",
        "decision": "reject",
        "rule": "general_regression",
        "reason": "general-probe NLL rose 9.1% over the base (bound 5.0%)",
        "next_step": "it lost general knowledge: train again with more replay",
        "checks": [
            {"rule": "holdout_size", "passed": True, "detail": "6 held-out items (need 4)"},
            {"rule": "holdout_win", "passed": True, "detail": "NLL 1.23 < champion 1.5"},
            {"rule": "general_regression", "passed": False, "detail": "NLL +9.1% > 5.0%"},
            {"rule": "general_facts", "passed": True, "detail": "5/5 facts kept"},
            {"rule": "sanity", "passed": True, "detail": "all sanity prompts answered"},
        ],
        "metrics": {
            "candidate": _metrics(),
            "champion": _metrics(holdout_nll=1.5, preference_accuracy=0.5, ms_per_token=None),
            "base": _metrics(holdout_nll=1.8, preference_accuracy=0.25, general_nll=1.74),
        },
        "metric_info": copy.deepcopy(METRIC_INFO),
        "data": {
            "counts": {
                "feedback_items": 40,
                "holdout_items": 8,
                "train_items": 28,
                "sft_rows": 24,
                "dpo_rows": 10,
                "kto_rows": 0,
                "replay_rows": 24,
            },
            "first_feedback_at": "2026-11-01T10:00:00+00:00",
            "last_feedback_at": "2026-11-20T22:10:00+00:00",
            "evaluated_on": {"holdout_items": 8, "regression_probes": 40},
        },
        "examples": [
            {
                "prompt": f"What's my dog's name? {EVIL}",
                "champion": "I don't know.\nI am a language model.",
                "candidate": f"Your dog is Biscuit.\n{EVIL}",
                "correction": f"Your dog is called Biscuit. {EVIL}",
            },
            {"prompt": "Say hi", "champion": "Hello!", "candidate": "Hi there!"},
        ],
        "taught": [
            {
                "question": f"What is my cat's name? {EVIL}",
                "correction": "Your cat is called Pixel.",
                "candidate": {"answer": "Your cat is called Pixel.", "says_it": True},
                "champion": {"answer": "I don't have a cat.", "says_it": False},
            },
            {
                "question": "Where do I live?",
                "correction": "You live in Lyon.",
                "candidate": {"answer": "You live in Paris.", "says_it": False},
                "champion": {"answer": "", "says_it": False},
            },
        ],
        "training": {
            "profile": "quick_test",
            "config": {"lora": {"r": 8, "alpha": 16}, "lr": 2e-4, "note": "<i>cfg</i>"},
            "duration_s": 312.5,
            "hardware": {"device": "cpu", "torch": "2.13.0", "cpu_count": 2},
            "stages": [
                {"name": "sft", "steps": 40, "rows": 48, "best_step": 30},
                {"name": "dpo", "steps": 10, "rows": 10},
            ],
            "loss_curve": {
                "sft": {"train": [[1, 2.1], [2, 1.9], [3, 1.7]], "eval": [[10, 1.8], [20, 1.6]]},
                "dpo": {"train": [[1, 0.69]], "eval": []},
            },
            "monitor": {"verdict": "ok", "notes": ["held-out loss fell 23% from 1.80 to 1.39"]},
        },
        "evaluation_seconds": 75.3,
    }


MINIMAL = {"candidate_id": "cand-min", "decision": "promote", "rule": "all_passed"}


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> _Collector:
    parser = _Collector()
    parser.feed(page)
    parser.close()
    return parser


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """The full report rendered once: drawing the plots is the slow part (about a second)."""
    folder = tmp_path_factory.mktemp("candidate")
    md_path, html_path = report_mod.render(full_report(), folder)
    return folder, md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")


def test_render_writes_report_and_plots(tmp_path: Path) -> None:
    md_path, html_path = report_mod.render(full_report(), tmp_path)

    assert (md_path, html_path) == (tmp_path / "report.md", tmp_path / "report.html")
    names = sorted(p.name for p in tmp_path.iterdir())
    # Nothing else: in particular no temp file left behind.
    assert names == ["loss.png", "metrics.png", "report.html", "report.md"]
    for png in ("loss.png", "metrics.png"):
        assert (tmp_path / png).read_bytes().startswith(PNG_MAGIC)
    md = md_path.read_text(encoding="utf-8")
    assert "![loss](loss.png)" in md
    assert "![metrics](metrics.png)" in md


def test_html_is_self_contained_with_embedded_pngs(rendered: tuple[Path, str, str]) -> None:
    _, _, page = rendered
    parsed = parse(page)

    assert "script" not in parsed.tags
    assert "<script" not in page.lower()
    assert "link" not in parsed.tags  # no external stylesheet
    assert "style" in parsed.tags
    assert len(parsed.images) == 2
    for src in parsed.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix) :], validate=True).startswith(PNG_MAGIC)
    # Nothing is fetched from elsewhere.
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)


def test_user_text_is_escaped_in_html_and_verbatim_in_markdown(
    rendered: tuple[Path, str, str],
) -> None:
    _, md, page = rendered

    # Jinja's autoescape (markupsafe) spells quotes as &#34; and &#39;.
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "<b>bold</b>" not in page
    assert "&lt;i&gt;cfg&lt;/i&gt;" in page  # config values too
    # The visible text (what a browser shows) holds the user's text as typed.
    visible = "".join(parse(page).text)
    assert visible.count(EVIL) == 4  # prompt, candidate answer, correction; a question taught
    assert md.count(EVIL) == 4
    # In Markdown it sits in quoted fenced blocks, so a viewer shows it instead of running it.
    assert f"> What's my dog's name? {EVIL}" in md


def test_multiline_answers_keep_their_lines(rendered: tuple[Path, str, str]) -> None:
    _, md, page = rendered

    assert "> I don't know.\n> I am a language model." in md
    assert "<pre>I don&#39;t know.\nI am a language model.</pre>" in page


def test_decision_rule_and_reason_in_both(rendered: tuple[Path, str, str]) -> None:
    _, md, page = rendered
    reason = "general-probe NLL rose 9.1% over the base (bound 5.0%)"

    for text in (md, page):
        assert "REJECT" in text
        assert "general_regression" in text
        assert reason in text
    assert "## Decision: **REJECT**" in md
    assert '<div class="decision reject">REJECT</div>' in page
    assert "**Next:** it lost general knowledge: train again with more replay" in md
    assert "<strong>Next:</strong> it lost general knowledge" in page


def test_promote_is_green_and_unknown_decision_neutral() -> None:
    page = report_mod.html_page(MINIMAL)
    assert '<div class="decision promote">PROMOTE</div>' in page
    assert ".decision.promote { background: #1e7e34; }" in page

    odd = report_mod.html_page({**MINIMAL, "decision": '"><b>x'})
    assert '<div class="decision other">&#34;&gt;&lt;B&gt;X</div>' in odd


def test_failing_check_is_marked(rendered: tuple[Path, str, str]) -> None:
    _, md, page = rendered

    assert "| general_regression (deciding) | **FAIL** | NLL +9.1% > 5.0% |" in md
    assert "| holdout_size | pass | 6 held-out items (need 4) |" in md
    assert (
        '<tr class="deciding"><td>general_regression (deciding)</td><td class="fail">FAIL</td>'
    ) in page
    assert page.count('class="fail"') == 1


def test_metrics_table_shows_values_and_deltas(rendered: tuple[Path, str, str]) -> None:
    _, md, page = rendered

    header = "| Metric | Better | Candidate | Champion | Base | Δ vs champion | Δ vs base |"
    assert header in md
    # 1.23 vs champion 1.5 and base 1.8; lower is better.
    assert (
        "| Holdout target NLL (per token) | lower | 1.23 | 1.5 | 1.8 | -0.27 (better) "
        "| -0.57 (better) |"
    ) in md
    # Fractions shown as percentages, their deltas in percentage points.
    assert "| Holdout preference accuracy | higher | 75% | 50% | 25% | +25 pp (better) |" in md
    # A metric one model lacks shows a dash, and no delta against it.
    assert "| Latency (ms/token) | lower | 51.2 | — | 51.2 | — | 0 |" in md
    assert "| General-probe NLL | lower | 1.9 | 1.9 | 1.74 | 0 | +0.16 (worse) |" in md
    assert "| Sanity pass rate | higher | 100% | 100% | 100% | 0 pp | 0 pp |" in md
    assert '<td class="num better">-0.27 (better)</td>' in page
    assert '<td class="num worse">+0.16 (worse)</td>' in page


def test_data_training_and_monitor_sections(rendered: tuple[Path, str, str]) -> None:
    _, md, page = rendered

    assert "Feedback from 2026-11-01 10:00 UTC to 2026-11-20 22:10 UTC." in md
    assert "| feedback items | 40 |" in md
    assert "- **Evaluated on:** holdout items 8, regression probes 40" in md
    assert "<strong>Evaluated on:</strong> holdout items 8, regression probes 40" in page
    assert "- **Duration:** 5 min 12 s" in md
    assert "- **Hardware:** device cpu, torch 2.13.0, cpu_count 2" in md
    assert "| name | steps | rows | best_step |" in md
    assert "| dpo | 10 | 10 | — |" in md
    assert '```json\n{\n  "lora": {\n    "r": 8,' in md
    assert "**Verdict:** ok" in md
    assert "- held-out loss fell 23% from 1.80 to 1.39" in md
    assert "held-out loss fell 23% from 1.80 to 1.39" in page
    assert "Champion (base model)" not in md  # this report has a real champion


def test_at_most_five_examples() -> None:
    report = full_report()
    report["examples"] = [
        {"prompt": f"question {i}", "champion": "a", "candidate": "b"} for i in range(8)
    ]
    md = report_mod.markdown(report)
    assert "### Example 5" in md
    assert "### Example 6" not in md
    assert "question 5" not in md


def test_minimal_report_renders(tmp_path: Path) -> None:
    md_path, html_path = report_mod.render(dict(MINIMAL), tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.md"]
    md = md_path.read_text(encoding="utf-8")
    page = html_path.read_text(encoding="utf-8")
    assert "cand-min" in md and "PROMOTE" in md and "all_passed" in md
    assert "No loss curve recorded." in md
    assert "No metrics recorded." in md
    assert "the base model" in md  # no champion id: the base model is the champion
    parsed = parse(page)
    assert "script" not in parsed.tags
    assert parsed.images == []
    assert "No loss curve recorded." in page


def test_champion_is_base_and_sparse_data(tmp_path: Path) -> None:
    report = full_report()
    report["champion_id"] = None
    report["metrics"]["champion"] = None
    report["metrics"]["base"]["holdout_nll"] = None
    report["training"]["loss_curve"] = {"sft": {"train": [], "eval": None}, "dpo": None}
    report["training"]["monitor"] = None
    report["data"] = {"counts": None}
    report["checks"] = [{"rule": "holdout_size"}, "not a check"]
    report["examples"] = [{"prompt": "p", "champion": "", "candidate": "c", "correction": None}]
    report["taught"] = None

    md_path, html_path = report_mod.render(report, tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.png", "report.html", "report.md"]
    md = md_path.read_text(encoding="utf-8")
    assert "| Metric | Better | Candidate | Base | Δ vs base |" in md
    assert "| Holdout target NLL (per token) | lower | 1.23 | — | — |" in md
    assert "The champion is the base model" in md
    assert "**Champion (base model)**" in md
    assert "(empty answer)" in md
    assert "Your correction" not in md
    assert "No loss curve recorded." in md
    assert "| holdout_size | n/a |  |" in md
    assert "script" not in parse(html_path.read_text(encoding="utf-8")).tags


def test_rerender_without_curve_removes_stale_loss_plot(tmp_path: Path) -> None:
    report_mod.render(full_report(), tmp_path)
    assert (tmp_path / "loss.png").exists()

    report = full_report()
    del report["training"]["loss_curve"]
    report_mod.render(report, tmp_path)

    assert not (tmp_path / "loss.png").exists()
    assert "No loss curve recorded." in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_failed_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    import common.fs as fs_mod  # the report is written by the shared atomic writer

    monkeypatch.setattr(fs_mod.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        report_mod.render(full_report(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_required_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="decision"):
        report_mod.render({"candidate_id": "c", "rule": "r"}, tmp_path)


def test_builders_do_not_mutate_the_report() -> None:
    report = full_report()
    before = copy.deepcopy(report)
    images = report_mod.plots(report)
    report_mod.markdown(report, images)
    report_mod.html_page(report, images)
    assert report == before
    assert set(images) == {"loss.png", "metrics.png"}


def test_script_in_the_persons_text_is_escaped_in_html_and_verbatim_in_markdown(
    tmp_path: Path,
) -> None:
    script = "<script>alert('hi')</script>"
    report = {
        **MINIMAL,
        "examples": [{"prompt": f"Run {script}?", "candidate": "No.", "correction": script}],
    }

    md_path, html_path = report_mod.render(report, tmp_path)

    md, page = md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")
    assert f"> Run {script}?" in md and f"> {script}" in md
    assert "&lt;" not in md  # Markdown is not HTML-escaped: a viewer would show the entities
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#39;hi&#39;)&lt;/script&gt;" in page
    assert "".join(parse(page).text).count(script) == 2  # what a browser shows: the text as typed


def test_a_rollback_recorded_in_meta_json_rerenders_the_whole_report(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from candidates import read_meta, reports, write_meta
    from tests.test_registry import make_meta

    report = full_report()
    write_meta(tmp_path, make_meta(report["candidate_id"]))
    md_path, html_path = report_mod.render(report, tmp_path)
    md_before = md_path.read_text(encoding="utf-8")
    page_before = html_path.read_text(encoding="utf-8")
    assert read_meta(tmp_path).report["rule"] == "general_regression"  # what the report says

    at = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
    reports.record_rollback(tmp_path, "rated 1.50 <on average>", None, at=at)

    meta = read_meta(tmp_path)
    assert meta.metrics["rollbacks"] == [
        {"at": "2026-11-22T08:00:00Z", "reason": "rated 1.50 <on average>", "now_serving": None}
    ]
    md, page = md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")
    # The same report, rendered again from meta.json, with the rollback after it.
    added = (
        "\n## Rolled back after promotion (2026-11-22 08:00 UTC)\n\n"
        "The person rated 1.50 <on average>. Now serving: the base model.\n"
    )
    assert md == md_before + added
    assert page.startswith(page_before.removesuffix("</body>\n</html>\n"))
    assert "The person rated 1.50 &lt;on average&gt;. Now serving: the base model." in page
    assert len(parse(page).images) == 2  # the plots beside it are embedded again

    # A later evaluation's report still says the candidate was rolled back.
    report_mod.render(report, tmp_path)
    assert md_path.read_text(encoding="utf-8") == md_before + added


def test_what_was_taught_is_asked_again_of_candidate_and_champion(
    rendered: tuple[Path, str, str],
) -> None:
    _, md, html = rendered
    summary = "Asked again, the candidate says 1 of the 2 correction(s) taught since the champion"
    assert "## What you taught" in md and summary in md
    assert "| You asked | Your correction | Candidate | Champion |" in md
    lyon = "| Where do I live? | You live in Lyon. | ✗ You live in Paris. | ✗ (empty answer) |"
    assert lyon in md
    assert "the champion says 0." in md
    page = parse(html)
    assert "script" not in page.tags  # the person's question is escaped
    assert "✓ Your cat is called Pixel." in page.text
    assert '<td class="better">✓ Your cat is called Pixel.</td>' in html
    # Nothing taught since the champion: no section.
    assert "What you taught" not in report_mod.markdown(MINIMAL)
