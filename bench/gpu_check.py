"""The GPU check's measurements that import the project (``devtools/gpu_check.py`` runs them in child processes,
after it has installed the project; see its docstring and README "GPU check").

    python -m decmem.bench.gpu_check backends --spec SPEC.json --result RESULT.json
    python -m decmem.bench.gpu_check train    --spec SPEC.json --result RESULT.json

``backends``: every attention backend of model/kernels.py (BACKENDS without ``auto``, read at run time) against the
fp64 math reference on the same inputs, forward (out, lse) and backward (dq, dk, dv, d key_bias), per device,
dtype (bfloat16, float32) and case (plain; per-key bias + mask), with the tolerance each tensor was held to.
``train``: built-in synthetic data (once), the ``decmem train --dry-run`` estimate, then the trainer in this process
(``training.trainer.train``, what ``decmem train`` runs on one process): step times from metrics.jsonl and the peak
memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: peak RSS).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

from decmem.model import kernels

MiB = float(1 << 20)

# Tolerances of the backend check: |x - ref| <= atol + rtol * max|ref|, per tensor, against the fp64 math reference
TOLERANCES = {"bfloat16": {"atol": 1e-2, "rtol": 3e-2}, "float32": {"atol": 1e-5, "rtol": 2e-4}}


def backend_names() -> list[str]:
    """The concrete backends of model/kernels.py (BACKENDS without the 'auto' alias), read at run time."""
    return [b for b in kernels.BACKENDS if b != "auto"]


def _timed(fn, device, repeats: int):
    import statistics

    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def worker_backends(spec: dict) -> dict:
    """Each backend x device x dtype x case against the fp64 math reference, forward and backward."""
    names = spec["backends"] or backend_names()
    shape = spec["shape"]                                    # B, H, Nq, Nk, d
    B, H, Nq, Nk, d = (shape[k] for k in ("batch", "heads", "queries", "keys", "head_dim"))
    results = []
    for dev_name in spec["devices"]:
        dev = torch.device(dev_name)
        g = torch.Generator().manual_seed(0)
        base = {"q": torch.randn(B, H, Nq, d, generator=g), "k": torch.randn(B, H, Nk, d, generator=g),
                "v": torch.randn(B, H, Nk, d, generator=g), "bias": torch.randn(B, H, Nk, generator=g),
                "mask": torch.rand(B, H, Nk, generator=g) > 0.1,
                "g_out": torch.randn(B, H, Nq, d, generator=g), "g_lse": torch.randn(B, H, Nq, generator=g)}
        base["mask"][..., 0] = True                          # every row keeps a key
        base = {k: t.to(dev) for k, t in base.items()}
        for dtype_name in ("bfloat16", "float32"):
            dtype = getattr(torch, dtype_name)
            tol = TOLERANCES[dtype_name]
            for case in ("plain", "bias_mask"):
                # the reference sees exactly the inputs the kernel sees (cast to dtype, then to fp64)
                ins = {k: base[k].to(dtype) for k in ("q", "k", "v", "bias")}

                def run(backend, work_dtype, with_grad=True):
                    leaves = {k: t.to(work_dtype).detach().requires_grad_(with_grad) for k, t in ins.items()}
                    bias = leaves["bias"] if case == "bias_mask" else None
                    mask = base["mask"] if case == "bias_mask" else None
                    out, lse = kernels.attend(leaves["q"], leaves["k"], leaves["v"], key_bias=bias, key_mask=mask,
                                              backend=backend)
                    if not with_grad:
                        return None
                    loss = (out.double() * base["g_out"].double()).sum() + (lse.double() * base["g_lse"].double()).sum()
                    loss.backward()
                    res = {"out": out.detach(), "lse": lse.detach(), "dq": leaves["q"].grad, "dk": leaves["k"].grad,
                           "dv": leaves["v"].grad}
                    if bias is not None:
                        res["dbias"] = leaves["bias"].grad
                    return res

                ref = run("math", torch.float64)
                for backend in names:
                    row = {"backend": backend, "device": dev_name, "dtype": dtype_name, "case": case,
                           "shape": shape, "tolerance": tol}
                    try:
                        row["auto_resolves_to"] = kernels.resolve_backend("auto", ins["q"])
                        t0 = time.perf_counter()
                        got = run(backend, dtype)
                        row["first_call_seconds"] = round(time.perf_counter() - t0, 3)
                    except (ImportError, NotImplementedError) as e:
                        results.append(dict(row, status="skipped", reason=f"{type(e).__name__}: {e}"[:400]))
                        continue
                    except Exception as e:                   # noqa: BLE001 -- recorded, the other backends go on
                        results.append(dict(row, status="failed", reason=f"{type(e).__name__}: {e}"[:600]))
                        continue
                    errors, ok = {}, True
                    for key, r in ref.items():
                        x = got.get(key)
                        if x is None:
                            errors[key] = {"error": "no gradient"}
                            ok = False
                            continue
                        r64, x64 = r.double(), x.double()
                        finite = r64.isfinite()
                        nonfinite = int((x64.isfinite() != finite).sum())
                        err = float((x64 - r64)[finite].abs().max()) if finite.any() else 0.0
                        scale = float(r64[finite].abs().max()) if finite.any() else 0.0
                        bound = tol["atol"] + tol["rtol"] * scale
                        passed = nonfinite == 0 and err <= bound
                        ok = ok and passed
                        errors[key] = {"max_abs_err": err, "max_abs_ref": scale, "bound": bound, "ok": passed}
                        if nonfinite:
                            errors[key]["nonfinite_mismatch"] = nonfinite
                    row.update(status="ok" if ok else "failed", errors=errors,
                               max_rel_err=max((e.get("max_abs_err", 0.0) / max(e.get("max_abs_ref", 0.0), 1e-12))
                                               for e in errors.values()))
                    if spec["repeats"]:
                        row["ms_forward_backward"] = _timed(lambda b=backend: run(b, dtype), dev, spec["repeats"])
                        with torch.no_grad():
                            row["ms_forward"] = _timed(lambda b=backend: run(b, dtype, False), dev, spec["repeats"])
                    results.append(row)
    counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "failed", "skipped")}
    return {"backends": names, "devices": spec["devices"], "results": results, "counts": counts,
            "status": "failed" if counts["failed"] else "ok"}


def worker_train(spec: dict) -> dict:
    """Synthetic data (once), the --dry-run estimate, then the trainer in this process: step times, peak memory."""
    import resource

    from decmem.data_pipeline.preprocess import PreprocessArgs, parse_size, preprocess
    from decmem.training.config import load_config
    from decmem.training.dry_run import run_dry_run
    from decmem.training.run_config import RunConfig
    from decmem.training.trainer import train

    data = spec["data_dir"]
    out: dict = {"config": spec["config"], "overrides": spec["overrides"]}
    if not os.path.exists(os.path.join(data, "manifest.json")):       # the first training step makes it
        t0 = time.perf_counter()
        m = preprocess(spec["data_spec"], data, PreprocessArgs(format_name="synthetic", segment_frames=spec["frames"],
                                                               shard_bytes=parse_size("4MB")), progress=False)
        out["preprocess"] = {"data_spec": spec["data_spec"], "samples": m["samples"],
                             "seconds": round(time.perf_counter() - t0, 2)}
        if not m["samples"]:
            return dict(out, status="failed", reason=f"no sample from the synthetic data ({spec['data_spec']})")
    cfg = load_config(RunConfig, spec["config"], spec["overrides"])
    report: list[str] = []
    try:                                                 # the estimate, beside the measured peak below
        run_dry_run(cfg, 1, log=report.append)
        out["dry_run"] = {"ok": True, "report": "\n".join(report)}
    except Exception as e:                               # noqa: BLE001 -- recorded; the run itself still goes on
        out["dry_run"] = {"ok": False, "error": f"{type(e).__name__}: {e}", "report": "\n".join(report)}

    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        out["outcome"] = train(cfg)
    except Exception as e:                               # noqa: BLE001 -- an OOM or a DeepSpeed error is the finding
        traceback.print_exc()
        out["outcome"] = "error"
        out["error"] = f"{type(e).__name__}: {e}"[:1000]
    out["seconds_total"] = round(time.perf_counter() - t0, 2)
    if cuda:
        out["peak_gpu_allocated_mib"] = round(torch.cuda.max_memory_allocated() / MiB, 1)
        out["peak_gpu_reserved_mib"] = round(torch.cuda.max_memory_reserved() / MiB, 1)
        out["device_name"] = torch.cuda.get_device_name()
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    rows = []
    path = os.path.join(cfg.run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    steps = [r["perf/step_seconds"] for r in rows if r.get("perf/step_seconds") is not None]
    out["step_seconds"] = steps
    timed = sorted(steps[spec["warmup_steps"]:] or steps)
    if timed:
        out["step_seconds_median"] = timed[len(timed) // 2]
        out["steps_timed"] = len(timed)
    tps = [r["perf/tokens_per_s"] for r in rows if r.get("perf/tokens_per_s") is not None]
    out["tokens_per_s_last"] = tps[-1] if tps else None
    out["loss"] = [r.get("train/loss") for r in rows if "train/loss" in r]
    out["status"] = "ok" if out["outcome"] == "done" and steps else "failed"
    if out["status"] == "failed":
        out["reason"] = out.get("error") or f"train() returned {out['outcome']!r} after {len(steps)} logged steps"
    return out


WORKERS = {"backends": worker_backends, "train": worker_train}


def _clean(obj):
    """Strict-JSON-safe copy: NaN / inf -> None."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="One measurement of the GPU check (devtools/gpu_check.py runs these).")
    p.add_argument("worker", choices=sorted(WORKERS))
    p.add_argument("--spec", required=True, help="JSON: what to measure (written by devtools/gpu_check.py)")
    p.add_argument("--result", required=True, help="JSON written here")
    a = p.parse_args(argv)
    with open(a.spec) as f:
        spec = json.load(f)
    res = WORKERS[a.worker](spec)
    tmp = a.result + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_clean(res), f, indent=1, allow_nan=False)
    os.replace(tmp, a.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
