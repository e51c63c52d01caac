"""Text handed to edge-runtime must be Unicode: what is not is refused with its position, never repaired.

Invalid UTF-8 (a Latin-1 file piped into `run -`) and lone surrogates (a JSON "\\ud800" escape, a string decoded
with errors="surrogateescape") cannot be tokenized. Decoding with errors="replace" would let the run go on, but
on a prompt the user did not write, and `perplexity` would score another text than the file holds, in silence.
So they are refused, the same way in the CLI (run, chat, perplexity --text-file), the SDK (encode, generate,
chat) and the server (400 naming the field), with where the fault is: a byte offset for bytes (what hexdump and
iconv count), a character index for strings, and what to do about it.
"""

from __future__ import annotations

from edge_runtime.errors import InvalidTextError


def decode_utf8(data: bytes, where: str) -> str:
    """`data` as UTF-8 text, or an InvalidTextError naming `where` and the first bad byte's offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidTextError(f"{where}: not UTF-8 text ({exc.reason}, byte 0x{data[exc.start]:02x} at offset "
                               f"{exc.start}); convert it to UTF-8 first, e.g. iconv -f latin1 -t utf-8") from None


def decode_os_text(text: str, where: str) -> str:
    """Text that came from the command line or a terminal, where Python keeps undecodable bytes as surrogate
    escapes: checked as the bytes the user gave, so the error names the byte offset they can find."""
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no undecodable byte stands for
        return check_text(text, where)
    return decode_utf8(data, where)


def check_text(text: str, where: str) -> str:
    """`text` itself, or an InvalidTextError naming `where` and the character index of a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidTextError(f"{where}: character {exc.start} is a lone surrogate (U+{ord(text[exc.start]):04X}), "
                               "which is not text; pass valid Unicode (surrogates only come in pairs, as in a JSON "
                               "\\ud83d\\ude00 escape)") from None
    return text
