"""``deepinsert tables`` on 1 vs 2 CPU processes (torchrun, gloo), equality, and a SIGKILLed rank.

On the shipped demo (``--samples`` of demo:train, all 9 candidate layers, batch ``--batch``)
it runs, in alternating order for ``--rounds`` rounds, each into a fresh cache folder:

* ``1proc-1thread``: ``python -m deepinsert tables`` with one torch thread;
* ``1proc-2threads``: the same with two threads (the single process using both cores);
* ``torchrun-2x1``: ``torchrun --standalone --nproc-per-node 2 -m deepinsert tables``, one
  thread per process;

and reads the rates each run prints: rows over the compute loop's wall time (model loading
excluded; for torchrun all rows over the slowest rank's time), and rows over the busiest
rank's CPU time — what the rate would be if every process had its own idle core, the
figure that survives a machine shared with other jobs. Beside each run it records
how idle the machine was (the share of idle CPU time in ``/proc/stat`` over the run, and
the load average), since the machine may be shared. Every merged table is compared with
the first single-process one (bitwise, and the largest difference).

Then the kill test: a torchrun job whose rank 1 is sent SIGKILL from outside once it has
written ``--kill-after`` part files (``--max-restarts 0``: the job fails), then a plain
rerun; its table is compared with the uninterrupted one, and the rows the rerun computed
are reported. Writes benchmarks/results/tables_scaling.json.

    python benchmarks/tables_scaling.py [--samples 384 --rounds 3]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "tables_scaling.json"
RATE = re.compile(r"computed (\d+) rows in (\d+) batches \(([\d.]+) rows/s over (\d+) rank\(s\); ([\d.]+) rows per CPU")


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return vals[3] + vals[4], sum(vals)  # idle + iowait, total


def _config(folder: Path, name: str, samples: int, batch: int, threads: int) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        f"model: demo\ndevice: cpu\ndata:\n  train: demo:train\n  max_train_samples: {samples}\n"
        f"candidate_layers: all\nloss_batch_size: {batch}\ntorch_threads: {threads}\ncache_dir: {folder / name}\n",
        encoding="utf-8")
    return path


def _cmd(kind: str, cfg: Path) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    tail = ["tables", "--config", str(cfg), "--no-progress"]
    if kind.startswith("torchrun"):
        env["OMP_NUM_THREADS"] = "1"
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--max-restarts", "0", "-m", "deepinsert", *tail], env
    env["OMP_NUM_THREADS"] = "2" if kind == "1proc-2threads" else "1"
    return [sys.executable, "-m", "deepinsert", *tail], env


def _table(cache_dir: Path) -> np.ndarray:
    [path] = cache_dir.glob("tables-*/train.npz")
    with np.load(path) as z:
        return z["losses"].copy()


def _run(kind: str, folder: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    threads = 2 if kind == "1proc-2threads" else 1
    cfg = _config(folder, name, args.samples, args.batch, threads)
    cmd, env = _cmd(kind, cfg)
    i0, t0 = _cpu_times()
    w0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - w0
    i1, t1 = _cpu_times()
    if p.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{p.stderr[-3000:]}")
    m = RATE.search(p.stdout)
    assert m, p.stdout
    return {"kind": kind, "rows": int(m.group(1)), "rows_per_s": float(m.group(3)), "ranks": int(m.group(4)),
            "rows_per_cpu_s": float(m.group(5)),
            "wall_s_incl_startup": round(wall, 2), "idle_frac": round((i1 - i0) / max(1, t1 - t0), 3),
            "loadavg_after": os.getloadavg()[0], "table": _table(folder / name)}


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        out += [int(k) for k in kids]
    return out


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode(errors="replace").split("=", 1) for x in raw if b"=" in x)


def kill_test(folder: Path, args: argparse.Namespace, reference: np.ndarray) -> dict[str, Any]:
    cfg = _config(folder, "killed", args.samples, args.batch, 1)
    cmd, env = _cmd("torchrun-2x1", cfg)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = folder / "killed"
    killed = None
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        mine = list(parts.glob("tables-*/parts/*-r0001-*.npz"))
        if len(mine) >= args.kill_after:
            for c in _children(proc.pid):
                if _environ(c).get("RANK") == "1":
                    os.kill(c, signal.SIGKILL)
                    killed = {"pid": c, "parts_rank1": len(mine),
                              "parts_all": len(list(parts.glob("tables-*/parts/*.npz")))}
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    first_rc = proc.returncode
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    m = RATE.search(rerun.stdout)
    rec = re.search(r"(\d+) losses recovered", rerun.stdout)
    table = _table(parts)
    return {"killed": killed, "first_returncode": first_rc, "rerun_returncode": rerun.returncode,
            "rerun_rows_computed": int(m.group(1)) if m else None, "total_rows": args.samples,
            "recovered_losses": int(rec.group(1)) if rec else 0,
            "bitwise_equal_uninterrupted": bool(np.array_equal(table, reference)),
            "max_abs_diff": float(np.abs(table - reference).max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=384)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kill-after", type=int, default=2, help="part files rank 1 writes before SIGKILL")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from deepinsert.utils.atomic import atomic_write_json

    folder = Path(tempfile.mkdtemp(prefix="tables-scaling-"))
    kinds = ["1proc-1thread", "torchrun-2x1", "1proc-2threads"]
    runs: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds):
            order = kinds[r % 3:] + kinds[: r % 3]  # rotate: drift hits every kind alike
            for kind in order:
                res = _run(kind, folder, f"{kind}-{r}", args)
                runs.append(res)
                print(f"round {r} {kind:15s} {res['rows_per_s']:7.1f} rows/s ({res['rows_per_cpu_s']:.1f} per CPU-s of "
                      f"the busiest rank)  idle {res['idle_frac']:.2f}  "
                      f"load {res['loadavg_after']:.2f}", flush=True)
        ref = runs[0]["table"] if runs[0]["kind"] == "1proc-1thread" else next(
            x["table"] for x in runs if x["kind"] == "1proc-1thread")
        summary: dict[str, Any] = {}
        for kind in kinds:
            rates = [x["rows_per_s"] for x in runs if x["kind"] == kind]
            cpu = [x["rows_per_cpu_s"] for x in runs if x["kind"] == kind]
            summary[kind] = {"rows_per_s": rates, "median": float(np.median(rates)), "min": min(rates), "max": max(rates),
                             "rows_per_cpu_s": cpu, "cpu_median": float(np.median(cpu))}
        ratios = []
        for r in range(args.rounds):  # the ratio within a round: runs side by side
            by = {x["kind"]: x["rows_per_s"] for x in runs[3 * r: 3 * r + 3]}
            cpu = {x["kind"]: x["rows_per_cpu_s"] for x in runs[3 * r: 3 * r + 3]}
            ratios.append({"round": r, "2proc_vs_1thread": by["torchrun-2x1"] / by["1proc-1thread"],
                           "2proc_vs_2threads": by["torchrun-2x1"] / by["1proc-2threads"],
                           "cpu_time_2proc_vs_1thread": cpu["torchrun-2x1"] / cpu["1proc-1thread"]})
        equal = {x["kind"] + f"#{i}": {"bitwise": bool(np.array_equal(x["table"], ref)),
                                       "max_abs_diff": float(np.abs(x["table"] - ref).max())}
                 for i, x in enumerate(runs)}
        kill = kill_test(folder, args, ref)
        print(json.dumps({"ratios": ratios, "kill": kill}, indent=1))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = {
        "benchmark": "tables_scaling",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "setup": {"data": "demo:train", "samples": args.samples, "batch": args.batch, "candidate_layers": "all (9)"},
        "runs": [{k: v for k, v in x.items() if k != "table"} for x in runs],
        "summary": summary, "ratios_by_round": ratios, "equal_to_single_process": equal, "kill_resume": kill,
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
