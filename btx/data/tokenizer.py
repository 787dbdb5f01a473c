"""Tokenizers: the byte tokenizer of the demo, and any `tokenizer.json` through the `tokenizers` package.

Both kinds share one small interface (`Tokenizer`): `encode`, `encode_batch`, `decode`, `bos_id`,
`eos_id`, `vocab_size`, `identity()` and `save(dir)`. Token shards record `identity()` so a shard
is never fed to a model trained with a different tokenizer (see `btx.data.shards.check_tokenizer`).

Neither kind ever unpickles anything: the byte tokenizer is a few constants, and `tokenizer.json`
is read by `tokenizers.Tokenizer.from_file` (plain JSON). transformers is not imported here.

Byte tokenizer layout (vocab_size 264)
    0..255   the UTF-8 bytes themselves
    256      <|bos|>
    257      <|eos|>
    258      <|pad|>
    259..263 reserved, never produced
The vocabulary is rounded up from 259 to 264, a multiple of 8, because embedding and output
matrices with such row counts use tensor cores well; the spare ids cost nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from btx.errors import BtxError, first_line
from btx.io.atomic import write_bytes_atomic

BYTE_SPEC = "byte"
BTX_TOKENIZER_FILE = "btx_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Files a Hugging Face tokenizer directory may hold next to tokenizer.json; copied along on save.
_HF_COMPANION_FILES = (HF_TOKENIZER_CONFIG_FILE, "special_tokens_map.json", "generation_config.json")


@runtime_checkable
class Tokenizer(Protocol):
    """What btx needs from a tokenizer. `ByteTokenizer` and `HFTokenizer` implement it."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def identity(self) -> dict: ...

    def save(self, directory: str | os.PathLike) -> Path: ...


