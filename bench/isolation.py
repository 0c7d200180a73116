"""Run one measurement in a fresh process, for the benchmarks' memory and scaling figures.

A fresh process starts with an RSS clean of everything measured before it, and a crash, an OOM kill or a
hang costs one row of a table instead of the whole run.
"""

from __future__ import annotations

import multiprocessing
import traceback


def _child(conn, fn, args) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # report any failure to the parent instead of dying silently
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"))
    finally:
        conn.close()


def isolated(fn, *args, timeout_s: float) -> dict:
    """fn(*args) in a fresh spawned process; returns its result or {"error": ...} (crash, OOM kill, timeout)."""
    ctx = multiprocessing.get_context("spawn")  # fork after torch has started threads can deadlock
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args))
    proc.start()
    child.close()
    result = {"error": f"timed out after {timeout_s:.0f} s"}
    if parent.poll(timeout_s):
        try:
            status, value = parent.recv()
            result = value if status == "ok" else {"error": value}
        except EOFError:
            result = {"error": "the worker died without a result"}
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if proc.exitcode not in (0, None) and "error" in result and "timed out" not in result["error"]:
        result["error"] += f" (exit code {proc.exitcode})"
    return result
