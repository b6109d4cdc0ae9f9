"""imgrepo: a deduplicated file repository in S3 (or a local folder), mounted as a folder."""


def __getattr__(name: str) -> str:
    """`__version__`, looked up when asked: importlib.metadata costs ~50 ms of start-up,
    and `--status` (which must answer within 0.2 s) never needs it."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version
    try:  # pyproject.toml is the one place the version is written
        return version("imgrepo")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"