# --------------------------------------------------------------------------------------------
# Byte tokenizer
# --------------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus a few special tokens. Needs no files and no training."""

    kind = "byte"
    version = 1
    vocab_size = 264
    bos_id = 256
    eos_id = 257
    pad_id = 258
    special_tokens = {"<|bos|>": 256, "<|eos|>": 257, "<|pad|>": 258}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # frombuffer is a zero-copy view of the encoded bytes: the fast path for big corpora.
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # Special tokens carry no text; broken UTF-8 sequences (a window cut mid-character)
        # become U+FFFD rather than an exception.
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def description(self) -> dict:
        """The canonical description: everything that determines how text maps to ids."""
        return {
            "kind": self.kind,
            "version": self.version,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "special_tokens": dict(self.special_tokens),
        }

    def identity(self) -> dict:
        canonical = json.dumps(self.description(), sort_keys=True, separators=(",", ":"))
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "hash": hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `btx_tokenizer.json`, plus an equivalent `tokenizer.json` and `tokenizer_config.json`
        so that Hugging Face tools (transformers, vLLM, lm-eval) open a demo checkpoint with no btx code.

        `load_tokenizer(directory)` prefers `btx_tokenizer.json`, so a saved directory loads back as
        a ByteTokenizer with the same identity. Returns the path of `btx_tokenizer.json`.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        record = {**self.description(), "hash": self.identity()["hash"]}
        write_bytes_atomic(directory / HF_TOKENIZER_FILE, self.to_hf_json().encode("utf-8"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|bos|>",
            "eos_token": "<|eos|>",
            "pad_token": "<|pad|>",
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        write_bytes_atomic(directory / HF_TOKENIZER_CONFIG_FILE, _json_bytes(config))
        # btx's own record last: its presence means the directory's tokenizer files are complete.
        target = directory / BTX_TOKENIZER_FILE
        write_bytes_atomic(target, _json_bytes(record))
        return target

    def to_hf_json(self) -> str:
        """A `tokenizer.json` that encodes exactly like this tokenizer (byte-level BPE with no merges).

        ByteLevel pre-tokenization maps each byte to one printable character (the GPT-2 table);
        the vocabulary maps that character back to the byte's value, so ids equal byte values.
        Text that literally contains a special token string ("<|eos|>") is the one difference:
        Hugging Face splits it out as the special token, btx encodes its bytes.
        """

        byte_to_char = _gpt2_bytes_to_unicode()
        vocab = {byte_to_char[b]: b for b in range(256)}
        tok = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        names = sorted(self.special_tokens, key=self.special_tokens.get)
        names += [f"<|reserved_{i}|>" for i in range(self.vocab_size - 256 - len(names))]
        tok.add_special_tokens([AddedToken(name, special=True) for name in names])
        return tok.to_str(pretty=True)


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which ByteLevel pre-tokenization uses."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


# --------------------------------------------------------------------------------------------
# tokenizer.json through the `tokenizers` package
# --------------------------------------------------------------------------------------------

# Tried in order when tokenizer_config.json does not name the special tokens.
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|bos|>")
_EOS_CANDIDATES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "<|eos|>")


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, run by the `tokenizers` package (Rust, parallel batches).

    BOS/EOS come from `tokenizer_config.json` next to the file when it names them, otherwise from
    well-known token strings, or from the `bos_token`/`eos_token` arguments. Either may be None.
    Encoding never adds special tokens by itself: btx.data adds EOS between documents explicitly,
    so the shards look the same whatever the tokenizer's post-processor says.
    """

    kind = "hf"

    def __init__(self, path: str | os.PathLike, *, bos_token: str | None = None, eos_token: str | None = None):

        self.path = Path(path)
        if not self.path.is_file():
            raise BtxError(f"{self.path}: tokenizer.json not found")
        self._raw = self.path.read_bytes()
        try:
            self._tok = RustTokenizer.from_str(self._raw.decode("utf-8"))
        except Exception as exc:  # the Rust side raises plain Exception with a parser message
            raise BtxError(f"{self.path}: not a valid tokenizer.json ({first_line(exc)})") from exc

        vocab = self._tok.get_vocab(with_added_tokens=True)
        # Some models leave holes in the id space; the model needs max id + 1 rows, not len(vocab).
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        config = self._read_config()
        self.bos_id = self._special_id(bos_token or _config_token(config, "bos_token"), _BOS_CANDIDATES, "bos_token")
        self.eos_id = self._special_id(eos_token or _config_token(config, "eos_token"), _EOS_CANDIDATES, "eos_token")

    def _read_config(self) -> dict:
        config_path = self.path.parent / HF_TOKENIZER_CONFIG_FILE
        if not config_path.is_file():
            return {}
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BtxError(f"{config_path}: not valid JSON ({first_line(exc)})") from exc
        return config if isinstance(config, dict) else {}

    def _special_id(self, named: str | None, candidates: Sequence[str], key: str) -> int | None:
        if named is not None:
            token_id = self._tok.token_to_id(named)
            if token_id is None:
                raise BtxError(f"{self.path}: {key} {named!r} is not in the vocabulary")
            return token_id
        for candidate in candidates:
            token_id = self._tok.token_to_id(candidate)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.uint32) for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def identity(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "hash": hashlib.sha256(self._raw).hexdigest()}

    def save(self, directory: str | os.PathLike) -> Path:
        """Copy tokenizer.json (byte for byte, so the identity hash survives) and its companion
        files (tokenizer_config.json, special_tokens_map.json) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in _HF_COMPANION_FILES:
            source = self.path.parent / name
            if source.is_file() and source.resolve() != (directory / name).resolve():
                write_bytes_atomic(directory / name, source.read_bytes())
        target = directory / HF_TOKENIZER_FILE
        if self.path.resolve() != target.resolve():
            write_bytes_atomic(target, self._raw)
        return target


def _config_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # {"content": "</s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_tokenizer(spec: str | os.PathLike | Tokenizer) -> Tokenizer:
    """`"byte"`, a tokenizer.json, a btx_tokenizer.json, or a directory holding one of them
    (a checkpoint directory, say). A directory with both prefers btx_tokenizer.json.
    A tokenizer object is returned as it is."""
    if not isinstance(spec, (str, os.PathLike)):
        if isinstance(spec, Tokenizer):
            return spec
        raise BtxError(f"tokenizer: expected 'byte' or a path, got {type(spec).__name__}")
    if isinstance(spec, str) and spec == BYTE_SPEC:
        return ByteTokenizer()

    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / BTX_TOKENIZER_FILE).is_file():
            return _load_btx_tokenizer_file(path / BTX_TOKENIZER_FILE)
        if (path / HF_TOKENIZER_FILE).is_file():
            return HFTokenizer(path / HF_TOKENIZER_FILE)
        raise BtxError(f"{path}: no {HF_TOKENIZER_FILE} or {BTX_TOKENIZER_FILE} in this directory")
    if path.is_file():
        if path.name == BTX_TOKENIZER_FILE:
            return _load_btx_tokenizer_file(path)
        return HFTokenizer(path)
    raise BtxError(
        f"{path}: tokenizer not found (expected 'byte', a tokenizer.json, "
        f"or a directory containing {HF_TOKENIZER_FILE} or {BTX_TOKENIZER_FILE})"
    )


def _load_btx_tokenizer_file(path: Path) -> Tokenizer:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BtxError(f"{path}: not valid JSON ({first_line(exc)})") from exc
    if not isinstance(record, dict) or record.get("kind") != ByteTokenizer.kind:
        raise BtxError(f'{path}: expected a btx tokenizer record with "kind": "byte"')
    tokenizer = ByteTokenizer()
    if record.get("hash") != tokenizer.identity()["hash"]:
        raise BtxError(
            f"{path}: byte tokenizer version {record.get('version')!r} differs from this btx's "
            f"(version {ByteTokenizer.version}); the checkpoint was made by another btx version"
        )
    return tokenizer


# --------------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------------


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
