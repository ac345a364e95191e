"""The offline tokenizer: vocabulary lookup order, encodings that agree, and tokenizer.json."""

import base64
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import SHARED_VOCAB
from gptoss import tokenizer as tok

SAMPLES = [
    "",
    "Hello, world!",
    "  leading spaces\n\n\ttabs   and  runs     \n",
    "def f(x):\n    return x**2  # square\n\r\n",
    "1234567890 3.14159 -42 1e10 0x1F",
    "héllo wörld 你好世界 こんにちは Привет мир مرحبا",
    "emoji 🎉👍🏽👨‍👩‍👧 end",
    "I'm sure they'VE said WE'LL go",
    "\u00a0non-breaking\u2003spaces and\u200bzero width",
    "<|start|>assistant<|channel|>final<|message|>Hi!<|end|><|return|>",
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own per-user cache, so none writes to the real home folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(tok.CACHE_ENV, str(cache))
    return cache


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("session_cache")


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory, session_cache):
    """A folder with tokenizer.json and friends, built once for the session (the slow step)."""
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tok.CACHE_ENV, str(session_cache))
        tok.write_tokenizer_json(folder, SHARED_VOCAB)
    return folder


@pytest.fixture(scope="session")
def hf_tokenizer(hf_folder):
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(hf_folder / "tokenizer.json"))


@pytest.fixture
def no_env_vocab(monkeypatch):
    monkeypatch.delenv(tok.ENCODINGS_BASE_ENV, raising=False)


@pytest.fixture
def no_demo(monkeypatch, tmp_path):
    """As if the package had no demo model (whose tokenizer.json is the last offline source)."""
    import gptoss.demo

    monkeypatch.setattr(gptoss.demo, "ARCHIVE", tmp_path / "no-demo.tar.xz")


@pytest.fixture
def no_download(monkeypatch):
    """Fail the download step the way an offline machine does, without touching the network."""

    def offline():
        raise OSError("network disabled in tests")

    monkeypatch.setattr(tok, "_download_vocab", offline)


def _must_not_run(*args, **kwargs):
    pytest.fail("this step should have been skipped")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- Special tokens and encodings -----------------------------------------------------------------


def test_special_tokens_fill_the_reserved_range():
    specials = tok.special_tokens()
    assert sorted(specials.values()) == list(range(199998, 201088))
    for name, token_id in tok.NAMED_SPECIAL_TOKENS.items():
        assert specials[name] == token_id
    assert specials["<|reserved_200000|>"] == 200000
    assert specials["<|reserved_201087|>"] == 201087


def test_special_tokens_agree_with_harmony():
    harmony = tok.harmony_encoding()
    assert set(tok.special_tokens()) <= harmony.special_tokens_set
    for name, token_id in tok.special_tokens().items():
        assert harmony.encode(name, allowed_special="all") == [token_id]
    assert set(harmony.stop_tokens_for_assistant_actions()) == {200002, 200012}


def test_pattern_is_tiktoken_o200k_pattern(monkeypatch):
    from tiktoken_ext import openai_public

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: {})
    assert tok.O200K_PATTERN == openai_public.o200k_base()["pat_str"]


def test_tiktoken_encoding_matches_harmony():
    encoding = tok.tiktoken_encoding()
    harmony = tok.harmony_encoding()
    assert encoding.name == "o200k_harmony"
    assert encoding.n_vocab == tok.VOCAB_SIZE
    for text in SAMPLES:
        ids = encoding.encode(text, allowed_special="all")
        assert ids == harmony.encode(text, allowed_special="all"), text
        assert encoding.decode(ids) == text
    assert tok.tiktoken_encoding() is encoding  # cached per vocabulary folder
    assert tok.harmony_encoding() is harmony


# --- Finding the vocabulary ---------------------------------------------------------------------


def test_env_var_wins_over_model_folder(hf_folder, private_cache):
    assert os.environ[tok.ENCODINGS_BASE_ENV]  # set by conftest
    assert tok.find_vocab_dir(hf_folder) == SHARED_VOCAB
    assert not private_cache.exists()  # tokenizer.json was not even read


def test_env_var_with_wrong_file_is_an_error(tmp_path, monkeypatch):
    (tmp_path / tok.VOCAB_FILE).write_bytes(b"IQ== 0\n")
    monkeypatch.setenv(tok.ENCODINGS_BASE_ENV, str(tmp_path))
    with pytest.raises(tok.TokenizerError, match="sha256"):
        tok.find_vocab_dir()


def test_model_folder_tokenizer_json_is_used_then_cached(
    hf_folder, private_cache, no_env_vocab, no_download, monkeypatch
):
    vocab_dir = tok.find_vocab_dir(hf_folder)
    assert vocab_dir == private_cache / "vocab"
    assert _sha256(vocab_dir / tok.VOCAB_FILE) == tok.VOCAB_SHA256

    # Second call: a cache hit, tokenizer.json is not parsed again; and the cache serves alone.
    monkeypatch.setattr(tok, "vocab_from_tokenizer_json", _must_not_run)
    assert tok.find_vocab_dir(hf_folder) == vocab_dir
    assert tok.find_vocab_dir() == vocab_dir


def test_harmony_loads_from_model_folder_alone(hf_folder, no_env_vocab, no_download):
    harmony = tok.harmony_encoding(hf_folder)
    assert harmony.encode("Hello, world!") == tok.tiktoken_encoding(hf_folder).encode("Hello, world!")
    assert tok.ENCODINGS_BASE_ENV not in os.environ  # restored after the load


