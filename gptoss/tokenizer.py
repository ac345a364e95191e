"""The o200k_harmony tokenizer, offline.

openai-harmony and tiktoken download ``o200k_base.tiktoken`` on first use, which fails without
internet. This module finds a verified copy first, in this order:

1. the folder named by ``TIKTOKEN_ENCODINGS_BASE``;
2. the model folder: a published checkpoint ships ``tokenizer.json``, from which the ranks file is
   derived (and checked against the known sha256) into the per-user cache;
3. the per-user cache (``gptoss.cache.cache_root()``, subfolder ``vocab``);
4. the demo model that ships inside the package: its ``tokenizer.json`` is the full o200k_harmony
   one, so the vocabulary is derived from it the same way (every command works offline);
5. the normal download, into the per-user cache.

It also writes a Hugging Face ``tokenizer.json`` for the vocabulary, so that a random checkpoint
looks like a published one.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import threading
import urllib.request
from pathlib import Path

from gptoss.cache import CACHE_ENV, cache_root

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
ENCODINGS_BASE_ENV = "TIKTOKEN_ENCODINGS_BASE"

# Ranks 0..199997 are byte-pair tokens; 199998..201087 are special (vocab size 201088).
NUM_BPE_TOKENS = 199_998
VOCAB_SIZE = 201_088
NAMED_SPECIAL_TOKENS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
}

# The ids the code refers to by name: rendering, parsing, sampling, the engine and the server all
# take them from here.
STARTOFTEXT = NAMED_SPECIAL_TOKENS["<|startoftext|>"]
ENDOFTEXT = NAMED_SPECIAL_TOKENS["<|endoftext|>"]
RETURN = NAMED_SPECIAL_TOKENS["<|return|>"]  # ends a final answer
CONSTRAIN = NAMED_SPECIAL_TOKENS["<|constrain|>"]
CHANNEL = NAMED_SPECIAL_TOKENS["<|channel|>"]
START = NAMED_SPECIAL_TOKENS["<|start|>"]
END = NAMED_SPECIAL_TOKENS["<|end|>"]
MESSAGE = NAMED_SPECIAL_TOKENS["<|message|>"]
CALL = NAMED_SPECIAL_TOKENS["<|call|>"]  # ends a tool call
# openai-harmony's stop_tokens_for_assistant_actions(): an assistant turn ends with either.
ASSISTANT_STOP_IDS = (RETURN, CALL)
# generation_config.json's eos_token_id in the published checkpoints.
DEFAULT_EOS_IDS = (RETURN, ENDOFTEXT, CALL)

# The o200k pre-tokenizer pattern: the `pat_str` of tiktoken_ext.openai_public.o200k_base.
# tiktoken builds it inside a function that also downloads the ranks, so it cannot be read from
# there offline; tests check this copy against it.
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


class TokenizerError(RuntimeError):
    """The vocabulary could not be found or is not the o200k one; the message says what to do."""


def special_tokens() -> dict[str, int]:
    """Every special token of o200k_harmony: the named ones, and `<|reserved_N|>` for the rest."""
    named_ids = set(NAMED_SPECIAL_TOKENS.values())
    reserved = {f"<|reserved_{i}|>": i for i in range(NUM_BPE_TOKENS, VOCAB_SIZE) if i not in named_ids}
    return dict(sorted({**NAMED_SPECIAL_TOKENS, **reserved}.items(), key=lambda item: item[1]))


# --- Finding the vocabulary ---------------------------------------------------------------------


def _fix_hint() -> str:
    return (
        f"To fix it, do one of: set {ENCODINGS_BASE_ENV} to a folder holding {VOCAB_FILE} "
        f"(sha256 {VOCAB_SHA256}, from {VOCAB_URL}); put the checkpoint's tokenizer.json in the "
        f"model folder and pass that folder; copy {VOCAB_FILE} into {_vocab_cache_dir()}; or run "
        "once with internet access."
    )


def cache_dir() -> Path:
    """The per-user cache (gptoss.cache.cache_root)."""
    return cache_root()


def _vocab_cache_dir() -> Path:
    return cache_dir() / "vocab"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_verified(vocab_dir: Path) -> bytes | None:
    """The ranks file in `vocab_dir` if it is there and has the known sha256, else None."""
    try:
        data = (vocab_dir / VOCAB_FILE).read_bytes()
    except OSError:
        return None
    return data if _sha256(data) == VOCAB_SHA256 else None


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; a cache file may be shared
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def _store_in_cache(data: bytes, source: str) -> Path:
    """Check `data` against the known sha256, then put it in the per-user cache."""
    actual = _sha256(data)
    if actual != VOCAB_SHA256:
        raise TokenizerError(
            f"The vocabulary from {source} is not o200k_base: its sha256 is {actual}, expected "
            f"{VOCAB_SHA256}. {_fix_hint()}"
        )
    target_dir = _vocab_cache_dir()
    try:
        _write_atomic(target_dir / VOCAB_FILE, data)
    except OSError as err:
        raise TokenizerError(
            f"Could not write the vocabulary into the per-user cache {target_dir} ({err}). Set "
            f"{CACHE_ENV} to a writable folder, or set {ENCODINGS_BASE_ENV}."
        ) from err
    return target_dir


def _download_vocab() -> bytes:
    """The ranks file from OpenAI's public blob store (the URL tiktoken and harmony use)."""
    with urllib.request.urlopen(VOCAB_URL, timeout=60) as response:
        return response.read()


