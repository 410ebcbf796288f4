"""Where a run's results may not be written: checked with the config, before any job."""

from __future__ import annotations

import os

# Where `results:` must not point: the system's own trees (and what lies under them), and directories
# that hold other things than one run's results (themselves only).
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin",
                "/sys", "/usr", "/var")
SYSTEM_TREE_EXCEPTIONS = ("/var/tmp",)
SHARED_ROOTS = ("/", "/home", "/tmp", "/opt", "/mnt", "/media", "/srv", "/root")


def results_problem(results: str) -> str | None:
    """Why `results` is no place to write a run's outputs, or None."""
    if "{" in results or "}" in results:
        return "braces are Snakemake wildcards; name a plain directory"
    normal = os.path.normpath(results)
    if not os.path.isabs(normal) and (normal == ".." or normal.startswith("../")):
        return "it leads out of the working directory (..); give an absolute path if you mean one"
    if normal == ".":
        return "it is the working directory itself; name a directory of its own, e.g. results"
    workdir = os.path.realpath(".")
    for where in {os.path.abspath(normal), os.path.realpath(normal)}:
        if not os.path.isabs(normal) and where.startswith(workdir + os.sep):
            continue  # inside the working directory, wherever that lies
        if where in SHARED_ROOTS:
            return f"{where} is not a directory of its own; name one under it"
        inside = [tree for tree in SYSTEM_TREES if where == tree or where.startswith(tree + "/")]
        if inside and not any(where == ok or where.startswith(ok + "/") for ok in SYSTEM_TREE_EXCEPTIONS):
            return f"{where} lies in the system directory {inside[0]}"
    if os.path.exists(normal) and not os.path.isdir(normal):
        return "it is an existing file, not a directory"
    return None
