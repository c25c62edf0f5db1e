"""Split a document into sentences for BERT's sentence-pair examples.

A rule-based splitter, on purpose: it needs no model download (the machines this runs on may have no
internet) and it is fast enough for the tokenizing pass. A sentence ends at a line break, or after
., ! or ? (optionally followed by closing quotes or brackets) when whitespace and an upper-case
letter, digit or opening quote follow. Common abbreviations ("Mr.", "e.g.", single initials) do not
end a sentence. Good enough for sentence-pair pretraining, where a rare wrong split only shifts the
boundary between segment A and B.
"""

from __future__ import annotations

import re

_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "cf", "no", "vol", "fig",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "inc", "ltd", "co",
    "corp", "gen", "col", "lt", "sgt", "capt", "gov", "sen", "rep", "rev", "mt", "ft", "u.s", "u.k", "a.m", "p.m",
}
# Candidate boundary: terminal punctuation, optional closers, whitespace, then a plausible sentence start.
_BOUNDARY = re.compile(r"""([.!?]+["')\]]*)\s+(?=["'(\[]?[A-Z0-9])""")
_LAST_WORD = re.compile(r"(\S+)$")


def split_sentences(text: str) -> list[str]:
    """Non-empty, stripped sentences of `text`, in order."""
    sentences: list[str] = []
    for line in text.splitlines():
        start = 0
        for match in _BOUNDARY.finditer(line):
            end = match.end(1)
            word = _LAST_WORD.search(line[start:end])
            token = word.group(1).rstrip(".!?\"')]").lower() if word else ""
            if match.group(1).startswith(".") and (token in _ABBREVIATIONS or (len(token) == 1 and token.isalpha())):
                continue  # "Mr. Smith", "J. Smith": not a boundary
            piece = line[start:end].strip()
            if piece:
                sentences.append(piece)
            start = match.end()
        piece = line[start:].strip()
        if piece:
            sentences.append(piece)
    return sentences
