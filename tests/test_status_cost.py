"""`--status` costs nothing at any size (issue 14): it reads no manifest, before or after a
full `--sync`, whose totals it shows instead of walking the tree."""

from __future__ import annotations

from pathlib import Path

from .mountutil import run_cli

FOLDERS = 40


def manifest_requests(proxy) -> list:  # noqa: ANN001
    return [r for r in proxy.requests if "/dirs/" in r.path]


def test_status_reads_no_manifest_and_shows_the_last_full_syncs_totals(
        s3_bucket, s3_proxy, mounter):
    writer = mounter(s3_bucket.url, endpoint_url=s3_bucket.endpoint_url, name="writer")
    for d in range(FOLDERS):
        folder = Path(writer.path) / f"y{d // 10}" / f"m{d % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "photo.jpg").write_bytes(b"%d" % (d % 7))
    writer.unmount()

    m = mounter(s3_bucket.url, "--refresh", "3600", endpoint_url=s3_proxy.url)
    s3_proxy.reset_counts()
    st = m.status()
    assert "repository_files" not in st
    assert "not counted yet" in run_cli(["--status", str(m.path)], m.env).stdout
    assert manifest_requests(s3_proxy) == []

    run_cli(["--sync", str(m.path)], m.env)
    s3_proxy.reset_counts()
    st = m.status()
    assert st["repository_files"] == FOLDERS
    assert st["repository_bytes"] == sum(len(b"%d" % (d % 7)) for d in range(FOLDERS))
    assert st["repository_unique_bytes"] == 7
    assert st["repository_counted_at"] > 0
    assert "as counted by the last full --sync" in run_cli(["--status", str(m.path)],
                                                           m.env).stdout
    assert manifest_requests(s3_proxy) == []

    # The totals survive a remount (kept in the local state), still without a walk.
    m.unmount()
    again = mounter(s3_bucket.url, "--refresh", "3600", endpoint_url=s3_proxy.url,
                    cache_dir=m.cache_dir)
    s3_proxy.reset_counts()
    assert again.status()["repository_files"] == FOLDERS
    assert manifest_requests(s3_proxy) == []
