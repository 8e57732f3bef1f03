"""node/store/objects.py against a real S3 server (SeaweedFS on loopback, tests/seaweed.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.errors import ConfigError
from node.settings import ObjectStoreSettings, load_settings
from node.store.objects import ObjectCache, ObjectMissing, ObjectStore, ObjectStoreError
from tests.seaweed import SECRET_KEY, SeaweedFS


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("seaweed"))
    yield server
    server.stop()


@pytest.fixture
def store(seaweed: SeaweedFS, request: pytest.FixtureRequest) -> Iterator[ObjectStore]:
    s = ObjectStore(ObjectStoreSettings(**seaweed.settings(prefix=f"{request.node.name}/")))  # type: ignore[arg-type]
    yield s
    s.close()


def test_put_get_exists_delete_round_trip(store: ObjectStore, seaweed: SeaweedFS, tmp_path: Path) -> None:
    src = tmp_path / "a.dcm"
    src.write_bytes(os.urandom(300_000))
    store.check()
    store.put("spool/1/2/a.dcm", src)
    assert store.exists("spool/1/2/a.dcm")
    assert seaweed.keys(store.key("")) == [store.key("spool/1/2/a.dcm")]  # under the prefix
    got = tmp_path / "out" / "a.dcm"
    assert store.get("spool/1/2/a.dcm", got) == 300_000
    assert got.read_bytes() == src.read_bytes()
    assert not list(got.parent.glob(".*part"))  # no partial file left beside it
    store.delete("spool/1/2/a.dcm")
    assert not store.exists("spool/1/2/a.dcm")
    store.delete("spool/1/2/a.dcm")  # already gone: no error


def test_parallel_transfers(store: ObjectStore, tmp_path: Path) -> None:
    files = []
    for i in range(20):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(bytes([i]) * (1000 + i))
        files.append((f"outbox/7/{i}.bin", p))
    store.put_many(files)
    back = [(name, tmp_path / "back" / Path(name).name) for name, _ in files]
    assert store.get_many(back) == sum(1000 + i for i in range(20))
    assert all((tmp_path / "back" / f"{i}.bin").read_bytes() == bytes([i]) * (1000 + i) for i in range(20))
    store.delete_many(name for name, _ in files)
    assert not any(store.exists(name) for name, _ in files)


def test_a_missing_key_is_named(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectMissing, match="no object 'test_a_missing_key_is_named/spool/nope.dcm'"):
        store.get("spool/nope.dcm", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert not store.exists("spool/nope.dcm")


def test_refused_credentials_are_a_clear_error_not_retried(seaweed: SeaweedFS, tmp_path: Path) -> None:
    bad = ObjectStore(ObjectStoreSettings(**{**seaweed.settings(), "secret_key": "wrong"}))  # type: ignore[arg-type]
    try:
        with pytest.raises(ObjectStoreError, match="refused the credentials .*check storage.object_store"):
            bad.check()
        src = tmp_path / "f"
        src.write_bytes(b"x")
        with pytest.raises(ObjectStoreError, match="refused the credentials") as caught:
            bad.put("k", src)
        assert "wrong" not in str(caught.value) and SECRET_KEY not in str(caught.value)
    finally:
        bad.close()


def test_a_missing_bucket_is_named(seaweed: SeaweedFS) -> None:
    other = ObjectStore(ObjectStoreSettings(**{**seaweed.settings(), "bucket": "no-such-bucket"}))  # type: ignore[arg-type]
    try:
        with pytest.raises(ObjectStoreError, match="no bucket 'no-such-bucket'"):
            other.check()
    finally:
        other.close()


def test_cache_fetches_once_and_trims_oldest_first(store: ObjectStore, tmp_path: Path) -> None:
    for i in range(4):
        store.put_bytes(f"spool/s/{i}.dcm", bytes(1000))
    cache = ObjectCache(store, tmp_path / "cache", max_bytes=2500)
    paths = cache.ensure([f"spool/s/{i}.dcm" for i in range(4)])
    assert all(p.stat().st_size == 1000 for p in paths.values())
    os.utime(paths["spool/s/0.dcm"], (1, 1))
    os.utime(paths["spool/s/1.dcm"], (2, 2))
    assert cache.trim() == 2000
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.dcm")) == ["2.dcm", "3.dcm"]
    store.delete("spool/s/3.dcm")
    assert cache.ensure(["spool/s/3.dcm"])["spool/s/3.dcm"].is_file()  # cached: not fetched again


def test_settings_keys_from_files_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ak").write_text("AK\n")
    (tmp_path / "sk").write_text("SK\n")
    s = ObjectStoreSettings(bucket="b-1", access_key_file=tmp_path / "ak", secret_key_file=tmp_path / "sk")
    assert (s.access_key.get_secret_value(), s.secret_key.get_secret_value()) == ("AK", "SK")  # type: ignore[union-attr]
    assert "SK" not in repr(s)
    monkeypatch.setenv("NODE_STORAGE__OBJECT_STORE__SECRET_KEY", "from-env")
    loaded = load_settings(None, storage={"object_store": {"bucket": "pacs", "access_key": "AK"}})
    assert loaded.storage.object_store.secret_key.get_secret_value() == "from-env"  # type: ignore[union-attr]
    monkeypatch.delenv("NODE_STORAGE__OBJECT_STORE__SECRET_KEY")
    with pytest.raises(ConfigError, match="access_key and secret_key go together"):
        load_settings(None, storage={"object_store": {"bucket": "pacs", "access_key": "AK"}})
    with pytest.raises(ConfigError, match="secret_key_file .*nope"):
        load_settings(
            None,
            storage={
                "object_store": {
                    "bucket": "pacs",
                    "access_key": "A",
                    "secret_key_file": str(tmp_path / "nope"),
                }
            },
        )
