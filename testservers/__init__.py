"""Servers on 127.0.0.1 for the test suite and the benchmark, and the network helpers they
share; importable from the repository's root by both (`python -m pytest`, `python -m
scripts.bench`).

- `net`      free ports, waiting until something listens, processes alive or stopped
- `moto`     moto's S3 server as a child process (`MotoServer`), and the benchmark's moto
             with two fixes that make it answer like S3 (`python -m testservers.moto PORT`)
- `s3lite`   a small, fast in-memory S3 server (`python -m testservers.s3lite --port N`)
- `s3proxy`  a reverse HTTP proxy that counts requests and injects faults (`S3Proxy`)
- `tlsfront` TLS in front of one of them, cutting connections without TLS's close

They live outside tests/ because the benchmark runs them too, and outside fsrepo/ because
they are no part of the product.
"""
