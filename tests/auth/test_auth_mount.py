"""Device-flow login through a REAL mount: `imgrepo-mount` in a subprocess, with no static
AWS keys, gets its S3 credentials only from the login (web identity via STS), through the
"AWS edge" of auth_harness that makes those credentials expire within seconds and checks
every ID token the way AWS does.

1. Writing and reading files keeps working across several credential and ID-token
   expiries; `--status --wait` returns and the bucket (read from moto directly) holds
   every file.
2. When the login is revoked while mounted: a file written afterwards stays queued, the
   status says a login is required, cached files stay readable; after a new login the
   queued upload drains without a remount.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import boto3
from auth_harness import login, wait_until

from fsrepo.manifest import FileEntry, parse_manifest
from fsrepo.repository import blob_key, manifest_key

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mountutil import run_cli  # noqa: E402

BUCKET = "imgrepo-auth-mount"
PREFIX = "repo"
_STATIC_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def admin_s3(auth_moto):
    """Straight to moto, past the edge: how the test looks at the bucket."""
    return boto3.client("s3", endpoint_url=auth_moto.url, region_name="us-east-1",
                        aws_access_key_id="admin", aws_secret_access_key="admin")


def bucket_files(s3) -> dict[bytes, bytes]:
    """The root directory as committed to the bucket: name -> content."""
    try:
        raw = s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{manifest_key('root')}")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return {}
    manifest, _ = parse_manifest(raw, "root")
    out = {}
    for name, entry in manifest.entries.items():
        if isinstance(entry, FileEntry):
            key = f"{PREFIX}/{blob_key(entry.sha256)}"
            out[name] = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return out


def web_identity_mount(mounter, edge, settings, store):
    """The mount process environment: the login's home, STS at the edge, no static keys."""
    env = mounter.env
    for var in _STATIC_KEYS:
        env.pop(var, None)
    env["AWS_ENDPOINT_URL_STS"] = edge.url
    # the mount finds the login where --login stored it
    assert store.path.is_relative_to(Path(env["XDG_CONFIG_HOME"])), (store.path, env)
    return mounter(f"s3://{BUCKET}/{PREFIX}", endpoint_url=edge.url)


def body(i: int) -> bytes:
    return f"photo {i}\n".encode() * (200 + i)


def test_mount_with_login_survives_expiries_and_resumes_after_relogin(
    settings, store, oidc, auth_moto, edge, mounter
):
    s3 = admin_s3(auth_moto)
    s3.create_bucket(Bucket=BUCKET)
    oidc.configure(ttl={"IdToken": 4, "AccessToken": 4})
    code, _ = login(settings, store, oidc)
    assert code == 0

    m = web_identity_mount(mounter, edge, settings, store)
    st = m.status()
    assert st["credentials"] is not None, "the mount does not run the token refresher"
    assert st["credentials"]["status"] == "ok", st["credentials"]

    # 1. Several expiries: credentials usable 1.5 s (+1 s grace), ID tokens live 4 s.
    written: dict[bytes, bytes] = {}
    sts_before = len(edge.record.sts)
    start, i = time.time(), 0
    while time.time() - start < 10:
        name = f"p{i}.jpg"
        (m.path / name).write_bytes(body(i))
        written[name.encode()] = body(i)
        assert (m.path / name).read_bytes() == body(i)
        if i % 5 == 4:  # wait until the bucket has caught up, then go on writing
            assert wait_until(lambda: m.status()["pending_ops"] == 0, 20), m.status()
        i += 1
    for name in written:  # read everything again, well after most were written
        assert (m.path / name.decode()).read_bytes() == written[name]
    final = m.wait_idle(timeout=60)
    assert final["pending_ops"] == 0 and not final["login_required"], final
    assert final["credentials"]["status"] == "ok", final["credentials"]
    calls = edge.record.sts[sts_before:]
    assert len(calls) >= 4, calls  # botocore in the mount assumed the role again and again
    assert all(c.ok for c in calls), calls
    assert len({c.token_sha for c in calls}) >= 2  # ... with ID tokens the mount refreshed
    assert edge.record.s3_rejected == 0  # never used an expired key
    assert oidc.stats()["token"]["refresh_token:ok"] >= 2
    assert bucket_files(s3) == written

    # 2. The login is revoked while mounted.
    with store.locked():
        oidc.revoke(json.loads(store.path.read_text())["refresh_token"])
    assert wait_until(lambda: m.status()["credentials"]["login_required"], 10), m.status()
    # The last ID token and the credentials it gave stay good for a few more seconds:
    # wait until both have run out (STS refuses the token, S3 the last keys).
    expires_at = m.status()["credentials"]["id_token_expires_at"]
    assert wait_until(lambda: time.time() > expires_at + edge.usable + edge.grace + 0.2, 10)
    late = b"written after the login was revoked\n" * 50
    (m.path / "late.jpg").write_bytes(late)
    # the credentials run out: the upload fails, stays queued, the status says why
    assert wait_until(lambda: m.status()["login_required"], 20), (m.status(), m.logtext()[-3000:])
    st = m.status()
    assert st["pending_ops"] >= 1, st
    assert "login" in st["credentials"]["message"], st["credentials"]
    status_text = run_cli(["--status", str(m.path)], m.env).stdout
    assert "--login" in status_text, status_text
    assert "login required" in m.logtext() and "imgrepo-mount --login" in m.logtext()
    assert "Traceback" not in m.logtext()  # one clear line per failure, in the log too
    # cached files stay readable, the late one too
    for name in list(written)[:5]:
        assert (m.path / name.decode()).read_bytes() == written[name]
    assert (m.path / "late.jpg").read_bytes() == late
    assert b"late.jpg" not in bucket_files(s3)  # nothing went through
    assert edge.record.s3_rejected >= 1
    assert any(not c.ok and c.error == "ExpiredTokenException" for c in edge.record.sts)

    # 3. A new login (what `imgrepo-mount --login` does): the queue drains, no remount.
    code, _ = login(settings, store, oidc)
    assert code == 0
    final = m.wait_idle(timeout=60)
    assert final["pending_ops"] == 0 and not final["login_required"], final
    assert final["pid"] == st["pid"]
    assert wait_until(lambda: m.status()["credentials"]["status"] == "ok", 10)
    written[b"late.jpg"] = late
    assert bucket_files(s3) == written
    (m.path / "after.jpg").write_bytes(b"after\n")  # and it keeps working
    m.wait_idle(timeout=30)
    assert bucket_files(s3)[b"after.jpg"] == b"after\n"
    m.unmount()
