"""The package's import graph, checked against its layers: no cycle, no upward import.

Each module of `fsrepo` belongs to one layer (docs/design.md, "Layers"); a module may import
from its own layer and the layers below, never from a layer above. Imports inside functions
count too (a lazy import is still a dependency). Run from the repository root:

    python scripts/imports.py          # exit status 1, with the offending edges, on a breach
    python scripts/imports.py --graph  # also print every module's imports
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

# Bottom to top. A module not listed falls back to its package's entry ("fsrepo.store").
LAYERS: list[tuple[str, list[str]]] = [
    ("format and shared vocabulary", [
        "fsrepo", "fsrepo.manifest", "fsrepo.errors", "fsrepo.retry",
        "fsrepo.hashing", "fsrepo.units", "fsrepo.config", "fsrepo.logsetup", "fsrepo.processes",
        "fsrepo.auth.redact", "fsrepo.sdnotify", "fsrepo.nodump", "fsrepo.fdlimit",
        "fsrepo.snapshot_policy",
        "fsrepo.blobset", "fsrepo.heap", "fsrepo.allocator"]),
    ("local state and storage", [
        "fsrepo.store", "fsrepo.repository", "fsrepo.state", "fsrepo.stateschema", "fsrepo.workers",
        "fsrepo.closed_log",
        "fsrepo.connectivity", "fsrepo.endpoint_check", "fsrepo.writemode", "fsrepo.lease", "fsrepo.serverprobe",
        "fsrepo.blobcache", "fsrepo.cache_index", "fsrepo.chunking", "fsrepo.dir_listing",
        "fsrepo.snapshots",
        "fsrepo.snapshot_diff"]),
    ("core: files and names", [
        "fsrepo.merge", "fsrepo.journal", "fsrepo.inodes", "fsrepo.paths", "fsrepo.announce",
        "fsrepo.dirviews", "fsrepo.namespace", "fsrepo.blank_files", "fsrepo.staging",
        "fsrepo.handles",
        "fsrepo.reads", "fsrepo.folder_readahead", "fsrepo.commit", "fsrepo.files", "fsrepo.merge_record",
        "fsrepo.group_commit", "fsrepo.prefetch", "fsrepo.snapshot_views",
        "fsrepo.tree_walk"]),
    ("uploads, downloads and local tools", [
        "fsrepo.uploader", "fsrepo.upload_schedule", "fsrepo.blob_upload",
        "fsrepo.manifest_cache", "fsrepo.manifest_commit", "fsrepo.remote_index", "fsrepo.early_chunks", "fsrepo.sync",
        "fsrepo.salvage", "fsrepo.pending_list", "fsrepo.upload_log",
        "fsrepo.heads", "fsrepo.head_writer", "fsrepo.head_watcher", "fsrepo.view_sweep",
        "fsrepo.dir_merge",
        "fsrepo.auto_snapshots"]),
    ("assembly", ["fsrepo.engine"]),
    ("FUSE and CLI", [
        "fsrepo.listed_attrs", "fsrepo.fs", "fsrepo.readonly", "fsrepo.snapshot_ops", "fsrepo.mount",
        "fsrepo.control", "fsrepo.cli",
        "fsrepo.maintenance", "fsrepo.auth"]),
]


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's own modules that `name` imports (anywhere in the file)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known and c != name}
    return found


def layer_of(name: str) -> int | None:
    probe = name
    while probe and (probe == name or probe != "fsrepo"):  # the package itself is no fallback
        for index, (_, members) in enumerate(LAYERS):
            if probe in members:
                return index
        probe = probe.rpartition(".")[0]
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def check(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    known = modules(root)
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        graph[name] = imports(name, path, known)
    problems = [f"cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    for name in sorted(graph):
        mine = layer_of(name)
        if mine is None:
            problems.append(f"{name} is in no layer (add it to LAYERS in scripts/imports.py)")
            continue
        for target in sorted(graph[name]):
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                problems.append(f"upward import: {name} ({LAYERS[mine][0]}) imports "
                                f"{target} ({LAYERS[theirs][0]})")
    return graph, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", action="store_true", help="print every module's imports")
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent / "fsrepo"
    graph, problems = check(root)
    if args.graph:
        for name in sorted(graph):
            print(f"{name} -> {', '.join(sorted(graph[name])) or '-'}")
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(graph)} modules, {sum(len(v) for v in graph.values())} imports, "
          f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
