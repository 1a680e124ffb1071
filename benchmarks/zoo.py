"""Width growth across the zoo: every torchvision classifier and a timm sample, grown by g.

    python benchmarks/zoo.py [--factor 2] [--input-size 64] [--only NAME,...]
                             [--timm NAME,...] [--mixture] [--out benchmarks/results/zoo.md]

For each builder (`torchvision.models.list_models(module=torchvision.models)`, 80 of them,
then `timm.create_model` for the timm sample; never pretrained, 10 classes, eval mode):
build it, give its constant tensors random values (zero heads, 1e-6 layer scales, unit
norm scales, zero running means would hide a coupling error), observe a plan with
`mgrow.arch.widen.plan`, grow it with `mgrow.arch.plans.apply` by net2net (noise 0) and by
zero growth, and report: grown or refused (with the one-line reason), the relative error of
the grown logits against the original's for both methods, plan and apply seconds, the
parameters before and after, the peak resident memory of the run above its start, and,
where `torch_pruning` is importable, whether Torch-Pruning's
`DependencyGraph().build_dependency(model, example_inputs=x)` builds for the same model
(and how many pruning groups it finds): the coverage the issue asks us to compare.
With `--mixture`, also MixtureGrowth of two template-mixed twins of the builder (seeds 0
and 1, constant tensors made random): `mixture err` is the relative error of the grown
net's logits (`--init zero`) against the members' mean, which holds exactly where no norm
averages over grown channels (BatchNorm nets) and not under LayerNorm/GroupNorm.

Each model runs in its own forked process, so one that crashes or runs out of memory is a
row, not the end of the run (`--in-process` turns this off). Status `grown` means the net2net
logits are within 1e-5; `INEXACT` means it grew but did not keep them (a bug: the engine
promises never to grow silently wrong); `error` means the engine raised something other
than MgrowError (also a bug). Input sizes: `--input-size` px, rounded up to the patch size for
ViT (passed as `image_size`, timm's `img_size` where the model takes it); maxvit_t needs
224 px, inception_v3 at least 75.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import re
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

from mgrow.arch.plans import apply
from mgrow.arch.widen import plan
from mgrow.errors import MgrowError

try:
    import torch_pruning
except ImportError:  # optional: the coverage column is left out
    torch_pruning = None

TIMM_SAMPLE = ["resnetv2_50", "efficientvit_b0", "convnext_atto", "vit_tiny_patch16_224",
               "mobilenetv3_small_050", "ghostnet_100", "regnety_002"]
MIN_SIZE = {"maxvit_t": 224, "inception_v3": 80}  # the builder's geometry needs these
TOL = 1e-5


def liven(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every constant parameter and norm statistic random values at its scale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not (t.is_floating_point() and t.numel() > 1):
                continue
            live = isinstance(t, nn.Parameter) or name.endswith(("running_mean", "running_var"))
            if live and bool((t == t.flatten()[0]).all()):
                r = torch.rand(t.shape, generator=gen)
                t.copy_((r - 0.5) * 0.2 if float(t.flatten()[0]) == 0 else 0.5 + r)
    return model


def options(kind: str, name: str, size: int) -> tuple[dict, int]:
    """Return the builder options the model needs at `size` px, and the size it takes."""
    size = max(size, MIN_SIZE.get(name, 0))
    kw: dict = {}
    if kind == "torchvision":
        vit = re.fullmatch(r"vit_[bhl]_(\d+)", name)
        if vit:
            patch = int(vit.group(1))
            size = math.ceil(size / patch) * patch
            kw["image_size"] = size
        if name == "maxvit_t":
            kw["input_size"] = (size, size)
        return kw, size
    import timm
    try:
        timm.create_model(name, pretrained=False, num_classes=10, img_size=size)
        return {"img_size": size}, size
    except TypeError:  # a convolutional net: no img_size
        return {}, size


def build(kind: str, name: str, size: int) -> tuple[nn.Module, int]:
    """Return the builder's network (10 classes, no weights) and the input size it takes."""
    kw, size = options(kind, name, size)
    if kind == "torchvision":
        return torchvision.models.get_model(name, weights=None, num_classes=10, **kw), size
    import timm
    return timm.create_model(name, pretrained=False, num_classes=10, **kw), size