def find_vocab_dir(model_path: str | Path | None = None) -> Path:
    """The folder holding a verified `o200k_base.tiktoken`, found in the order of the module doc."""
    tried: list[str] = []

    env_value = os.environ.get(ENCODINGS_BASE_ENV)
    if env_value:
        env_dir = Path(env_value).expanduser()
        if _read_verified(env_dir) is not None:
            return env_dir
        if (env_dir / VOCAB_FILE).exists():
            raise TokenizerError(
                f"{env_dir / VOCAB_FILE} (from {ENCODINGS_BASE_ENV}) does not have the sha256 "
                f"{VOCAB_SHA256}: it is damaged or another vocabulary. {_fix_hint()}"
            )
        tried.append(f"{ENCODINGS_BASE_ENV}={env_value} (no {VOCAB_FILE} there)")
    else:
        tried.append(f"{ENCODINGS_BASE_ENV} (not set)")

    user_cache = _vocab_cache_dir()
    if model_path is not None:
        tokenizer_json = Path(model_path) / "tokenizer.json"
        if tokenizer_json.is_file():
            if _read_verified(user_cache) is not None:
                return user_cache  # derived earlier: no need to parse tokenizer.json again
            return _store_in_cache(vocab_from_tokenizer_json(tokenizer_json), str(tokenizer_json))
        tried.append(f"model folder {model_path} (no tokenizer.json)")
    else:
        tried.append("model folder (none given)")

    if _read_verified(user_cache) is not None:
        return user_cache
    tried.append(f"per-user cache {user_cache} (no verified {VOCAB_FILE})")

    try:  # the demo model ships inside the package with the full o200k_harmony tokenizer.json
        from gptoss.demo import demo_model_path

        shipped = demo_model_path() / "tokenizer.json"
        return _store_in_cache(vocab_from_tokenizer_json(shipped), f"{shipped} (the demo model's)")
    except Exception as err:  # a damaged install: fall through to the download
        tried.append(f"the demo model's tokenizer.json (failed: {err})")

    try:
        downloaded = _download_vocab()
    except Exception as err:  # any network or HTTP failure: report it with the rest
        tried.append(f"download from {VOCAB_URL} (failed: {err})")
        raise TokenizerError(
            f"Could not find the o200k vocabulary ({VOCAB_FILE}). Tried: " + "; ".join(tried) + ". " + _fix_hint()
        ) from err
    return _store_in_cache(downloaded, VOCAB_URL)


