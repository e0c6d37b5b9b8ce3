"""Real English text from Debian packages, split into sentences, for embedding fidelity.

Two sources of different character, so a result is never tuned to one:
- `fortunes`: the epigrams, quotations and riddles of `fortunes-min` (/usr/share/games/fortunes),
  split into sentences;
- `descriptions`: the one-line descriptions of the Debian packages installed on the machine
  (/var/lib/dpkg/status) — short noun phrases such as "add and remove users and groups".

Sentences are de-duplicated and shuffled with a fixed seed; calibration and evaluation sets are
disjoint slices of that order."""

from __future__ import annotations

import random
import re
from pathlib import Path

from torchslim.errors import DataError

FORTUNES = Path("/usr/share/games/fortunes")
DPKG_STATUS = Path("/var/lib/dpkg/status")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def fortunes(root: Path = FORTUNES, files=("fortunes", "literature", "riddles")) -> list[str]:
    """Sentences of the fortune files (3 to 60 words each)."""
    paths = [Path(root) / f for f in files if (Path(root) / f).exists()]
    if not paths:
        raise DataError(f"No fortune files in {root}. Install them with `apt-get install fortunes-min`.")
    out = []
    for path in paths:
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = " ".join(
                line.strip() for line in entry.splitlines() if line.strip() and not line.strip().startswith("--")
            )
            for sentence in _SENTENCE_END.split(text):
                if 3 <= len(sentence.split()) <= 60:
                    out.append(" ".join(sentence.split()))
    return out


def descriptions(status: Path = DPKG_STATUS) -> list[str]:
    """The short descriptions of the installed Debian packages (2 words or more)."""
    if not Path(status).exists():
        raise DataError(f"{status} does not exist; the 'descriptions' text source needs a Debian system.")
    lines = Path(status).read_text(encoding="utf-8", errors="replace").splitlines()
    return [
        line[len("Description:") :].strip()
        for line in lines
        if line.startswith("Description:") and len(line.split()) >= 3
    ]


SOURCES = {"fortunes": fortunes, "descriptions": descriptions}
EVAL_FORTUNE_FILES = ("fortunes", "literature", "riddles")
NOT_TEXT = ("ascii-art", "art")


def available_descriptions() -> list[str]:
    """The one-line descriptions of every package in the APT lists (`apt-cache dumpavail`) that is NOT
    installed — the same short-phrase style as `descriptions`, none of its phrases. Empty when APT or
    its lists are missing."""
    import shutil
    import subprocess

    if shutil.which("apt-cache") is None:
        return []
    try:
        out = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    installed = set(descriptions()) if DPKG_STATUS.exists() else set()
    found = {
        line[len("Description:") :].strip()
        for line in out.splitlines()
        if line.startswith("Description:") and len(line.split()) >= 3
    }
    return sorted(found - installed)


def training_corpus(root: Path = FORTUNES, limit: int | None = None, seed: int = 0, phrases: bool = True) -> list[str]:
    """Sentences for training (distillation): the fortune files of the Debian package `fortunes` that
    the evaluation sources do not use and, with `phrases`, the descriptions of packages that are not
    installed (`available_descriptions`), interleaved — disjoint from `fortunes` and `descriptions`
    by file and, to be sure, by sentence."""
    root = Path(root)
    files = (
        sorted(
            p.name
            for p in root.glob("*")
            if p.is_file() and "." not in p.name and p.name not in EVAL_FORTUNE_FILES + NOT_TEXT
        )
        if root.exists()
        else []
    )
    if not files:
        raise DataError(
            f"No training text in {root}: the fortune files beyond fortunes-min are missing. "
            "Install them with `apt-get install fortunes`."
        )
    held = set(fortunes(root)) | (set(descriptions()) if DPKG_STATUS.exists() else set())
    parts = [sorted(set(fortunes(root, files)) - held)] + (
        [sorted(set(available_descriptions()) - held)] if phrases else []
    )
    for i, part in enumerate(parts):
        random.Random(seed + i).shuffle(part)
    mixed = [s for group in zip(*parts) for s in group] if all(parts) else parts[0]
    return mixed[:limit] if limit else mixed


def sentences(source: str, seed: int = 0) -> list[str]:
    """All distinct sentences of a source, in a fixed shuffled order."""
    if source not in SOURCES:
        raise DataError(f"Unknown text source '{source}'. Sources: {', '.join(SOURCES)}.")
    unique = sorted(set(SOURCES[source]()))
    random.Random(seed).shuffle(unique)
    return unique


def split(source: str, calibration: int, evaluation: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation sentences (the first `calibration`, then the next `evaluation`)."""
    found = sentences(source, seed)
    if len(found) < calibration + evaluation:
        raise DataError(
            f"The '{source}' source has {len(found)} distinct sentences; {calibration} calibration "
            f"+ {evaluation} evaluation were asked for."
        )
    return found[:calibration], found[calibration : calibration + evaluation]
