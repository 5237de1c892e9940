"""History at scale: the conversation list, opening one, and search, at 5,000 conversations
and 100,000 messages, through HTTP (issue 38 item 3).

    python -m benchmarks.history_scale [--model-home H] [--conversations 5000]
                                       [--messages-each 20] [--requests 40]

1. Fill: a fresh throwaway home, its store filled through the store's own session (the ORM
   models, one bulk INSERT per 2,000 rows, in transactions of 500 conversations) so the
   triggers of migration 0005 index every message as the API's writes would. No model: the
   text is drawn from a fixed vocabulary (a few very common words, a long tail of rare ones,
   seed 0), user turns ~20 words, answers ~80; updated_at spread over two years, every
   tenth conversation titled, and one plant word ("zanzibar") in 12 messages.
2. Serve: the real `python -m production.server` on a free 127.0.0.1 port over that home,
   on the embedded model (linked from --model-home, default the test cache; the model is
   loaded but never asked anything).
3. Measure, in this process with httpx (keep-alive), `--requests` times each after 3
   warm-ups: the list's first page and a deep one (offset 4,900), opening a conversation
   (a different one each time, 20 messages), and searches: a rare word, the commonest
   word, two words, a word typed halfway (prefix). Then forgetting a
   conversation (it merges the full-text index: 5 times).

Prints p50/p95 ms per figure and writes benchmarks/results/history-scale-vm-<date>.json,
with the query plans of the list and a search, the database's size and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import socket
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.serving import Server, load_average, percentile

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_HOME = REPO / ".cache" / "test-models"
RESULTS_DIR = REPO / "benchmarks" / "results"
WARMUPS = 3
PLANT = "zanzibar"
PLANTED = 12
PAGE = 50

log = logging.getLogger("benchmarks.history_scale")

# The commonest words first: drawn with Zipf-like weights, so "the" is in nearly every
# message (the worst case for a search) and the invented tail words are rare.
# fmt: off
COMMON = [
    "the", "of", "and", "to", "in", "is", "you", "that", "it", "for", "on", "with", "as",
    "this", "are", "be", "at", "or", "have", "from", "garden", "water", "light", "recipe",
    "python", "train", "model", "question", "answer", "window", "river",
]
# fmt: on


def vocabulary(rng: random.Random, size: int = 4000) -> tuple[list[str], list[float]]:
    syllables = ["ka", "lo", "mi", "tre", "su", "van", "or", "pel", "dix", "ru", "sen", "qua"]
    tail = {"".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(size)}
    words = COMMON + sorted(tail - set(COMMON))
    weights = [1 / (rank + 1) for rank in range(len(words))]
    return words, weights


def sentence(rng: random.Random, words: list[str], weights: list[float], n: int) -> str:
    picked = rng.choices(words, weights, k=n)
    picked[0] = picked[0].capitalize()
    return " ".join(picked) + "."


def fill(db_url: str, conversations: int, messages_each: int, seed: int = 0) -> dict[str, Any]:
    """Fill the store; returns what was put in (counts, ids, seconds)."""
    from sqlalchemy import insert

    from data.models import Conversation, Message, new_id
    from data.store import Store

    rng = random.Random(seed)
    words, weights = vocabulary(rng)
    now = datetime.now(UTC)
    total = conversations * messages_each
    planted = set(rng.sample(range(total), PLANTED))
    ids: list[str] = []
    started = time.perf_counter()
    with Store(db_url) as store:
        number = 0
        for first in range(0, conversations, 500):
            conversation_rows, message_rows = [], []
            for n in range(first, min(first + 500, conversations)):
                began = now - timedelta(days=730 * rng.random())
                conversation_id = new_id("conv")
                ids.append(conversation_id)
                last = began
                for position in range(messages_each):
                    role = "user" if position % 2 == 0 else "assistant"
                    text = sentence(rng, words, weights, 20 if role == "user" else 80)
                    if number in planted:
                        text += f" {PLANT.capitalize()} came up."
                    number += 1
                    last = began + timedelta(minutes=position)
                    message_rows.append(
                        {
                            "id": new_id("msg"),
                            "conversation_id": conversation_id,
                            "position": position,
                            "role": role,
                            "content": text,
                            "finish_reason": "stop",
                            "created_at": last,
                            "completed_at": last,
                        }
                    )
                conversation_rows.append(
                    {
                        "id": conversation_id,
                        "title": sentence(rng, words, weights, 4) if n % 10 == 0 else None,
                        "created_at": began,
                        "updated_at": last,
                    }
                )
            with store.session() as session:
                session.execute(insert(Conversation), conversation_rows)
                for start in range(0, len(message_rows), 2000):
                    session.execute(insert(Message), message_rows[start : start + 2000])
            log.info("filled %d conversations", min(first + 500, conversations))
        counts = store.counts()
    return {
        "conversations": counts["conversations"],
        "messages": counts["messages"],
        "fill_s": round(time.perf_counter() - started, 1),
        "ids": ids,
        "commonest_tail_word": words[len(COMMON)],
    }


def figures(values_s: list[float]) -> dict[str, Any]:
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 2),
        "p95_ms": round(percentile(ms, 95), 2),
        "max_ms": round(max(ms), 2),
    }


def timed(server: Server, path: str, params: dict[str, Any] | None = None) -> tuple[float, Any]:
    started = time.perf_counter()
    reply = server.client.get(path, params=params)
    took = time.perf_counter() - started
    if reply.status_code != 200:
        raise RuntimeError(f"GET {path} {params}: {reply.status_code} {reply.text[:300]}")
    return took, reply.json()


def measure(server: Server, requests: int, ids: list[str]) -> dict[str, Any]:
    rng = random.Random(1)
    cases: dict[str, tuple[str, Any]] = {
        "list_page_1": ("/v1/conversations", lambda: {"limit": PAGE}),
        "list_deep_page": ("/v1/conversations", lambda: {"limit": PAGE, "offset": 4900}),
        "open_conversation": (None, lambda: None),
        "search_rare_word": ("/v1/conversations", lambda: {"q": PLANT}),
        "search_commonest_word": ("/v1/conversations", lambda: {"q": "the"}),
        "search_two_words": ("/v1/conversations", lambda: {"q": "garden water"}),
        "search_typed_halfway": ("/v1/conversations", lambda: {"q": "recip"}),
    }
    results: dict[str, Any] = {}
    for name, (path, params) in cases.items():
        samples = []
        found = None
        for n in range(WARMUPS + requests):
            if path is None:
                took, body = timed(server, f"/v1/conversations/{rng.choice(ids)}")
                found = len(body["messages"])
            else:
                took, body = timed(server, path, params())
                found = len(body["data"])
            if n >= WARMUPS:
                samples.append(took)
        results[name] = figures(samples) | {"returned": found, "query": params()}
        print(
            f"  {name:24} p50 {results[name]['p50_ms']:7.1f} ms   p95 "
            f"{results[name]['p95_ms']:7.1f} ms   ({found} returned)",
            flush=True,
        )
    return results


def forgetting(server: Server, ids: list[str], times: int = 5) -> dict[str, Any]:
    samples = []
    for conversation_id in ids[-times:]:
        started = time.perf_counter()
        reply = server.client.delete(f"/v1/conversations/{conversation_id}")
        samples.append(time.perf_counter() - started)
        if reply.status_code != 200:
            raise RuntimeError(f"DELETE {conversation_id}: {reply.status_code} {reply.text}")
    result = figures(samples)
    print(
        f"  {'forget_conversation':24} p50 {result['p50_ms']:7.1f} ms   p95 "
        f"{result['p95_ms']:7.1f} ms",
        flush=True,
    )
    return result


def plans(db_file: Path) -> dict[str, list[str]]:
    """EXPLAIN QUERY PLAN of the list's query and of a search's, as the store sends them."""
    connection = sqlite3.connect(db_file)
    try:

        def plan(sql: str, *params: Any) -> list[str]:
            return [row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}", params)]

        return {
            "list": plan(
                "SELECT id FROM conversations WHERE forgotten_at IS NULL "
                "ORDER BY updated_at DESC, id DESC LIMIT 50 OFFSET 4900"
            ),
            "search_page": plan(
                "WITH hits(conversation_id) AS (SELECT m.conversation_id FROM messages_fts "
                "JOIN messages AS m ON m.rowid = messages_fts.rowid WHERE messages_fts MATCH ? "
                "AND m.role IN ('user', 'assistant') UNION SELECT c.id FROM conversations_fts "
                "JOIN conversations AS c ON c.rowid = conversations_fts.rowid "
                "WHERE conversations_fts MATCH ?) SELECT c.id FROM conversations AS c "
                "WHERE c.forgotten_at IS NULL AND c.id IN (SELECT conversation_id FROM hits) "
                "ORDER BY c.updated_at DESC, c.id DESC LIMIT 50 OFFSET 0",
                '"garden"*',
                '"garden"*',
            ),
        }
    finally:
        connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model-home", type=Path, default=DEFAULT_MODEL_HOME)
    parser.add_argument("--conversations", type=int, default=5000)
    parser.add_argument("--messages-each", type=int, default=20)
    parser.add_argument("--requests", type=int, default=40, help="measured requests per figure")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from common.fs import atomic_write_text
    from common.home import Home
    from production.model.base_model import prepare_embedded

    started = datetime.now(UTC)
    load_before = load_average()
    model_dir = prepare_embedded(Home(args.model_home.expanduser().resolve()), show_progress=False)
    with tempfile.TemporaryDirectory(prefix="whetstone-history-") as tmp:
        home = Path(tmp) / "home"
        (home / "models").mkdir(parents=True)
        (home / "models" / model_dir.name).symlink_to(model_dir, target_is_directory=True)
        db_file = home / "whetstone.db"
        print(f"1/3 filling {args.conversations} conversations x {args.messages_each} messages")
        filled = fill(f"sqlite:///{db_file}", args.conversations, args.messages_each)
        print(
            f"    {filled['messages']} messages in {filled['fill_s']} s; "
            f"{db_file.stat().st_size / 1e6:.1f} MB"
        )
        query_plans = plans(db_file)
        print("2/3 starting the worker")
        server = Server(home, "server.log")
        try:
            server.wait_ready()
            print(f"3/3 {args.requests} requests per figure, after {WARMUPS} warm-ups")
            http = measure(server, args.requests, filled["ids"])
            forget = forgetting(server, filled["ids"])
        except Exception:
            print(f"server log tail:\n{server.output()}", file=sys.stderr)
            raise
        finally:
            server.stop()
        size_mb = round(db_file.stat().st_size / 1e6, 1)

    results = {
        "benchmark": "history_scale",
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.now(UTC) - started).total_seconds(), 1),
        "environment": {
            "hostname": socket.gethostname(),
            "cpu_count": os.cpu_count(),
            "sqlite": sqlite3.sqlite_version,
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
        "settings": {
            "conversations": args.conversations,
            "messages_each": args.messages_each,
            "requests": args.requests,
            "warmups": WARMUPS,
            "page": PAGE,
            "fill": "Store.session(), bulk ORM INSERT (triggers index each message)",
        },
        "store": {
            "conversations": filled["conversations"],
            "messages": filled["messages"],
            "fill_s": filled["fill_s"],
            "database_mb": size_mb,
        },
        "http": http | {"forget_conversation": forget},
        "targets_ms_p95": {"list_and_open": 100, "search": 200},
        "query_plans": query_plans,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"history-scale-vm-{started:%Y%m%d}.json"
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