def _parse_ranks(data: bytes, source: str) -> dict[bytes, int]:
    """Token bytes -> rank from the `base64 rank` lines of a .tiktoken file."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as err:
            raise TokenizerError(f"Bad line {line[:60]!r} in {source}") from err
    return ranks


def _read_vocab(vocab_dir: Path) -> bytes:
    """The ranks file of `vocab_dir`, or a TokenizerError when it is missing or not o200k_base."""
    data = _read_verified(vocab_dir)
    if data is None:
        raise TokenizerError(
            f"{vocab_dir / VOCAB_FILE} is missing or does not have sha256 {VOCAB_SHA256}. {_fix_hint()}"
        )
    return data


def _load_ranks(vocab_dir: Path) -> dict[bytes, int]:
    """The verified ranks of `vocab_dir`, parsed from the same bytes that were hashed."""
    return _parse_ranks(_read_vocab(vocab_dir), str(vocab_dir / VOCAB_FILE))


# --- Encodings ----------------------------------------------------------------------------------

_ENV_LOCK = threading.Lock()


_VOCAB_DIR_OF: dict[int, str] = {}  # id(harmony encoding) -> its vocabulary folder (they live forever)


@functools.lru_cache(maxsize=None)
def _harmony_for_dir(vocab_dir: str):
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    # openai-harmony reads TIKTOKEN_ENCODINGS_BASE while loading: point it at our folder, then restore.
    with _ENV_LOCK:
        previous = os.environ.get(ENCODINGS_BASE_ENV)
        os.environ[ENCODINGS_BASE_ENV] = vocab_dir
        try:
            encoding = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
            _VOCAB_DIR_OF[id(encoding)] = vocab_dir
            return encoding
        except Exception as err:
            raise TokenizerError(f"openai-harmony could not load the vocabulary from {vocab_dir}: {err}") from err
        finally:
            if previous is None:
                del os.environ[ENCODINGS_BASE_ENV]
            else:
                os.environ[ENCODINGS_BASE_ENV] = previous


def harmony_encoding(model_path: str | Path | None = None):
    """The openai-harmony encoding for gpt-oss (HarmonyEncodingName.HARMONY_GPT_OSS), loaded offline."""
    return _harmony_for_dir(str(find_vocab_dir(model_path)))


@functools.lru_cache(maxsize=None)
def _tiktoken_for_dir(vocab_dir: str):
    import tiktoken

    return tiktoken.Encoding(
        name="o200k_harmony",
        pat_str=O200K_PATTERN,
        mergeable_ranks=_load_ranks(Path(vocab_dir)),
        special_tokens=special_tokens(),
    )


def tiktoken_encoding(model_path: str | Path | None = None):
    """A `tiktoken.Encoding` named o200k_harmony, for plain text encoding and decoding."""
    return _tiktoken_for_dir(str(find_vocab_dir(model_path)))


def text_encoding_for(harmony):
    """The tiktoken encoding of the same vocabulary as a harmony encoding from `harmony_encoding`."""
    vocab_dir = _VOCAB_DIR_OF.get(id(harmony))
    return _tiktoken_for_dir(vocab_dir) if vocab_dir else tiktoken_encoding()


# --- Hugging Face tokenizer.json ----------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level table: printable bytes stand for themselves, the rest for chars from U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    next_char = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(next_char)
            next_char += 1
    return table


def _to_byte_level(token: bytes) -> str:
    table = _byte_to_unicode()
    return "".join(table[b] for b in token)


def _recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """For each multi-byte token in rank order, the pair that BPE with lower ranks produces.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; applying the merges
    in rank order reproduces that, so each token's merge is the two parts its own bytes reach
    when only lower-ranked tokens may form.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best_rank, best_index = rank, -1
            for i in range(len(parts) - 1):
                pair_rank = ranks.get(parts[i] + parts[i + 1], rank)
                if pair_rank < best_rank:
                    best_rank, best_index = pair_rank, i
            if best_index < 0:
                break
            parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
        if len(parts) != 2:
            raise TokenizerError(f"Token {token!r} (rank {rank}) cannot be formed by byte-pair merges")
        merges.append((parts[0], parts[1]))
    return merges


