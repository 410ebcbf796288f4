"""The training log: the history of logged updates as CSV (rewritten at each entry, so a resumed run's file
is whole), TensorBoard scalars when tensorboard is installed, and a log line with the ETA (a progress bar
on a terminal). The validation losses logged at each save come from diagnostics.py."""

from __future__ import annotations

import csv
import sys
import time

from ..common import log
from ..data.integrity import atomic_output


class Window:
    """Tokens and seconds since the last logged update."""

    def __init__(self, step: int, tokens: int):
        self.step, self.tokens, self.time = step, tokens, time.perf_counter()

    def advance(self, step: int, tokens: int) -> tuple[float, int]:
        now = time.perf_counter()
        seconds, count = now - self.time, tokens - self.tokens
        self.step, self.tokens, self.time = step, tokens, now
        return seconds, count


class TrainingLog:
    """The history as CSV (rewritten at each logged update, so a resumed run's file is whole), a log line
    with the ETA (a progress bar on a terminal) and TensorBoard scalars when tensorboard is installed."""

    def __init__(self, paths, total: int, active: bool):
        self.csv, self.total, self.active = paths.metrics_csv, total, active
        self.tensorboard = self.bar = None
        if not active:
            return
        if paths.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed; the training log goes to the CSV only")
            else:
                self.tensorboard = SummaryWriter(paths.tensorboard)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="update", dynamic_ncols=True)

    def write(self, history: list[dict], seconds: float) -> None:
        if not self.active:
            return
        entry = history[-1]
        if self.csv:
            columns = list(dict.fromkeys(k for e in history for k in e))
            with atomic_output(self.csv) as tmp, open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, columns)
                writer.writeheader()
                writer.writerows(history)
        if self.tensorboard is not None:
            for key, value in entry.items():
                if key != "step" and value is not None:
                    self.tensorboard.add_scalar(f"pretrain/{key}", value, entry["step"])
            self.tensorboard.flush()
        eta = seconds / entry["step"] * (self.total - entry["step"])
        shown = " ".join(f"{k}={v:.4g}" for k, v in entry.items()
                         if k not in ("step", "seconds") and isinstance(v, (int, float)))
        if self.bar is not None:
            self.bar.update(entry["step"] - self.bar.n)
            self.bar.set_postfix_str(shown)
        else:
            log.info("update %d/%d %s eta %s", entry["step"], self.total, shown, _duration(eta))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
