"""The command line without a mount: `SOURCE MOUNTPOINT -o OPTIONS` as mount(8) passes it,
--help and --version, the config file --login rewrites, and the systemd notification."""

from __future__ import annotations

import importlib.metadata
import os
import socket
from pathlib import Path

import pytest

from fsrepo.cli import main, take_source
from fsrepo.cli.args import parse_args
from fsrepo.config import load_settings, read_config_file, write_config_values
from fsrepo.errors import ConfigError, ImgrepoError
from fsrepo.logsetup import JournalFormatter
from fsrepo.mount import check_fuse_options
from fsrepo.sdnotify import notify


def _mount_args(*argv: str):  # noqa: ANN202 - argparse.Namespace
    args = parse_args(list(argv))
    take_source(args)
    return args


def test_mount8_form_takes_source_and_options() -> None:
    # What mount.fuse3 runs for an fstab line (it adds rw,dev,suid as root).
    args = _mount_args("s3://bucket/photos", "/mnt/photos", "-o",
                       "rw,dev,suid,cache-dir=/var/cache/imgrepo,cache-size=50G,refresh=2.5,"
                       "endpoint-url=http://127.0.0.1:9000,uploads=3,_netdev,nofail,noauto,"
                       "x-systemd.automount,comment=systemd.x,allow_other,noexec,verbose")
    assert (args.storage, args.mountpoint, args.paths) == ("s3://bucket/photos",
                                                           "/mnt/photos", [])
    assert (args.cache_dir, args.cache_size, args.refresh, args.uploads) == (
        "/var/cache/imgrepo", "50G", 2.5, 3)
    assert args.endpoint_url == "http://127.0.0.1:9000"
    assert args.verbose is True and args.read_only is False
    assert args.fuse_options == {"allow_other", "noexec",  # dev, suid stay off
                                 "fsname=s3://bucket/photos", "subtype=imgrepo-mount"}
    assert "fsname=a\\,b" in _mount_args("a,b", "/mnt").fuse_options  # libfuse's escape


def test_ro_and_read_only_are_one_switch() -> None:
    assert _mount_args("/srv/repo", "/mnt", "-o", "ro").read_only is True
    assert _mount_args("/srv/repo", "/mnt", "-o", "read-only").read_only is True
    assert _mount_args("/mnt", "--read-only").read_only is True
    assert _mount_args("/mnt", "--storage", "/srv/repo").storage == "/srv/repo"  # unchanged


