"""The results: medians over the rounds, ratios imgrepo / peer, the targets, printed as
tables and returned as the JSON document the run writes."""

from __future__ import annotations

import statistics
from typing import Any

from .host import MiB
from .metrics import METRIC_INFO, METRICS, PEERS, WORKLOADS
from .workloads import Bench


def median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None



def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def best(medians: dict[str, dict[str, float | None]], key: str, tools: list[str]
         ) -> tuple[str, float] | None:
    higher = METRIC_INFO[key][4]
    vals = [(t, medians[t][key]) for t in tools if t in medians and medians[t].get(key)
            is not None]
    if not vals:
        return None
    return (max if higher else min)(vals, key=lambda tv: tv[1])  # type: ignore[arg-type,return-value]


def evaluate_targets(med: dict[str, dict[str, float | None]], data_mib: float,
                     rtt_ms: float = 0.0) -> list[dict]:
    """The issues' targets, each as imgrepo's figure against the peer's (the ones with a
    figure for this round-trip time). Where two bars are given for one target ("2 x
    rclone, or 90 % of fusepass where that is lower"), both lines are shown."""
    img = med.get("imgrepo", {})
    rclones = ["rclone-writes", "rclone-full"]
    out: list[dict] = []

    def target(label: str, key: str, peers: list[str], factor: float) -> None:
        got = img.get(key)
        ref = best(med, key, peers)
        if got is None or ref is None:
            return
        higher = METRIC_INFO[key][4]
        need = ref[1] * factor
        ok = got >= need if higher else got <= need
        out.append({"target": label, "metric": key, "imgrepo": got, "peer": ref[0],
                    "peer_value": ref[1], "needed": need, "ok": ok})

    # Issue 16's table (0 ms and 20 ms columns) and issue 17's large-file targets.
    far = rtt_ms > 0
    target("W1 files/s until cp returns >= 2 x rclone-writes", "w1_cp_files_s",
           ["rclone-writes"], 2)
    target("W1 files/s until cp returns >= 90% of fusepass", "w1_cp_files_s", ["fusepass"], 0.9)
    if far:
        target("W1 files/s until durable >= 2 x best peer", "w1_durable_files_s", PEERS, 2)
    else:
        target("W1 files/s until durable >= 2 x rclone", "w1_durable_files_s", rclones, 2)
    target("W6 duplicate copy time <= 1/5 of best peer", "w6_durable_s", PEERS, 0.2)
    target(f"W3 cold small files/s >= {4 if far else 1.5} x best peer",
           "w3_cold_small_files_s", PEERS, 4 if far else 1.5)
    target("W5 ls -l cold <= 1/4 of best peer", "w5_ls_cold_s", PEERS, 0.25)
    if not far:
        target("W5 ls -l warm <= 1.5 x the local folder", "w5_ls_warm_s", ["local"], 1.5)
        target("W2 MB/s until close >= rclone-writes", "w2_close_mb_s", ["rclone-writes"], 1)
        target("W2 MB/s until close >= 90% of fusepass", "w2_close_mb_s", ["fusepass"], 0.9)
        target("W8 SQLite commits/s >= 1/3 of the local disk", "w8_sqlite_commits_s",
               ["local"], 1 / 3)
    target("W2 MB/s until durable >= s3fs", "w2_durable_mb_s", ["s3fs"], 1)
    target("W2 MB/s until durable >= 2 x rclone", "w2_durable_mb_s", rclones, 2)
    target("W3 cold 1 GiB read >= 1.5 x s3fs", "w3_cold_big_mb_s", ["s3fs"], 1.5)
    sent = img.get("w6_sent_mib")
    if sent is not None:
        limit = max(1.0, data_mib * 0.01)
        out.append({"target": "W6 duplicate copy uploads ~0 bytes (<= 1% of the data)",
                    "metric": "w6_sent_mib", "imgrepo": sent, "peer": None,
                    "peer_value": None, "needed": limit, "ok": sent <= limit})
    rss = img.get("w7_peak_rss_mib")
    if rss is not None:
        out.append({"target": "W7 peak RSS during W2 <= 150 MiB", "metric": "w7_peak_rss_mib",
                    "imgrepo": rss, "peer": None, "peer_value": None, "needed": 150.0,
                    "ok": rss <= 150})
    return out


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(lines)


def relay_line(bench: Bench) -> str:
    """The report's header line on the way to the server: the round trip the relay adds and
    the CPU the relay itself spent (it shares the server's core)."""
    if bench.server is None:
        return "Server: none (no tool used one)"
    rtt = bench.server.rtt_ms
    added = f"{rtt:g} ms added by the relay" if rtt > 0 else "loopback, nothing added"
    cpu = ", ".join(f"{t} {fmt(median(v))} s" for t, v in bench.relay_cpu.items())
    return f"Round trip to the server: {added}; the relay's CPU per round: {cpu or '-'}"


def report(bench: Bench, config: dict[str, Any], elapsed: float) -> dict[str, Any]:
    tools = [t for t in bench.tools if t in bench.results]
    med: dict[str, dict[str, float | None]] = {
        t: {k: median(bench.results[t].get(k, [])) for k, *_ in METRICS} for t in tools}
    rows = []
    for key, _w, label, unit, higher in METRICS:
        rows.append([f"{label} ({unit}, {'higher' if higher else 'lower'} is better)"] +
                    [fmt(med[t][key]) for t in tools])
    out_text = ["", relay_line(bench), f"Medians of {bench.sizes.rounds} round(s):",
                table(["metric", *tools], rows)]
    ratios: dict[str, dict[str, float | None]] = {}
    peers = [t for t in tools if t != "imgrepo"]
    if "imgrepo" in med and peers:
        rrows = []
        for key, _w, label, _unit, higher in METRICS:
            rrows.append([f"{label} ({'>1' if higher else '<1'} is better)"] +
                         [fmt(ratio(med["imgrepo"][key], med[p][key])) for p in peers])
            for p in peers:
                ratios.setdefault(p, {})[key] = ratio(med["imgrepo"][key], med[p][key])
        out_text += ["", "Ratios imgrepo / peer:", table(["metric", *peers], rrows)]
    data_mib = sum(bench.data.names.values()) / MiB if bench.data else 0.0
    targets = evaluate_targets(med, data_mib,
                               bench.server.rtt_ms if bench.server else 0.0)
    if targets:
        trows = [[t["target"], fmt(t["imgrepo"]),
                  f"{t['peer']} {fmt(t['peer_value'])}" if t["peer"] else "-",
                  fmt(t["needed"]), "ok" if t["ok"] else "MISSED"] for t in targets]
        out_text += ["", "Targets:", table(["target", "imgrepo", "peer", "needed", ""], trows)]
    for tool, errs in bench.errors.items():
        for e in errs:
            out_text.append(f"error: {tool}: {e}")
    out_text.append(f"\n(total time {elapsed:.0f} s)")
    print("\n".join(out_text), flush=True)
    return {
        "config": config,
        "relay": {"rtt_ms": bench.server.rtt_ms if bench.server else None,
                  "cpu_s": bench.relay_cpu},
        "workloads": {w: [k for k, wl, *_ in METRICS if wl == w] for w in WORKLOADS},
        "metrics": {k: {"workload": w, "label": label, "unit": unit,
                        "higher_is_better": higher} for k, w, label, unit, higher in METRICS},
        "medians": med,
        "rounds": {t: bench.results[t] for t in tools},
        "ratios_imgrepo_over": ratios,
        "targets": targets,
        "errors": bench.errors,
        "elapsed_s": elapsed,
    }
