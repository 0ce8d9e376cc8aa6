"""Safe unpacking: hostile members are refused by name and nothing lands outside the target."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from vitpcm.data.archives import extract_archive, is_junk, merge_tree, safe_member_path, unpack
from vitpcm.errors import ArchiveError


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _make_tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            _add_file(tar, name, data)
    return path


def _files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """(target folder, the folder around it): escapes would land in the outer one."""
    target = tmp_path / "outer" / "target"
    target.mkdir(parents=True)
    return target, tmp_path / "outer"


def test_tar_unpacks_and_skips_macos_junk(tmp_path: Path, sandbox: tuple[Path, Path]) -> None:
    target, _ = sandbox
    archive = _make_tar(
        tmp_path / "a.tar",
        [
            ("./top/a.txt", b"alpha"),
            ("top/sub/b.bin", b"\x00\x01"),
            ("__MACOSX/top/._a.txt", b"junk"),
            ("top/._b.bin", b"junk"),
            ("top/.DS_Store", b"junk"),
        ],
    )
    assert extract_archive(archive, target, progress=False) == 2
    assert _files_under(target) == {"top/a.txt", "top/sub/b.bin"}
    assert (target / "top/a.txt").read_bytes() == b"alpha"
    # The staging folder is gone.
    assert [p.name for p in target.iterdir()] == ["top"]


def test_compressed_tar_and_zip(tmp_path: Path, sandbox: tuple[Path, Path]) -> None:
    target, _ = sandbox
    _make_tar(tmp_path / "a.tar.gz", [("x/1.txt", b"one")], mode="w:gz")
    with zipfile.ZipFile(tmp_path / "b.zip", "w") as zf:
        zf.writestr("y/2.txt", b"two")
        zf.writestr("y/", b"")
        zf.writestr("__MACOSX/y/._2.txt", b"junk")
    extract_archive(tmp_path / "a.tar.gz", target, progress=True)
    extract_archive(tmp_path / "b.zip", target, progress=False)
    assert _files_under(target) == {"x/1.txt", "y/2.txt"}


@pytest.mark.parametrize("name", ["../evil.txt", "top/../../evil.txt", "..\\evil.txt"])
def test_tar_parent_escape_refused(tmp_path: Path, sandbox: tuple[Path, Path], name: str) -> None:
    target, outer = sandbox
    archive = _make_tar(tmp_path / "bad.tar", [("ok.txt", b"fine"), (name, b"pwned")])
    with pytest.raises(ArchiveError, match=r"escapes the target folder") as info:
        extract_archive(archive, target, progress=False)
    assert repr(name) in str(info.value)
    assert _files_under(outer) == set()  # neither the escape nor the good member landed


def test_tar_absolute_path_refused(tmp_path: Path, sandbox: tuple[Path, Path]) -> None:
    target, outer = sandbox
    evil = outer / "abs_evil.txt"
    archive = _make_tar(tmp_path / "bad.tar", [(str(evil), b"pwned")])
    with pytest.raises(ArchiveError, match="absolute path"):
        extract_archive(archive, target, progress=False)
    assert not evil.exists()
    assert _files_under(outer) == set()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_tar_links_refused(tmp_path: Path, sandbox: tuple[Path, Path], kind: bytes) -> None:
    target, outer = sandbox
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tar:
        _add_file(tar, "data.txt", b"x")
        link = tarfile.TarInfo("escape")
        link.type = kind
        link.linkname = "../../.." if kind == tarfile.SYMTYPE else "data.txt"
        tar.addfile(link)
        _add_file(tar, "escape/evil.txt", b"pwned")
    with pytest.raises(ArchiveError, match=r"link member 'escape'"):
        extract_archive(archive, target, progress=False)
    assert _files_under(outer) == set()
    assert not any(p.is_symlink() for p in outer.rglob("*"))


def test_tar_device_refused(tmp_path: Path, sandbox: tuple[Path, Path]) -> None:
    target, _ = sandbox
    archive = tmp_path / "dev.tar"
    with tarfile.open(archive, "w") as tar:
        dev = tarfile.TarInfo("null")
        dev.type = tarfile.CHRTYPE
        dev.devmajor, dev.devminor = 1, 3
        tar.addfile(dev)
    with pytest.raises(ArchiveError, match=r"special member 'null'"):
        extract_archive(archive, target, progress=False)
    assert not (target / "null").exists()


def test_zip_escape_and_symlink_refused(tmp_path: Path, sandbox: tuple[Path, Path]) -> None:
    target, outer = sandbox
    escape = tmp_path / "escape.zip"
    with zipfile.ZipFile(escape, "w") as zf:
        zf.writestr("../evil.txt", b"pwned")
    with pytest.raises(ArchiveError, match=r"'\.\./evil\.txt'"):
        extract_archive(escape, target, progress=False)

    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("ln")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ArchiveError, match=r"symlink member 'ln'"):
        extract_archive(link, target, progress=False)

    device = tmp_path / "device.zip"
    with zipfile.ZipFile(device, "w") as zf:
        info = zipfile.ZipInfo("tty")
        info.external_attr = (stat.S_IFCHR | 0o666) << 16
        zf.writestr(info, b"")
    with pytest.raises(ArchiveError, match=r"special member 'tty'"):
        extract_archive(device, target, progress=False)
    assert _files_under(outer) == set()
    assert not any(p.is_symlink() for p in outer.rglob("*"))


def test_corrupt_and_foreign_files(tmp_path: Path, sandbox: tuple[Path, Path]) -> None:
    target, _ = sandbox
    html = tmp_path / "page.tar"
    html.write_bytes(b"<!DOCTYPE html><html>sign in</html>")
    with pytest.raises(ArchiveError, match="neither a tar nor a zip"):
        unpack(html, target, progress=False)

    good = _make_tar(tmp_path / "good.tar", [("big.bin", bytes(range(256)) * 400)])
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good.read_bytes()[:50_000])
    with pytest.raises(ArchiveError, match="corrupt or truncated"):
        extract_archive(truncated, target, progress=False)

    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ArchiveError, match=r"bad\.zip"):
        extract_archive(bad_zip, target, progress=False)
    assert list(target.iterdir()) == []


def test_merge_tree_merges_folders_and_replaces_files(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "a/b").mkdir(parents=True)
    (src / "a/b/new.txt").write_text("new")
    (src / "a/same.txt").write_text("replacement")
    (dest / "a/b").mkdir(parents=True)
    (dest / "a/b/old.txt").write_text("old")
    (dest / "a/same.txt").write_text("original")
    merge_tree(src, dest)
    assert _files_under(dest) == {"a/b/new.txt", "a/b/old.txt", "a/same.txt"}
    assert (dest / "a/same.txt").read_text() == "replacement"


def test_name_checks() -> None:
    assert is_junk("__MACOSX/x/y.png")
    assert is_junk("SegmentationClassAug/._2007_000032.png")
    assert not is_junk("SegmentationClassAug/2007_000032.png")
    assert safe_member_path("./a//b/./c", "x.tar").as_posix() == "a/b/c"
    assert safe_member_path("./", "x.tar") is None
    with pytest.raises(ArchiveError, match="absolute"):
        safe_member_path("C:\\Windows\\x", "x.zip")