def _tokenizer_json_text(ranks: dict[bytes, int]) -> str:
    vocab = {_to_byte_level(token): rank for token, rank in sorted(ranks.items(), key=lambda item: item[1])}
    merges = [f"{_to_byte_level(a)} {_to_byte_level(b)}" for a, b in _recover_merges(ranks)]
    added_tokens = [
        {
            "id": token_id,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for content, token_id in special_tokens().items()
    ]
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": O200K_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            # tiktoken takes a whole pre-token that is itself in the vocabulary as one token.
            "ignore_merges": True,
            "vocab": vocab,
            "merges": merges,
        },
    }
    return json.dumps(document, ensure_ascii=False)


_SPECIAL_TOKENS_MAP = {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"}


_TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    **_SPECIAL_TOKENS_MAP,
    "model_max_length": 131072,
    "clean_up_tokenization_spaces": False,
}


def write_tokenizer_json(folder: str | Path, vocab_dir: str | Path | None = None) -> Path:
    """Write tokenizer.json (and tokenizer_config.json, special_tokens_map.json) into `folder`.

    Recovering ~200k merges takes seconds, so the tokenizer.json is built once per vocabulary
    sha256 in the per-user cache and copied from there afterwards. Returns the tokenizer.json path.
    """
    vocab_dir = Path(vocab_dir) if vocab_dir is not None else find_vocab_dir()
    data = _read_vocab(vocab_dir)
    cached = cache_dir() / "tokenizer" / VOCAB_SHA256 / "tokenizer.json"
    if not cached.is_file():
        ranks = _parse_ranks(data, str(vocab_dir / VOCAB_FILE))
        _write_atomic(cached, _tokenizer_json_text(ranks).encode("utf-8"))

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "tokenizer.json"
    shutil.copyfile(cached, target)
    (folder / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(_SPECIAL_TOKENS_MAP, indent=2) + "\n")
    return target


def vocab_from_tokenizer_json(path: str | Path) -> bytes:
    """The o200k_base.tiktoken contents (`base64(token) rank` lines) for ids 0..199997 of a tokenizer.json."""
    path = Path(path)
    try:
        model = json.loads(path.read_text(encoding="utf-8"))["model"]
        vocab = model["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TokenizerError(f"{path} is not a readable Hugging Face tokenizer.json ({err}). {_fix_hint()}") from err
    if model.get("type", "BPE") != "BPE" or not isinstance(vocab, dict):
        raise TokenizerError(f"{path} does not hold a byte-level BPE model. {_fix_hint()}")

    unicode_to_byte = {char: b for b, char in _byte_to_unicode().items()}
    tokens: list[bytes | None] = [None] * NUM_BPE_TOKENS
    for text, token_id in vocab.items():
        if not isinstance(token_id, int) or not 0 <= token_id < NUM_BPE_TOKENS:
            continue  # special tokens and anything past the byte-pair range
        try:
            tokens[token_id] = bytes(unicode_to_byte[char] for char in text)
        except KeyError as err:
            raise TokenizerError(
                f"{path}: token {text!r} (id {token_id}) is not byte-level encoded. {_fix_hint()}"
            ) from err
    missing = [token_id for token_id, token in enumerate(tokens) if token is None]
    if missing:
        raise TokenizerError(
            f"{path} lacks {len(missing)} of the {NUM_BPE_TOKENS} o200k token ids (first: {missing[0]}). {_fix_hint()}"
        )
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for rank, token in enumerate(tokens))
