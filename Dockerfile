# imgrepo in a container, built in two stages: the compiler and headers pyfuse3 needs stay
# in the build stage; the final image has Python, the FUSE 3 library and tools, and the venv.
#
#   docker build -t imgrepo .
#   mkdir -p /srv/imgrepo/photos              # on the host: where the mount will show
#   mount --bind /srv/imgrepo /srv/imgrepo && mount --make-rshared /srv/imgrepo
#   docker run -d --name photos --device /dev/fuse --cap-add SYS_ADMIN \
#       --security-opt apparmor=unconfined \
#       -e IMGREPO_STORAGE=s3://bucket/photos -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY \
#       -v imgrepo-cache:/root/.cache/imgrepo \
#       -v /srv/imgrepo:/mnt/imgrepo:rshared \
#       imgrepo
#
# - /dev/fuse and SYS_ADMIN: FUSE mounts from inside a container need both (AppArmor, on
#   Ubuntu hosts, refuses the mount unless unconfined).
# - Seeing the mount on the host: the container mounts on /mnt/imgrepo/photos, a folder
#   inside the bind (the bind's own target is a mount point already, which imgrepo-mount
#   refuses). The bind needs `rshared` propagation, and the host folder must itself be on a
#   shared mount (the two `mount` lines above; `findmnt -o TARGET,PROPAGATION /srv/imgrepo`
#   tells), else the mount stays inside the container. The host then sees the photos at
#   /srv/imgrepo/photos; other containers with `-v /srv/imgrepo:/photos:rslave`.
# - The cache volume keeps what is not uploaded yet: `docker stop` unmounts at once (SIGTERM)
#   and those files go at the next start. `docker exec photos imgrepo-mount --unmount
#   /mnt/imgrepo/photos` first waits until every closed file is in the bucket.
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
# stage, so the copied venv runs as it is; libjemalloc2 is the mount's allocator (it gives a
# walk's memory back once idle: fsrepo/allocator.py).
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 python3 ca-certificates libjemalloc2 \
    && rm -rf /var/lib/apt/lists/*

COPY --from=build /opt/imgrepo/.venv /opt/imgrepo/.venv
ENV PATH=/opt/imgrepo/.venv/bin:$PATH
ENTRYPOINT ["imgrepo-mount"]
CMD ["/mnt/imgrepo/photos", "--foreground"]
