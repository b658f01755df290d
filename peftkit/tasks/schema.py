"""Field types shared by the tasks' server schemas (pydantic)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def _valid_unicode(text: str) -> str:
    """JSON may carry lone surrogates (\\ud800) that no tokenizer or UTF-8 encoder accepts: refuse them here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"not valid Unicode: a lone surrogate {text[err.start]!r} at character {err.start}") from None
    return text


#: a string a request may carry: valid Unicode
Text = Annotated[str, AfterValidator(_valid_unicode)]
