# imgrepo in a container, built in two stages: the compiler and headers pyfuse3 needs stay
# in the build stage; the final image has Python, the FUSE 3 library and tools, and the venv.
#
#   docker build -t imgrepo .
#   docker run -d --name photos --device /dev/fuse --cap-add SYS_ADMIN \
#       --security-opt apparmor=unconfined \
#       -e IMGREPO_STORAGE=s3://bucket/photos -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY \
#       -v imgrepo-cache:/root/.cache/imgrepo \
#       -v /mnt/photos:/mnt/repo:rshared \
#       imgrepo
#
# - /dev/fuse and SYS_ADMIN: FUSE mounts from inside a container need both (AppArmor, on
#   Ubuntu hosts, refuses the mount unless unconfined).
# - The cache volume keeps what is not uploaded yet: `docker stop` unmounts at once (SIGTERM)
#   and those files go at the next start. `docker exec photos imgrepo-mount --unmount
#   /mnt/repo` first waits until every closed file is in the bucket.
# - Seeing the mount on the host: the bind needs `rshared` propagation, and the host folder
#   must itself be on a shared mount, else the mount stays inside the container:
#       mkdir -p /mnt/photos
#       mount --bind /mnt/photos /mnt/photos && mount --make-rshared /mnt/photos
#   (systemd hosts mount / shared already; `findmnt -o TARGET,PROPAGATION /mnt/photos`
#   tells). Other containers see it with `-v /mnt/photos:/photos:rslave`.
FROM debian:12-slim AS build

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        libfuse3-dev pkg-config gcc python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/imgrepo
COPY pyproject.toml README.md ./
COPY fsrepo ./fsrepo
RUN python3 -m venv /opt/imgrepo/.venv \
    && /opt/imgrepo/.venv/bin/pip install --no-cache-dir .

FROM debian:12-slim

# fuse3 brings libfuse3 (which pyfuse3 links) and fusermount3; the same python3 as the build
# stage, so the copied venv runs as it is.
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /mnt/repo

COPY --from=build /opt/imgrepo/.venv /opt/imgrepo/.venv
ENV PATH=/opt/imgrepo/.venv/bin:$PATH
ENTRYPOINT ["imgrepo-mount"]
CMD ["/mnt/repo", "--foreground"]
