"""imgrepo: a deduplicated file repository in S3 (or a local folder), mounted as a folder."""

from importlib.metadata import PackageNotFoundError, version

try:  # pyproject.toml is the one place the version is written
    __version__ = version("imgrepo")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown (not installed)"
