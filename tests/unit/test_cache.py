import pytest

from pvlab import cache

pytestmark = pytest.mark.unit


def test_a_new_entry_removes_the_ones_it_supersedes_and_nothing_else(tmp_path):
    old_box = tmp_path / "debian12-aaaa.box"
    current = tmp_path / "debian12-bbbb.box"
    for path in (old_box, tmp_path / "debian12-aaaa.box.sha256", current,
                 tmp_path / "debian12-bbbb.box.sha256", tmp_path / "other.box"):
        path.write_text("x")
    old_build = tmp_path / "xen-4.17-gdbsx-1111"
    old_build.mkdir()
    (old_build / "xen.gz").write_text("x")
    (tmp_path / ".debian12-cccc.box.tmp").write_text("being built")

    removed = cache.prune_superseded(current, "debian12-*")

    assert sorted(p.name for p in removed) == [
        "debian12-aaaa.box", "debian12-aaaa.box.sha256"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".debian12-cccc.box.tmp", "debian12-bbbb.box", "debian12-bbbb.box.sha256",
        "other.box", "xen-4.17-gdbsx-1111",
    ]
    assert cache.prune_superseded(tmp_path / "xen-4.17-gdbsx-2222",
                                  "xen-4.17-gdbsx-*") == [old_build]
    assert not old_build.exists()
