"""imgrepo's own benchmark: imgrepo side by side with rclone mount, s3fs and a local folder.

One run starts one S3 server (scripts/s3lite.py, or moto's server mode) on 127.0.0.1, puts a
byte-counting TCP relay in front of it, and mounts every selected tool against it in turn,
round after round (tools interleaved, so machine noise hits them alike). Two references need
no server: the local folder (the disk's limit) and `fusepass` (scripts/fusepass.py, a
pyfuse3 passthrough to a local folder that does nothing else: the limit of any pyfuse3
filesystem on the machine). Workloads, for every tool:

  W1  cp -r of N small random files: files/s until cp returns, and until durable
  W2  one big file written with dd bs=1M: MB/s until close, and until durable
  W3  cold reads (fresh mount, empty cache, dropped page cache) of the big file and the
      small files;  W4  the same again, warm
  W5  ls -l of a directory of 10,000 entries, cold and warm (made beforehand in the
      bucket, in each tool's own format)
  W6  the same small files copied again under another name: time until durable, and
      bytes sent to the server (counted at the relay)
  W7  peak RSS (VmHWM) of the mount process during W2, and its CPU seconds

It prints a table of medians, one of ratios imgrepo/peer and the targets, and writes all
of it (with every round's figures) as JSON. `scripts/bench.sh` installs what it needs and
runs this package (`python -m scripts.bench`) with the project's venv; see README.md,
section "Benchmark".

"Durable" means in the bucket: for imgrepo the mount's own wait request (what
`imgrepo-mount --status --wait` sends); for rclone its `vfs/stats` upload queue (then the
objects are checked in the bucket); for s3fs close() already uploads (checked the same way);
for the local folder and fusepass `sync`.

Modules, one job each: `cli` (options, set-up, the run), `metrics` (what is measured),
`host` (commands, processes, mounts, page cache), `server` (the S3 server behind the relay),
`relay` (the byte-counting relay process), `data` (the workloads' input), `tools` (one
adapter per mounted tool), `workloads` (the rounds and their phases), `profiling` (py-spy
samples with --profile), `report` (medians, ratios, targets, JSON).
"""
