"""A tiny progress display: one line rewritten with \\r on a terminal, plain lines otherwise.

    bar = Progress(total=1000, start=0, label="pretrain")
    bar.update(step, loss=2.31, tok_s=5120)   # step/total, elapsed, ETA, then the fields
    bar.write("eval: val loss 2.4")           # a permanent line that does not garble the bar
    bar.close()
"""
import sys
import time


def _fmt_time(s):
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _fmt_value(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Progress:
    def __init__(self, total, start=0, label="", stream=None, every=None, min_interval=0.1):
        self.total, self.start, self.label = total, start, label
        self.stream = stream or sys.stdout
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.every = every or max(1, (total - start) // 10)   # non-TTY: a line every `every` steps
        self.min_interval, self.t0, self.last, self.dirty = min_interval, time.time(), 0.0, False

    def update(self, step, **fields):
        now = time.time()
        final = step >= self.total
        if self.tty and not final and now - self.last < self.min_interval:
            return
        if not self.tty and not final and (step - self.start) % self.every:
            return
        self.last = now
        elapsed = now - self.t0
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        parts = [f"{self.label} step {step}/{self.total}".strip(), f"{_fmt_time(elapsed)}<{_fmt_time(eta)}"]
        parts += [f"{k} {_fmt_value(v)}" for k, v in fields.items()]
        line = " | ".join(parts)
        self.stream.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        self.dirty = self.tty
        self.stream.flush()

    def write(self, message):
        self.stream.write(("\r\x1b[K" if self.dirty else "") + message + "\n")
        self.dirty = False
        self.stream.flush()

    def close(self):
        if self.dirty:
            self.stream.write("\n")
            self.stream.flush()
        self.dirty = False
