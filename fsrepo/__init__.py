"""imgrepo: a deduplicated file repository in S3 (or a local folder), mounted as a folder."""

__version__ = "0.1.0"
