"""KV tiers through `strata serve` on the embedded model: a prompt whose prefix is served
from L1, L2, L3 or nothing answers the same; bad L3 files are counted and recomputed; a
server restarted on the same directory starts warm."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from launch.local import running_server

pytestmark = pytest.mark.slow


def passage(topic: str) -> str:
    return " ".join(
        f"Note {i} about {topic}: the {topic} ledger lists item {i * 7}." for i in range(24)
    )


A, B, C = passage("river"), passage("mountain"), passage("harbor")


def tiers(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=30).json()["radix_cache_stats"]


def ask(url: str, text: str) -> tuple[str, dict]:
    r = httpx.post(
        f"{url}/generate",
        timeout=300,
        json={"text": text, "sampling_params": {"max_new_tokens": 12, "temperature": 0}},
    )
    assert r.status_code == 200, r.text
    return r.json()["text"], r.json()["meta_info"]


def flush(url: str) -> None:
    assert httpx.post(f"{url}/flush_cache", timeout=30).status_code == 200


def served(url: str, text: str) -> tuple[str, dict]:
    """Ask, and say which tier served how many prompt tokens."""
    before = tiers(url)
    out, meta = ask(url, text)
    after = tiers(url)
    by_tier = {t: after[f"{t}_tokens"] - before[f"{t}_tokens"] for t in ("l2", "l3")}
    by_tier["l1"] = meta["cached_tokens"] - by_tier["l2"] - by_tier["l3"]
    own = meta["cached_tokens_by_tier"]  # the request's own account agrees with the server's
    assert {t: own[t] for t in ("l1", "l2", "l3")} == by_tier, (own, by_tier)
    assert own["computed"] == meta["prompt_tokens"] - meta["cached_tokens"]
    return out, by_tier


def store_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.kv"), key=lambda p: p.stat().st_mtime_ns)


def test_same_answer_from_every_tier_and_warm_restart(tmp_path):
    store = tmp_path / "l3"
    flags = (
        "--num-pages",
        "48",
        "--enable-hierarchical-cache",
        "--hicache-storage-backend",
        "file",
        "--hicache-storage-dir",
        str(store),
    )
    with running_server(*flags) as url:
        stats = tiers(url)
        assert stats["l2_hit_rate"] is not None and stats["l3_hit_rate"] is not None
        cold, got = served(url, A)
        assert got == {"l1": 0, "l2": 0, "l3": 0}
        out, got = served(url, A)
        assert out == cold and got["l1"] >= 256 and got["l2"] == got["l3"] == 0
        served(url, B)
        served(url, C)  # A is pushed out of L1 (48 pages hold two of these prompts)
        out, got = served(url, A)
        assert out == cold and got["l2"] >= 256, got
        flush(url)  # drops L1 and L2; the files stay
        out, got = served(url, A)
        assert out == cold and got["l3"] >= 256, got
        stats = tiers(url)
        assert stats["tiers"]["bytes_moved"]["l3_to_l1"] > 0
        assert 0 < stats["l3_hit_rate"] < 1 and stats["tiers"]["l3"]["pages"] >= 3 * 16
    with running_server(*flags) as url:  # a restart on the same directory starts warm
        out, got = served(url, A)
        assert out == cold and got["l3"] >= 256, got


def test_corrupt_and_truncated_files_are_counted_and_recomputed(tmp_path):
    store = tmp_path / "l3"
    flags = (
        "--enable-hierarchical-cache",
        "--hicache-storage-backend",
        "file",
        "--hicache-storage-dir",
        str(store),
    )
    with running_server(*flags) as url:
        cold, _ = served(url, A)
        files = store_files(store)  # in page order: only A was ever stored here
        assert len(files) >= 16

        def flip_byte(path):  # one byte of the payload
            with open(path, "r+b") as f:
                f.seek(-100, os.SEEK_END)
                byte = f.read(1)
                f.seek(-100, os.SEEK_END)
                f.write(bytes([byte[0] ^ 0x55]))

        def cut_tail(path):
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size // 2)

        # One bad file per pass: the readers work in parallel, so a later bad file
        # in the same load may or may not be read before the first one stops it.
        for spoil, page, bad_files in ((flip_byte, 4, 1), (cut_tail, 8, 2)):
            spoil(files[page])
            flush(url)
            out, got = served(url, A)
            assert out == cold, "a bad page file changed the answer"
            assert got["l3"] == page * 16, got  # up to the bad file, the rest recomputed
            assert tiers(url)["tiers"]["l3"]["bad_files"] == bad_files
        flush(url)
        out, got = served(url, A)  # the bad files were replaced when recomputed
        assert out == cold and got["l3"] >= 256, got
