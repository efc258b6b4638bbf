"""
Stopping a training run without losing it. SIGINT (Ctrl-C) and SIGTERM (what Slurm and Kubernetes send
some seconds before they kill a job) only set a flag here; the training loop finishes the optimizer step it
is in, every rank learns of the flag in that step's one small all-reduce (so all stop after the same step),
they write a checkpoint together, rank 0 prints the command that resumes it, and every rank exits with the
shell's code for the signal: 130 (SIGINT) or 143 (SIGTERM). A second Ctrl-C exits at once (130, nothing
saved). Under torchrun the agent forwards the signal it receives to every worker, so a worker often sees one
Ctrl-C twice within milliseconds: signals closer together than DUPLICATE_S count as one.
"""
import os
import shlex
import signal
import threading
import time

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
DUPLICATE_S = 1.0


class StopRequest:
    """`with StopRequest(verbose) as stop:` ... once `stop.armed`, `stop.signum` is None until SIGINT or SIGTERM
    arrives. Outside the block the previous handlers are back."""

    def __init__(self, verbose=True):
        self.signum, self.verbose, self._first, self._previous = None, verbose, 0.0, {}
        self.armed = False    # set when the loop starts: before it there is nothing to save, so a signal ends the run

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # signal handlers live on the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in EXIT_CODES}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        # os.write, not print: a handler that interrupts a print in progress must not write into the same buffer
        now = time.monotonic()
        if not self.armed:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt       # the command line turns it into one line and exit 130
            os.write(2, b"SIGTERM before the first optimizer step: nothing to save\n")
            raise SystemExit(EXIT_CODES[signal.SIGTERM])
        if self.signum is None:
            self.signum, self._first = signum, now
            if self.verbose:
                os.write(2, f"\n{signal.Signals(signum).name}: finishing this optimizer step, then saving a "
                            f"checkpoint (Ctrl-C again to exit at once without one)\n".encode())
        elif signum == signal.SIGINT and now - self._first > DUPLICATE_S:
            os.write(2, b"\nsecond Ctrl-C: exiting at once, no checkpoint written\n")
            os._exit(EXIT_CODES[signal.SIGINT])


def signal_name(signum) -> str:
    return signal.Signals(signum).name


def resume_command(argv, script="train.py") -> str:
    """The command line that continues this run: the same options with --resume (and without --overwrite,
    which would remove what was just saved). Under torchrun, the same launch on this node's process count."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            if a.lower() in ("true", "false", "1", "0", "yes", "no"):
                continue
        name = a.split("=", 1)[0]
        if name in ("--resume", "--overwrite"):
            skip = "=" not in a      # `--resume false` form: drop its value too
            continue
        args.append(a)
    if "LOCAL_WORLD_SIZE" in os.environ:
        launch = ["torchrun", f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}"]
        if os.environ.get("WORLD_SIZE") != os.environ["LOCAL_WORLD_SIZE"]:
            launch.append("<your --nnodes/--rdzv options>")
    else:
        launch = ["python"]
    return " ".join(launch + [shlex.quote(script)] + [shlex.quote(a) for a in args] + ["--resume"])
