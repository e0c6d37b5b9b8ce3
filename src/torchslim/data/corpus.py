"""Running English text from Debian packages for language models, in three disjoint roles.

Evaluation sources (never calibrated or trained on):
- `fortunes`: the entries of `fortunes-min` (epigrams, quotations, riddles; /usr/share/games/fortunes);
- `descriptions`: the long descriptions of the packages installed on this machine (/var/lib/dpkg/status);
- `licenses`: the licence texts of /usr/share/common-licenses (long-form legal prose);
- or any UTF-8 text file (a path): a user's own text, reported as its own source.

Calibration and training (`train`): the other fortune files of the package `fortunes` and the long
descriptions of the packages that are *not* installed (`apt-cache dumpavail`), minus anything an
evaluation source holds. Documents keep a fixed shuffled order and are joined by blank lines."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

from torchslim.data.text import DPKG_STATUS, EVAL_FORTUNE_FILES, FORTUNES, NOT_TEXT
from torchslim.errors import DataError

LICENSES = Path("/usr/share/common-licenses")
EVALUATION = ("fortunes", "descriptions", "licenses")


def _fortune_entries(files, root: Path = FORTUNES) -> list[str]:
    out = []
    for name in files:
        path = root / name
        if path.exists():
            out += [e.strip() for e in path.read_text(encoding="utf-8", errors="replace").split("\n%\n") if e.strip()]
    return out


def fortunes() -> list[str]:
    found = _fortune_entries(EVAL_FORTUNE_FILES)
    if not found:
        raise DataError(f"No fortune files in {FORTUNES}. Install them with `apt-get install fortunes-min`.")
    return found


def package_descriptions(control: str) -> list[str]:
    """Each package's description in a dpkg/APT control text: the summary line, then the long
    description where there is one ("." lines are paragraph breaks); summaries under 3 words are left out."""
    docs, current = [], None
    for line in control.splitlines():
        if line.startswith("Description:"):
            current = [line[len("Description:") :].strip()]
            docs.append(current)
        elif current is not None and line.startswith(" "):
            current.append("" if line.strip() == "." else line.strip())
        else:
            current = None
    return ["\n".join(d).strip() for d in docs if len(d) > 1 or len(d[0].split()) >= 3]


def descriptions() -> list[str]:
    if not DPKG_STATUS.exists():
        raise DataError(f"{DPKG_STATUS} does not exist; the 'descriptions' source needs a Debian system.")
    return package_descriptions(DPKG_STATUS.read_text(encoding="utf-8", errors="replace"))


def licenses() -> list[str]:
    files = sorted({p.resolve() for p in LICENSES.glob("*") if p.is_file()}) if LICENSES.exists() else []
    if not files:
        raise DataError(f"No licence texts in {LICENSES} (the Debian package base-files provides them).")
    return [p.read_text(encoding="utf-8", errors="replace").strip() for p in files]


def train() -> list[str]:
    """Calibration and training text, disjoint from every evaluation source."""
    files = (
        sorted(
            p.name
            for p in FORTUNES.glob("*")
            if p.is_file() and "." not in p.name and p.name not in EVAL_FORTUNE_FILES + NOT_TEXT
        )
        if FORTUNES.exists()
        else []
    )
    docs = _fortune_entries(files)
    if shutil.which("apt-cache"):
        try:
            control = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, timeout=180).stdout
            docs += package_descriptions(control)
        except (OSError, subprocess.SubprocessError):
            pass
    held = set()
    for source in EVALUATION:
        try:
            held |= set(SOURCES[source]())
        except DataError:
            continue
    docs = sorted(set(docs) - held)
    if not docs:
        raise DataError("No training text: install the Debian package `fortunes` (and keep APT's package lists).")
    return docs


SOURCES = {"fortunes": fortunes, "descriptions": descriptions, "licenses": licenses, "train": train}


def documents(source: str | Path, seed: int = 0) -> list[str]:
    """The documents of a built-in source or of a UTF-8 text file (split at blank lines into
    paragraphs), in a fixed shuffled order."""
    if str(source) in SOURCES:
        docs = SOURCES[str(source)]()
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(
                f"Text source '{source}' is neither a built-in source ({', '.join(SOURCES)}) nor a text file."
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
        docs = [p.strip() for p in text.split("\n\n") if p.strip()]
        if not docs:
            raise DataError(f"{path} holds no text.")
    docs = sorted(set(docs))
    random.Random(seed).shuffle(docs)
    return docs


def text(source: str | Path, max_chars: int | None = None, seed: int = 0) -> str:
    """A source's documents joined by blank lines (at most `max_chars` characters, whole documents)."""
    out, size = [], 0
    for doc in documents(source, seed):
        if max_chars is not None and size >= max_chars:
            break
        out.append(doc)
        size += len(doc) + 2
    return "\n\n".join(out)
