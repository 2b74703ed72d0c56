"""Local Hugging Face `tokenizer.json` files: locate, hash, load, and find the end-of-document token."""

from __future__ import annotations

import hashlib
import os

# End-of-document tokens of common tokenizer families, tried in this order when none is named.
COMMON_EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")


class TokenizerFileError(ValueError):
    """A tokenizer path or token is unusable; the message is one line naming it."""


def resolve_tokenizer_file(path: str) -> str:
    """`path` itself if it is a file, else `path/tokenizer.json`."""
    candidate = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        raise TokenizerFileError(f"tokenizer={path}: no tokenizer.json file there")
    return candidate


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_tokenizer(path: str):
    from tokenizers import Tokenizer

    file = resolve_tokenizer_file(path)
    try:
        return Tokenizer.from_file(file)
    except Exception as e:  # the library raises a bare Exception for unreadable files
        raise TokenizerFileError(f"tokenizer={file}: cannot load ({str(e).splitlines()[0]})") from None


def find_eod(tokenizer, name: str | None = None) -> tuple[str, int]:
    """(token, id) of the end-of-document token: `name` if given, else the first common one present."""
    candidates = (name,) if name else COMMON_EOD_TOKENS
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token, token_id
    if name:
        raise TokenizerFileError(f"eod_token={name!r}: not in the tokenizer's vocabulary")
    raise TokenizerFileError(f"tokenizer has none of {', '.join(COMMON_EOD_TOKENS)}: name its end-of-document token")
