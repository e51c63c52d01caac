"""The artifact's tokenizer (HF `tokenizers`), with BOS handling and streaming-safe detokenization."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from edge_runtime.errors import ArtifactError
from edge_runtime.text_input import check_text


class Tokenizer:
    def __init__(self, path: Path, bos_token_id: int | None) -> None:
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ArtifactError(f"{path}: cannot load tokenizer ({exc})") from exc
        self.bos_token_id = bos_token_id

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids with exactly one leading BOS (as Gemma expects), whatever the post-processor does."""
        ids = self._tok.encode(check_text(text, "the text"), add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; chat replies keep special tokens, whose markers (Gemma 4's `<|tool_call>`, `<|channel>`)
        are the reply's structure."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        """The id of the token spelled exactly `text` (a special token such as "<|tool_call>"), else None."""
        return self._tok.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows, added tokens included (a model's logits may be wider)."""
        return self._tok.get_vocab_size(with_added_tokens=True)


class StreamDecoder:
    """Turns tokens into text pieces as they arrive without splitting multi-byte characters.

    Byte-level BPE can end a token in the middle of a UTF-8 sequence; decoding the window since the last
    emitted text and holding back while it ends in U+FFFD keeps every piece valid and the work per token O(1).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        piece = self._pending()
        if not piece or piece.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return piece

    def flush(self) -> str:
        """What is still held back when generation ends (an unfinished character decodes as U+FFFD), so that
        the pieces of a stream always join to the decode of all its tokens."""
        piece = self._pending()
        self.prefix = self.read = len(self.ids)
        return piece

    def _pending(self) -> str:
        """Text the tokens after `read` add to the window that starts at `prefix`."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip_special_tokens)
        text = self.tokenizer.decode(self.ids[self.prefix:], self.skip_special_tokens)
        return text[len(before):]