def test_wrong_tokenizer_json_names_the_file(tmp_path, private_cache, no_env_vocab, no_download):
    ranks = tok._load_ranks(SHARED_VOCAB)
    vocab = {tok._to_byte_level(token): rank for token, rank in ranks.items()}
    first, second = tok._to_byte_level(b"a"), tok._to_byte_level(b"b")
    vocab[first], vocab[second] = vocab[second], vocab[first]  # complete, but not o200k
    model_folder = tmp_path / "model"
    model_folder.mkdir()
    (model_folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab}}))

    with pytest.raises(tok.TokenizerError) as raised:
        tok.find_vocab_dir(model_folder)
    message = str(raised.value)
    assert str(model_folder / "tokenizer.json") in message
    assert "sha256" in message and tok.VOCAB_SHA256 in message
    assert not (private_cache / "vocab" / tok.VOCAB_FILE).exists()


@pytest.mark.parametrize(
    "document",
    ["not json", {"model": {"type": "Unigram", "vocab": []}}, {"model": {"type": "BPE", "vocab": {"!": 0}}}],
)
def test_malformed_tokenizer_json_is_an_error(tmp_path, document):
    path = tmp_path / "tokenizer.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    with pytest.raises(tok.TokenizerError, match="tokenizer.json"):
        tok.vocab_from_tokenizer_json(path)


def test_the_demo_models_tokenizer_serves_when_nothing_else_does(tmp_path, private_cache, no_env_vocab,
                                                                  no_download):
    assert tok.find_vocab_dir(tmp_path) == private_cache / "vocab"
    assert tok._read_verified(private_cache / "vocab") is not None


def test_nothing_available_says_what_to_do(tmp_path, private_cache, no_env_vocab, no_download, no_demo):
    with pytest.raises(tok.TokenizerError) as raised:
        tok.find_vocab_dir(tmp_path)
    message = str(raised.value)
    assert tok.ENCODINGS_BASE_ENV in message
    assert "tokenizer.json" in message
    assert str(private_cache / "vocab") in message
    assert "network disabled in tests" in message


def test_download_is_verified_and_cached(private_cache, no_env_vocab, no_demo, monkeypatch):
    good = (SHARED_VOCAB / tok.VOCAB_FILE).read_bytes()
    monkeypatch.setattr(tok, "_download_vocab", lambda: good[:-10])
    with pytest.raises(tok.TokenizerError, match="sha256"):
        tok.find_vocab_dir()
    monkeypatch.setattr(tok, "_download_vocab", lambda: good)
    assert tok.find_vocab_dir() == private_cache / "vocab"
    assert (private_cache / "vocab" / tok.VOCAB_FILE).read_bytes() == good


# --- tokenizer.json -----------------------------------------------------------------------------


def test_tokenizer_json_round_trips_to_the_ranks_file(hf_folder):
    derived = tok.vocab_from_tokenizer_json(hf_folder / "tokenizer.json")
    assert hashlib.sha256(derived).hexdigest() == tok.VOCAB_SHA256
    first_line = derived.split(b"\n", 1)[0]
    assert first_line == base64.b64encode(b"!") + b" 0"


def test_tokenizer_json_encodes_like_tiktoken(hf_tokenizer):
    encoding = tok.tiktoken_encoding()
    texts = SAMPLES + [
        Path(tok.__file__).read_text(encoding="utf-8"),  # a long piece of real code
        " ".join(str(n) for n in range(0, 5000, 7)),
        "\n".join(["x" * n for n in range(1, 40)]) + " " * 33 + "\t\t\n \n",
        "".join(chr(c) for c in range(0x20, 0x3000, 7)),
    ]
    for text in texts:
        ids = encoding.encode(text, allowed_special="all")
        assert hf_tokenizer.encode(text).ids == ids, text[:80]
        assert hf_tokenizer.decode(ids, skip_special_tokens=False) == text
    assert hf_tokenizer.get_vocab_size() == tok.VOCAB_SIZE


def test_transformers_loads_the_folder_offline(hf_folder, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = transformers.AutoTokenizer.from_pretrained(hf_folder)
    assert hf.bos_token_id == 199998
    assert hf.eos_token_id == 200002
    assert hf.pad_token_id == 199999
    assert len(hf) == tok.VOCAB_SIZE
    text = SAMPLES[5]
    assert hf.encode(text, add_special_tokens=False) == tok.tiktoken_encoding().encode(text)


def test_write_tokenizer_json_reuses_the_cache(hf_folder, session_cache, tmp_path, monkeypatch):
    shutil.copytree(session_cache, tmp_path / "warm_cache")
    monkeypatch.setenv(tok.CACHE_ENV, str(tmp_path / "warm_cache"))
    monkeypatch.setattr(tok, "_tokenizer_json_text", _must_not_run)  # a warm call must not rebuild
    written = tok.write_tokenizer_json(tmp_path / "model")
    assert written.read_bytes() == (hf_folder / "tokenizer.json").read_bytes()
    assert (tmp_path / "model" / "tokenizer_config.json").is_file()
    assert (tmp_path / "model" / "special_tokens_map.json").is_file()


def test_one_cache_root_honours_xdg(monkeypatch, tmp_path):
    from gptoss import cache
    from gptoss.demo import _cache_root
    from gptoss.ops import cpu

    monkeypatch.delenv("GPTOSS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "xdg" / "gptoss"
    assert cache.cache_root() == tok.cache_dir() == root
    assert cpu.cache_dir() == root / "ext" and _cache_root() == root / "demo"
    monkeypatch.setenv("GPTOSS_CACHE", str(tmp_path / "mine"))
    assert tok.cache_dir() == tmp_path / "mine" and cpu.cache_dir() == tmp_path / "mine" / "ext"