@pytest.mark.parametrize("argv, message", [
    (["/srv/repo", "/mnt", "-o", "bogus"], "unknown mount option 'bogus'"),
    (["/srv/repo", "/mnt", "-o", "cache-size"], "mount option 'cache-size' needs a value"),
    (["/srv/repo", "/mnt", "-o", "refresh=soon"], "mount option refresh='soon'"),
    (["/srv/repo", "/mnt", "-o", "ro=1"], "unknown mount option 'ro'"),
    (["/srv/repo", "/mnt", "-o", "read-only=yes"], "'read-only' takes no value"),
    (["/srv/repo", "/mnt", "-o", "sync"], "'sync' is not supported"),
    (["/srv/repo", "/mnt", "-o", "grace=3"], "unknown mount option 'grace'"),
    (["/srv/repo", "/mnt", "-o", "unmount"], "unknown mount option 'unmount'"),
    (["/srv/repo", "/mnt", "--refresh", "3", "-o", "refresh=4"], "-o refresh disagrees"),
    (["/srv/repo", "/mnt", "--storage", "/other"], "the storage is given twice"),
    (["/srv/repo", "/mnt", "/third"], "unexpected arguments: /mnt /third"),
    (["--status", "/mnt", "-o", "ro"], "-o is for mounting only"),
    (["--status", "--sync", "/mnt"], "--sync and --status cannot be combined"),
])
def test_bad_mount_options_are_one_line(argv: list[str], message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors (usage, then the one line)
        code = exc.code
    assert code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("imgrepo-mount: error: ")
    assert message in err.strip().splitlines()[-1]


def test_help_is_grouped_with_examples_and_version_is_the_packages(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    groups = ["storage and cache (any command)", "mount (the default action)", "status",
              "sync", "maintenance", "login (OpenID Connect device flow)", "examples"]
    positions = [text.index(f"\n{g}:\n") for g in groups]
    assert positions == sorted(positions)
    assert "mount -t fuse.imgrepo-mount" in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == (
        f"imgrepo-mount {importlib.metadata.version('imgrepo')}")


def test_allow_other_needs_root_or_user_allow_other(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    conf = tmp_path / "fuse.conf"
    conf.write_text("# user_allow_other\nmount_max = 1000\n")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ImgrepoError, match=r"-o allow_other needs root, or the line "
                                           r"user_allow_other in .*fuse.conf"):
        check_fuse_options({"allow_other", "noexec"}, conf)
    check_fuse_options({"noexec"}, conf)  # nothing asked that needs it
    conf.write_text("user_allow_other\n")
    check_fuse_options({"allow_other"}, conf)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    check_fuse_options({"allow_other"}, tmp_path / "missing.conf")


CONFIG = """\
# my photos
[imgrepo]
storage = "s3://bucket/photos"  # the family bucket
cache_dir = "/var/cache/imgrepo"
client-id = "old"

# the login, once
"""


def test_login_rewrite_keeps_comments_tables_and_spelling(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    path.chmod(0o640)
    write_config_values(path, {"issuer": "https://login.example.com", "client_id": "imgrepo",
                               "role_arn": None, "scope": "openid offline_access"})
    text = path.read_text()
    for kept in ("# my photos", "[imgrepo]", "# the family bucket", "# the login, once",
                 'cache_dir = "/var/cache/imgrepo"'):
        assert kept in text
    assert 'client-id = "imgrepo"' in text and "old" not in text
    assert read_config_file(path) == {
        "storage": "s3://bucket/photos", "cache_root": "/var/cache/imgrepo",
        "client_id": "imgrepo", "issuer": "https://login.example.com",
        "scope": "openid offline_access"}
    assert path.stat().st_mode & 0o777 == 0o640
    settings = load_settings(config_file=path)
    assert (settings.issuer, settings.client_id) == ("https://login.example.com", "imgrepo")


def test_login_rewrite_refuses_what_it_cannot_write_back(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    with pytest.raises(ConfigError, match="client-id .* contains control characters"):
        write_config_values(path, {"client_id": "two\nlines"})
    assert path.read_text() == CONFIG
    path.write_text(CONFIG + "storage = \n")  # broken by hand: not rewritten
    with pytest.raises(ConfigError, match="cannot read config file"):
        write_config_values(path, {"client_id": "x"})
    assert path.read_text() == CONFIG + "storage = \n"
    fresh = tmp_path / "new" / "config.toml"
    write_config_values(fresh, {"issuer": "https://login.example.com"})
    assert fresh.read_text().startswith("# imgrepo settings")
    assert read_config_file(fresh) == {"issuer": "https://login.example.com"}


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_sends_one_datagram_to_notify_socket(abstract: bool, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if abstract:
            name = f"imgrepo-test-{os.getpid()}-{tmp_path.name}"
            sock.bind("\0" + name)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        else:
            sock.bind(str(tmp_path / "notify"))
            monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        sock.settimeout(30)
        assert notify("READY=1")
        assert sock.recv(256) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify("READY=1")


def test_journal_lines_carry_priority_and_no_timestamp() -> None:
    import logging
    record = logging.LogRecord("fsrepo.mount", logging.WARNING, __file__, 1,
                               "two\nlines %s", ("here",), None)
    assert JournalFormatter().format(record) == "<4>fsrepo.mount: two\n<4>lines here"