def mixture_error(kind: str, name: str, factor: int, size: int, x: torch.Tensor) -> float:
    """Return the relative error of MixtureGrowth (`--init zero`) of two template-mixed twins
    of the builder against the members' mean logits (the bundles stay in memory)."""
    from mgrow.arch import build as build_net
    from mgrow.arch import empty
    from mgrow.bundle import Bundle
    from mgrow.growth import fuse
    from mgrow.manifest import ArchSpec, Lineage, Manifest, MixingSpec
    kw, size = options(kind, name, size)
    arch = ArchSpec(name=f"{kind}:{name}", num_classes=10, input_size=size,
                    options={k: v for k, v in kw.items() if k != "input_size"})
    members, logits = [], []
    for seed in (0, 1):
        model = liven(build_net(arch, MixingSpec(), seed=seed).eval(), seed)
        with torch.no_grad():
            logits.append(model(x))
        manifest = Manifest(arch=arch, mixing=MixingSpec(), lineage=Lineage(
            operation="init", options={"seed": seed}))
        tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
        members.append(Bundle(manifest, tensors, Path(f"member{seed}"), str(seed) * 64))
        del model
    grown = fuse(members, factor=factor, init="zero", method="mixture")
    net = empty(grown.manifest.arch, grown.manifest.mixing)
    net.load_state_dict(grown.tensors, strict=True)
    with torch.no_grad():
        return rel(net.eval()(x), (logits[0] + logits[1]) / 2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _status_kb(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> None:
    try:  # Linux: writing 5 resets VmHWM (the peak resident size) to the current size
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def one_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}"[:300] if not isinstance(e, MgrowError) else text[:300]


def measure(kind: str, name: str, factor: int, size: int, tp_gb: float = 4.0,
            send=None, mixture: bool = False) -> dict:
    """Build, plan, grow one model; every failure is a field of the returned row. `send`,
    if given, gets the row once growth is measured, before torch-pruning runs."""
    row: dict = {"model": f"{kind}:{name}", "status": "", "reason": ""}
    warnings.simplefilter("ignore")
    _reset_peak()
    start_kb = _status_kb("VmRSS")
    try:
        torch.manual_seed(0)
        model, size = build(kind, name, size)
        model = liven(model.eval())
    except Exception as e:  # noqa: BLE001 - a builder's refusal is a row
        row.update(status="build failed", reason=one_line(e))
        if send:
            send(dict(row))
        return row
    row["size"] = size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    row["params"] = n_params(model)
    try:
        with torch.no_grad():
            y = model(x)
        t = time.perf_counter()
        p = plan(model, factor, x)
        row["plan_s"] = time.perf_counter() - t
        t = time.perf_counter()
        grown = apply(model, p, "net2net").eval()
        row["apply_s"] = time.perf_counter() - t
        row["grown_params"] = n_params(grown)
        with torch.no_grad():
            row["net2net_err"] = rel(grown(x), y)
        del grown
        zero = apply(model, p, "zero").eval()
        with torch.no_grad():
            row["zero_err"] = rel(zero(x), y)
        del zero
        ok = row["net2net_err"] <= TOL
        row["status"] = "grown" if ok else "INEXACT"
        if mixture:
            t = time.perf_counter()
            row["mixture_err"] = mixture_error(kind, name, factor, size, x)
            row["mixture_s"] = time.perf_counter() - t
    except MgrowError as e:
        row.update(status="refused", reason=one_line(e))
    except Exception as e:  # noqa: BLE001 - anything but MgrowError is an engine bug
        row.update(status="error", reason=one_line(e))
        row["trace"] = traceback.format_exc(limit=-3)
    row["peak_mb"] = max(0, _status_kb("VmHWM") - start_kb) / 1024
    if send:
        send(dict(row))
    if torch_pruning is not None:
        row.update(pruning_coverage(model, x, tp_gb))
    return row


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def pruning_coverage(model: nn.Module, x: torch.Tensor, gb: float, seconds: int = 60) -> dict:
    """Whether Torch-Pruning's dependency graph builds for `model`, and its pruning groups.
    Its group enumeration can take minutes and tens of GB (swin_v2_t: MemoryError at 10 GB
    after 97 s), so the address space is capped `gb` above its current size meanwhile, and
    the whole takes at most `seconds`."""
    import resource
    import signal
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _status_kb("VmSize") * 1024 + int(gb * 2**30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    out: dict = {}
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        signal.alarm(seconds)
        t = time.perf_counter()
        dg = torch_pruning.DependencyGraph().build_dependency(
            model, example_inputs=x, verbose=False)
        out.update(tp="builds", tp_s=time.perf_counter() - t)
        out["tp_groups"] = len(list(dg.get_all_groups()))
    except MemoryError:
        out.setdefault("tp", "fails")
        out["tp_reason"] = f"MemoryError over {gb:g} GB"
    except _Timeout:
        out.setdefault("tp", "fails")
        out["tp_reason"] = f"over {seconds} s"
    except Exception as e:  # noqa: BLE001
        out.setdefault("tp", "fails")
        out["tp_reason"] = one_line(e)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return out


def _child(conn, *args) -> None:
    try:
        conn.send(measure(*args[:-1], send=conn.send, mixture=args[-1]))
    finally:
        conn.close()


def run_isolated(kind: str, name: str, factor: int, size: int, tp_gb: float,
                 mixture: bool = False) -> dict:
    """Run `measure` in a forked process; a crash or a kill becomes the row's status (or
    torch-pruning's, where the growth was already measured)."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, kind, name, factor, size, tp_gb, mixture))
    proc.start()
    child.close()
    row = None
    try:
        row = parent.recv()  # the growth
        row = parent.recv()  # and torch-pruning's coverage
    except EOFError:
        proc.join()
        if row is not None and torch_pruning is not None and "tp" not in row:
            row.update(tp="fails", tp_reason=f"crashed (exit code {proc.exitcode})")
    proc.join()
    if row is None:
        code = proc.exitcode
        why = f"signal {-code}" if code and code < 0 else f"exit code {code}"
        row = {"model": f"{kind}:{name}", "status": "crashed",
               "reason": why + (" (killed: out of memory?)" if code == -9 else "")}
    return row


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


COLUMNS = ["model", "px", "status", "net2net err", "zero err", "mixture err", "plan s", "apply s",
           "params M", "grown M", "x", "peak MB", "torch-pruning", "reason"]


def table(rows: list[dict], with_tp: bool, with_mixture: bool = False) -> str:
    cols = [c for c in COLUMNS if (with_tp or c != "torch-pruning")
            and (with_mixture or c != "mixture err")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        p0, p1 = r.get("params"), r.get("grown_params")
        tp = r.get("tp", "")
        if tp == "builds" and "tp_groups" in r:
            tp = f"builds ({r['tp_groups']} groups, {r['tp_s']:.1f} s)"
        elif tp == "builds":  # the graph built, its group enumeration did not finish
            tp = f"builds ({r['tp_s']:.1f} s; groups: {r.get('tp_reason', '')})"
        elif tp == "fails":
            tp = "fails: " + r.get("tp_reason", "").replace("|", "/")[:80]
        cells = {
            "model": r["model"], "px": _num(r.get("size"), "d"), "status": r["status"],
            "net2net err": _num(r.get("net2net_err"), ".1e"),
            "zero err": _num(r.get("zero_err"), ".1e"),
            "mixture err": _num(r.get("mixture_err"), ".1e"),
            "plan s": _num(r.get("plan_s"), ".2f"), "apply s": _num(r.get("apply_s"), ".2f"),
            "params M": _num(p0 and p0 / 1e6, ".2f"), "grown M": _num(p1 and p1 / 1e6, ".2f"),
            "x": _num(p1 and p0 and p1 / p0, ".2f"), "peak MB": _num(r.get("peak_mb"), ".0f"),
            "torch-pruning": tp, "reason": r.get("reason", "").replace("|", "/"),
        }
        lines.append("| " + " | ".join(cells[c] for c in cols) + " |")
    return "\n".join(lines)


def summary(rows: list[dict], with_tp: bool) -> str:
    count = {s: sum(r["status"] == s for r in rows)
             for s in ("grown", "INEXACT", "refused", "error", "crashed", "build failed")}
    built = len(rows) - count["build failed"]
    line = (f"grown {count['grown']} / refused {count['refused']} / build failed "
            f"{count['build failed']} of {len(rows)} "
            f"({100 * count['grown'] / max(built, 1):.0f}% of those built grow exactly)")
    bad = [f"{k} {v}" for k, v in count.items() if k in ("INEXACT", "error", "crashed") and v]
    if bad:
        line += "; " + ", ".join(bad)
    if with_tp:
        tp = sum(r.get("tp") == "builds" for r in rows)
        both = sum(r.get("tp") == "builds" and r["status"] == "grown" for r in rows)
        line += (f"; torch-pruning builds {tp} of {built} "
                 f"(both {both}, only mgrow {count['grown'] - both}, only torch-pruning "
                 f"{tp - both})")
    return line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--only", default="", help="comma-separated torchvision names "
                   "(default: every classifier; 'none' for none)")
    p.add_argument("--timm", help="comma-separated timm names ('none' for none; default: "
                   f"{','.join(TIMM_SAMPLE)}, or none with --only)")
    p.add_argument("--out", type=Path, help="also write the Markdown report here")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--tp-memory-gb", type=float, default=4.0,
                   help="address space torch-pruning may add (its group enumeration)")
    p.add_argument("--mixture", action="store_true", help="also grow two template-mixed "
                   "twins by MixtureGrowth (--init zero) against their mean logits")
    p.add_argument("--in-process", action="store_true",
                   help="do not fork per model (peak MB is then a lower bound)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    names = torchvision.models.list_models(module=torchvision.models)
    if a.only == "none":
        names = []
    elif a.only:
        wanted = a.only.split(",")
        unknown = [n for n in wanted if n not in names]
        if unknown:
            p.error(f"not torchvision classifiers: {', '.join(unknown)}")
        names = wanted
    jobs = [("torchvision", n) for n in names]
    timm_names = a.timm if a.timm is not None else "" if a.only else ",".join(TIMM_SAMPLE)
    if timm_names and timm_names != "none":
        jobs += [("timm", n) for n in timm_names.split(",")]
    run = measure if a.in_process else run_isolated
    rows = []
    for kind, name in jobs:
        t = time.perf_counter()
        row = run(kind, name, a.factor, a.input_size, a.tp_memory_gb, mixture=a.mixture)
        rows.append(row)
        print(f"{row['model']:40s} {row['status']:12s} {time.perf_counter() - t:6.1f} s "
              f"{row.get('reason', '')[:100]}", file=sys.stderr, flush=True)
        if row.get("trace"):
            print(row["trace"], file=sys.stderr)
    with_tp = torch_pruning is not None
    versions = (f"torch {torch.__version__}, torchvision {torchvision.__version__}"
                + (f", torch-pruning {torch_pruning.__version__}" if with_tp else ""))
    try:
        import timm
        versions += f", timm {timm.__version__}"
    except ImportError:
        pass
    report = "\n".join([
        f"# Width growth across the zoo: factor {a.factor}, {a.input_size} px",
        "",
        f"`python benchmarks/zoo.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        (f"on {platform.machine()} with {os.cpu_count()} CPUs, {torch.get_num_threads()} "
         f"torch threads; {versions}. Errors are relative (logits, 2 random images, "
         "constant tensors given random values); `x` is grown / original parameters."),
        "",
        table(rows, with_tp, a.mixture),
        "",
        summary(rows, with_tp),
        "",
    ])
    print(report)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(report)


if __name__ == "__main__":
    main()
