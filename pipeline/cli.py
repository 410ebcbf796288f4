"""The command line of every stage, derived from its declaration (its ports, pipeline/wiring/<stage>.py).

    python -m pipeline.<stage> --<port> PATH [PATH ...] ... [--<setting> VALUE] --params JSON|@file.json

The Snakemake rules run exactly this command (pipeline/wiring/__init__.py: command builds it from the same
declaration).
An optional port may be given without a value, which reads as absent (a rule passes the flag for every job
and a value only where the job has that input).

A job Snakemake retries (`retries`) is told its attempt (`--attempt N`). A failure that repeats on every
attempt (a StageError that is not transient: bad input or config) leaves a note in the job's resume
directory, and the next attempt stops at once with the same message instead of running the job again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .common import StageError, log
from .data.locks import holding
from .resume import request_stop
from .stages import paths
from .wiring import OUTPUT, SETTINGS, STAGES, STATE, Stage


def parser(stage: Stage) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m pipeline.{stage.name}", description=stage.summary)
    for port in stage.ports:
        options: dict[str, Any] = {"dest": port.name, "help": port.help or None}
        if port.many:
            options["nargs"] = "*" if port.optional else "+"
        elif port.optional:
            options["nargs"] = "?"
        p.add_argument(port.flag, required=not port.optional, **options)
    for name in stage.settings:
        kind, default, text = SETTINGS[name]
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=text)
    p.add_argument("--params", required=True, type=_json_arg, help="the stage's config slice as JSON, or @file.json")
    if any(port.role == STATE for port in stage.ports):
        p.add_argument("--attempt", type=int, default=1, help="Snakemake's attempt of this job (retries)")
    return p


def _json_arg(text: str) -> Any:
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--params is not valid JSON: {err}") from None


def parse(stage_name: str, argv=None) -> tuple[SimpleNamespace, dict]:
    """(paths and settings, params) of a stage's command line."""
    stage = STAGES[stage_name]
    args = vars(parser(stage).parse_args(None if argv is None else [str(a) for a in argv]))
    params = args.pop("params")
    attempt = args.pop("attempt", 1)
    ports = {port.name for port in stage.ports}
    given = {k: (v if k not in ports else [x for x in v if x] if isinstance(v, list) else v or None)
             for k, v in args.items()}
    return SimpleNamespace(**vars(paths(stage_name, **given)), attempt=attempt), params


FAILURE_NOTE = ".failed.json"  # in a job's resume directory: the failure that will repeat


def run(stage_name: str, function: Callable[[SimpleNamespace, dict], Any], argv=None) -> None:
    """Parse the command line and run the stage with logging, as the only writer of its outputs and resume
    state; a StageError becomes one clear line and exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    paths, params = parse(stage_name, argv)
    note = Path(paths.resume_dir) / FAILURE_NOTE if getattr(paths, "resume_dir", None) else None
    if note is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, request_stop)  # save at the next unit boundary, then stop (resume.py)
    try:
        with holding(written_paths(STAGES[stage_name], paths)):
            if note is not None:
                _stop_if_it_failed_before(note, paths.attempt)
            function(paths, params)
    except StageError as err:
        log.error("%s", err)
        if note is not None and not err.transient and os.environ.get("RANK", "0") == "0":
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text(json.dumps({"attempt": paths.attempt, "error": str(err)}))
        raise SystemExit(1) from None


def _stop_if_it_failed_before(note: Path, attempt: int) -> None:
    """On a retry, a failure of the attempt before that repeats on every attempt ends this one at once."""
    if attempt > 1 and note.is_file():
        try:
            before = json.loads(note.read_text())
        except (OSError, ValueError):
            before = None
        if isinstance(before, dict) and "error" in before:
            raise StageError(f"not retried (attempt {attempt}): attempt {before.get('attempt', '?')} of this job "
                             f"failed with an error that repeats on every attempt (bad input or config; fix it and "
                             f"rerun): {before['error']}", transient=True)  # the note stays as it is
    note.unlink(missing_ok=True)


def written_paths(stage: Stage, paths: SimpleNamespace) -> list[str]:
    """What the stage writes (its outputs and resume directory), to be locked for its life. Under torchrun
    the first process holds the locks for all: the others write no output."""
    if os.environ.get("RANK", "0") != "0":
        return []
    written = []
    for port in stage.ports:
        value = getattr(paths, port.name)
        if port.role in (OUTPUT, STATE) and value:
            written += value if isinstance(value, list) else [value]
    return written
