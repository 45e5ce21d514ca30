"""Local token estimates: exact agreement with tiktoken, and no network, ever."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import tiktoken

from sidecar import tokens
from sidecar.model import Usage
from sidecar.providers import PromptText
from sidecar.tokens import DEFAULT_ENCODING, Estimator, prepare_offline_cache

CACHE_NAMES = {
    "cl100k_base": "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
    "o200k_base": "fb374d419588a4632f3f557e76b4b70aebbca790",
}
TEXTS = [
    "",
    "hello world",
    "Héllo wörld — ✓ 你好世界 🙂",
    "def f(x):\n    return x ** 2\n\n\n",
    "<|endoftext|> is plain text here <|im_start|>",
    "a" * 5000,
    json.dumps({"tools": [{"name": "multiply", "parameters": {"a": "integer"}}]}),
]
MODELS = [
    "gpt-4o",
    "gpt-4",
    "gpt-3.5-turbo",
    "gpt-5-nano",
    "text-embedding-3-small",
    "claude-3-5-sonnet",
    None,
]
NO_NETWORK = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh tiktoken cache dir in the environment, and any download sent nowhere."""
    cache = tmp_path / "tiktoken"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    for name in ("NO_PROXY", "no_proxy", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in NO_NETWORK.items():
        monkeypatch.setenv(name, value)
    return cache


def run_offline(script: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "https_proxy", "http_proxy")}
    env |= NO_NETWORK | {"TIKTOKEN_CACHE_DIR": str(cache)}
    env.pop("DATA_GYM_CACHE_DIR", None)
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_cache_names_and_hashes_are_tiktokens() -> None:
    source = inspect.getsource(importlib.import_module("tiktoken_ext.openai_public"))
    for name, encoding in tokens._BUNDLED.items():
        assert encoding.cache_name == CACHE_NAMES[name]
        assert f'expected_hash="{encoding.sha256}"' in source
    assert set(tokens.OFFLINE_ENCODINGS) == set(CACHE_NAMES)


def test_prepare_fills_an_empty_dir_and_sets_the_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    cache = tmp_path / "a" / "b"
    assert prepare_offline_cache(cache) == cache
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted(CACHE_NAMES.values())  # no temp files left
    for name, encoding in tokens._BUNDLED.items():
        data = (cache / CACHE_NAMES[name]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == encoding.sha256


def test_prepare_keeps_a_configured_dir_that_has_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "good"
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    prepare_offline_cache(good)
    other = tmp_path / "other"
    assert prepare_offline_cache(other) == good
    assert not other.exists()
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(good)
    # A configured dir without the files is replaced by the one prepared.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    assert prepare_offline_cache(other) == other
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(other)


def test_prepare_default_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "env"))
    assert tokens.default_cache_dir() == tmp_path / "env"
    assert prepare_offline_cache() == tmp_path / "env"
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tokens.default_cache_dir() == tmp_path / "home" / ".cache" / "llm-sidecar" / "tiktoken"


def test_prepare_repairs_a_wrong_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    (tmp_path / CACHE_NAMES["o200k_base"]).write_bytes(b"not a bpe file")
    prepare_offline_cache(tmp_path)
    data = (tmp_path / CACHE_NAMES["o200k_base"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == tokens._BUNDLED["o200k_base"].sha256


def test_prepare_falls_back_to_a_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    used = prepare_offline_cache(blocker / "cache")
    assert used.parent == tmp_path / "tmp"
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(used)


def test_counts_equal_tiktoken(offline: Path) -> None:
    estimator = Estimator()
    assert estimator.count("hello world", "gpt-4o") == 2  # prepares the cache
    for model in MODELS:
        name = estimator.encoding_for(model)
        encoding = tiktoken.get_encoding(name)
        for text in TEXTS:
            assert estimator.count(text, model) == len(encoding.encode(text, disallowed_special=())), (
                model,
                text,
            )
    assert (offline / CACHE_NAMES["o200k_base"]).exists()


def test_encoding_for() -> None:
    estimator = Estimator(prepare=False)
    for model in ("gpt-4o", "gpt-4o-mini-2024-07-18", "gpt-4", "gpt-3.5-turbo", "gpt-5-nano", "o3-mini"):
        assert estimator.encoding_for(model) == tiktoken.encoding_name_for_model(model)
    assert estimator.encoding_for("text-embedding-ada-002") == "cl100k_base"
    # Anthropic publishes no tokenizer: Claude (and any unknown model) gets the default.
    assert DEFAULT_ENCODING == "o200k_base"
    for unknown in ("claude-3-5-sonnet-20240620", "claude-haiku-4-5", "my-azure-deployment", "", None):
        assert estimator.encoding_for(unknown) == DEFAULT_ENCODING
    # Encodings not shipped offline (retired models) are approximated by cl100k_base.
    assert tiktoken.encoding_name_for_model("text-davinci-003") == "p50k_base"
    assert estimator.encoding_for("text-davinci-003") == "cl100k_base"


def test_estimate(offline: Path) -> None:
    estimator = Estimator()
    prompt = PromptText("hello world", token_ids=3)
    assert estimator.estimate("gpt-4o", prompt, "hello world") == Usage(input=2 + 3, output=2)
    assert estimator.estimate("gpt-4o", None, "hello world") == Usage(output=2)
    assert estimator.estimate("claude-3-5-sonnet", prompt, None) == Usage(input=5)
    assert estimator.estimate(None, None, None) == Usage()
    assert estimator.estimate("gpt-4o", PromptText(""), "") == Usage(input=0, output=0)


def test_encodings_load_once_under_concurrency(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = tiktoken.get_encoding

    def counting(name: str) -> tiktoken.Encoding:
        calls.append(name)
        return real(name)

    monkeypatch.setattr(tiktoken, "get_encoding", counting)
    estimator = Estimator()
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        for model in ("gpt-4o", "gpt-4"):
            estimator.count("some text", model)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(calls) == ["cl100k_base", "o200k_base"]


def test_counts_work_with_the_network_off(tmp_path: Path) -> None:
    cache = tmp_path / "fresh"
    script = f"""
import json, sys
from sidecar.tokens import Estimator, prepare_offline_cache
used = prepare_offline_cache()
estimator = Estimator(prepare=False)
texts = {TEXTS!r}
counts = {{str(m): [estimator.count(t, m) for t in texts] for m in {MODELS!r}}}
# Prove the network is really off: an encoding that is not cached must fail to download.
import tiktoken
try:
    tiktoken.get_encoding("p50k_base")
except Exception:
    blocked = True
else:
    blocked = False
print(json.dumps({{"used": str(used), "counts": counts, "blocked": blocked}}))
"""
    proc = run_offline(script, cache)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["used"] == str(cache)
    assert out["blocked"] is True
    for model in MODELS:
        encoding = tiktoken.get_encoding(Estimator(prepare=False).encoding_for(model))
        assert out["counts"][str(model)] == [len(encoding.encode(t, disallowed_special=())) for t in TEXTS]


def test_a_wrong_file_in_the_cache_fails_loudly(tmp_path: Path) -> None:
    (tmp_path / CACHE_NAMES["cl100k_base"]).write_bytes(b"dGVzdA== 0\n")
    script = """
from sidecar.tokens import Estimator
print(Estimator(prepare=False).count("hello", "gpt-4"))
"""
    proc = run_offline(script, tmp_path)
    # tiktoken's hash check rejects the file and tries to download it, which cannot work.
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "/encodings/cl100k_base.tiktoken" in proc.stderr
