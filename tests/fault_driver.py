"""The `torchslim` command with a fault injected, for tests/test_interrupts.py (run as a script).

TORCHSLIM_TEST_FAULT="module:function:SIGNAL:when" sends SIGNAL to this process at the first call
of `module.function` in it, `before` the call runs or `after` it returned (a file it wrote is then
on disk). TORCHSLIM_TEST_FSIZE=N limits every file this process writes to N bytes: a write past it
fails with EFBIG, as on a disk that fills up mid-write."""

import importlib
import os
import resource
import signal
import sys
import time


def inject(spec: str) -> None:
    module_name, name, sig, when = spec.split(":")
    module = importlib.import_module(module_name)
    original, fired = getattr(module, name), []

    def fire():
        if not fired:
            fired.append(True)
            os.kill(os.getpid(), getattr(signal, sig))
            time.sleep(30)  # SIGKILL ends the process here; SIGINT raises KeyboardInterrupt in the sleep

    def hooked(*args, **kwargs):
        if when == "before":
            fire()
        out = original(*args, **kwargs)
        if when == "after":
            fire()
        return out

    setattr(module, name, hooked)


def main() -> None:
    if os.environ.get("TORCHSLIM_TEST_FAULT"):
        inject(os.environ["TORCHSLIM_TEST_FAULT"])
    if os.environ.get("TORCHSLIM_TEST_FSIZE"):
        limit = int(os.environ["TORCHSLIM_TEST_FSIZE"])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    from torchslim.cli import main as cli_main

    sys.argv = ["torchslim", *sys.argv[1:]]
    cli_main()


if __name__ == "__main__":
    main()
