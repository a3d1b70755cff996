"""The reference VLM's tokenizer: a small word vocabulary with a byte fallback.

Any text encodes (every UTF-8 byte has a token), and common words of the visual-QA suite are a
single token each so questions stay short (a question costs ~10 tokens, not ~40 bytes) while
answers that are not words (``K7XQ``, ``12MAR``) are spelled out byte by byte, which is what a
reading task needs. Decoding concatenates, so ``decode(encode(s)) == s`` for every string.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

PAD, SEP, EOS = 0, 1, 2
_N_SPECIAL = 3
_N_BYTES = 256

#: Words that get their own token (case-sensitive). Everything else falls back to bytes.
WORDS: tuple[str, ...] = (
    # questions
    "What", "Where", "How", "Is", "Which", "is", "the", "of", "a", "are", "there", "many",
    "dominant", "colour", "color", "image", "big", "left", "word", "written", "bar", "tallest",
    "shortest", "in", "this", "picture", "does", "say", "text", "read",
    # shapes (and plurals)
    "circle", "square", "triangle", "circles", "squares", "triangles",
    # colours
    "red", "green", "blue", "yellow", "orange", "purple", "brown", "grey",
    # answers
    "yes", "no", "top", "middle", "bottom", "right", "center",
    # document fields
    "NAME", "DATE", "TOTAL", "ID", "REF", "CODE", "QTY", "TAX",
)  # fmt: skip

_SPLIT = re.compile(r"[A-Za-z]+|\s+|[^A-Za-z\s]")


class Tokenizer:
    """Word tokens for :data:`WORDS` (only when surrounded by non-letters), bytes otherwise."""

    def __init__(self, words: Sequence[str] = WORDS) -> None:
        if len(set(words)) != len(words):
            raise ValueError("tokenizer words must be unique")
        self.words = tuple(words)
        self._word_ids = {w: _N_SPECIAL + _N_BYTES + i for i, w in enumerate(self.words)}
        self._pieces: list[bytes] = [b"", b"", b""]
        self._pieces += [bytes([b]) for b in range(_N_BYTES)]
        self._pieces += [w.encode() for w in self.words]

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _SPLIT.findall(text):
            wid = self._word_ids.get(piece)
            if wid is not None:
                ids.append(wid)
            else:
                ids.extend(_N_SPECIAL + b for b in piece.encode())
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, stopping at EOS; special tokens are dropped, bad bytes replaced."""
        out = bytearray()
        for i in ids:
            if i == EOS:
                break
            if _N_SPECIAL <= i < len(self._pieces):
                out += self._pieces[i]
        return out.decode("utf-8", errors="replace")

    def config(self) -> dict[str, list[str]]:
        return {"words": list(self.words)}
