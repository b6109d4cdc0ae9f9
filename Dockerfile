# imgrepo in a container. FUSE needs the host's /dev/fuse and the SYS_ADMIN capability:
#   docker build -t imgrepo .
#   docker run --rm -it --device /dev/fuse --cap-add SYS_ADMIN \
#       -e IMGREPO_STORAGE=s3://bucket/photos -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY \
#       imgrepo /mnt/repo --foreground
FROM debian:12-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        fuse3 libfuse3-dev pkg-config gcc python3 python3-dev python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/imgrepo
COPY pyproject.toml README.md ./
COPY fsrepo ./fsrepo
RUN python3 -m venv /opt/imgrepo/.venv \
    && /opt/imgrepo/.venv/bin/pip install --no-cache-dir . \
    && mkdir -p /mnt/repo

ENV PATH=/opt/imgrepo/.venv/bin:$PATH
ENTRYPOINT ["imgrepo-mount"]
CMD ["/mnt/repo", "--foreground"]
