"""Message helpers: the article before a type name, so that a message never says "a int"."""

import re
from pathlib import Path

import pytest

from fxconvert.errors import with_article

PACKAGE = Path(__file__).resolve().parents[1] / "fxconvert"


@pytest.mark.parametrize("noun, expected", [
    ("int", "an int"), ("object", "an object"), ("ellipsis", "an ellipsis"), ("Embedding", "an Embedding"),
    ("list", "a list"), ("set", "a set"), ("T5Model", "a T5Model"), ("UserDict", "a UserDict"),
    ("", "a "),
])
def test_the_article_fits_the_noun(noun, expected):
    assert with_article(noun) == expected


def test_no_message_puts_a_bare_article_before_a_type_name():
    """A type name or other unknown word is written with `with_article`, never after a literal "a "/"an "."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\ban? \{[^}]*(__name__|__module__|type\()", line):
                found.append(f"{path.relative_to(PACKAGE)}:{number}")
    assert found == []
