"""Prepare the base model's answers to the shipped general prompts (the replay cache that every
training run mixes in and the gate's regression probes compare against), once per base model.

    python -m development.base_answers --home ~/.local/share/whetstone

The daemon runs this on the development device once its API is up (for the embedded default
model), so the person chats while the 68 answers are made (56 s on two idle CPU cores in one
batch; 155 s in `whetstone doctor`, where it held the first chat back) and the first training
run starts training at once; runs queued meanwhile wait. A model configured otherwise (or a
home without a daemon) gets its cache from its first training run, on the training device,
with progress in `whetstone status`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from common.entrypoint import add_settings_arguments, log_to_stderr, settings_from_args

log = logging.getLogger("development.base_answers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_settings_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--background",
        action="store_true",
        help="lowest CPU priority: the daemon runs this beside the chat on the same cores",
    )
    parser.add_argument(
        "--device", default="cpu", help="where to generate (default cpu; e.g. cuda:0)"
    )
    args = parser.parse_args(argv)
    if args.background:
        # At equal priority, on two cores, this and the API worker each slowed the other
        # ten-fold (a chat answer took 50 s for 7 minutes); at nice 19 the worker gets ~98%
        # of a contested core and this the rest.
        os.nice(19)
    settings = settings_from_args(args)
    log_to_stderr(settings)

    from tqdm import tqdm

    from development import modeling, training_data

    path = training_data.replay_cache_file(settings)
    if path.is_file():
        sys.stdout.write(f"{path}\n")
        return 0
    started = time.monotonic()
    model, tokenizer = modeling.load_base(settings, args.device, for_training=False)
    bar = tqdm(desc="base answers", unit="step", disable=args.quiet, file=sys.stderr)

    def progress(step: int, steps: int) -> None:
        bar.total = steps
        bar.update(step - bar.n)

    try:
        training_data.load_base_answers(
            settings,
            lambda prompts: modeling.base_answers(model, tokenizer, settings, prompts, progress),
        )
    finally:
        bar.close()
    log.info("base answers ready in %.1f s at %s", time.monotonic() - started, path)
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
