"""Benchmark: each method's reference (one-at-a-time) and optimized (teacher work in bulk) modes, side by side.

``python -m erasure.bench [--model toyworld|tiny|sd14-random] [--quick] [--methods ours,esd] [--iterations N]``

For every method, the same work runs twice in one process on the same model: ``trainer.teacher_batch=1``
(the reference, as the official codes do it) and ``trainer.teacher_batch=N`` (optimized; methods whose
sampler depends on the student stay sequential and report a speed-up of 1). Then generation: the eval
generator (batched, per-row seeded) against a plain ``StableDiffusionPipeline`` call per image at the
same settings. Prints a table and a final JSON line keyed by method.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch

from . import registry, schema
from .adapters import is_adapter_parameter
from .cli import setup_logging
from .config import compose, sdpa_names
from .errors import UserError, exit_on_user_error
from .generation import Sampler, generate
from .models import load_models
from .session import Session, TeacherBank, sdpa_context, seed_everything

log = logging.getLogger("erasure.bench")


def _compose(overrides: list[str]):
    return compose(overrides)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def restore_base(unet: torch.nn.Module, base_state: dict) -> None:
    """The base weights back in ``unet``; adapters a previous session attached (erasure.adapters) are set to zero,
    the identity (a new session re-initialises them anyway)."""
    missing, unexpected = unet.load_state_dict(base_state, strict=False)
    if unexpected or any(not is_adapter_parameter(k) for k in missing):
        raise RuntimeError(f"the UNet does not match the benchmark's base state: missing {missing[:3]}, unexpected {unexpected[:3]}")
    named = dict(unet.named_parameters())
    with torch.no_grad():
        for k in missing:
            named[k].zero_()


def time_training(models, base_state, overrides: list[str], iterations: int, profile: Path | None = None) -> dict:
    """Seconds per iteration of ``iterations`` optimizer steps (method set-up excluded), from the same base weights.

    With ``profile``, the steps run under ``torch.profiler`` and its operator table (sorted by self time on the
    device, or on the CPU) is written there: where an iteration's time goes."""
    cfg = _compose(overrides + [f"trainer.iterations={iterations}", "trainer.preview_every=0", "logger=none"])
    cls = registry.get_method(cfg.method.name)
    mcfg = cls.parse_config(cfg.method)
    models.unet.to(torch.float32)  # a previous session may have cast frozen weights to bf16
    models.unet.to(memory_format=torch.contiguous_format)  # ... or set them channels-last (trainer.channels_last)
    restore_base(models.unet, base_state)
    models.unet.requires_grad_(False)
    seed_everything(int(cfg.trainer.seed))
    if models.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    session = Session.create(cfg, models, cls, mcfg)
    account = _TeacherAccount(session) if models.device.type == "cpu" else None  # GPU: no per-call syncs
    _sync(models.device)
    prof = _profiler(models.device) if profile else contextlib.nullcontext()
    start = time.perf_counter()
    with prof:
        for step in range(1, iterations + 1):
            session.step(step)
        _sync(models.device)
    elapsed = time.perf_counter() - start
    if profile:
        key = "self_cuda_time_total" if models.device.type == "cuda" else "self_cpu_time_total"
        profile.parent.mkdir(parents=True, exist_ok=True)
        profile.write_text(prof.key_averages().table(sort_by=key, row_limit=40) + "\n")
        log.info("profile of %d iterations written to %s", iterations, profile)
    out = dict(s_per_it=elapsed / iterations, seconds=elapsed, setup_s=session.setup_time,
               batched=isinstance(session.step_fn, TeacherBank), peak_rss_mb=peak_rss_mb())
    if account is not None:
        account.restore()
        out.update(teacher_s_per_it=account.seconds / iterations, teacher_rows_per_it=account.rows / iterations)
    if models.device.type == "cuda":
        out["peak_vram_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class _TeacherAccount:
    """Counts the frozen teacher's UNet rows and the seconds spent in its calls during a timed session (CPU only:
    on a GPU, timing each call would need a synchronisation that changes what is measured).

    The teacher's work is what batching can make cheaper; the rest of an iteration (the student's forward and
    backward, the optimizer) is the same in both modes. So ``s/it reference / (s/it optimized - teacher s/it
    optimized)`` is the most any batching of the teacher could give: the ceiling printed beside the speed-up."""

    def __init__(self, session):
        self.ctx, self.real = session.method.ctx, session.method.ctx.teacher
        self.rows, self.seconds = 0, 0.0
        self.ctx.teacher = self

    def __call__(self, sample, timestep, encoder_hidden_states):
        start = time.perf_counter()
        out = self.real(sample, timestep, encoder_hidden_states)
        self.seconds += time.perf_counter() - start
        self.rows += int(sample.shape[0])
        return out

    def __getattr__(self, name):  # params, numel, ... of the real teacher
        return getattr(self.real, name)

    def restore(self) -> None:
        self.ctx.teacher = self.real


@torch.no_grad()
def unet_gflop_per_row(models) -> float:
    """GFLOP of one UNet evaluation of one latent row (torch's FLOP counter: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *models.latent_shape, device=models.device)
    emb = models.encode_text([""]).to(models.device, torch.float32)
    models.unet.to(torch.float32)
    with FlopCounterMode(display=False) as counter:
        models.unet(x, torch.tensor(500, device=models.device), emb)
    return counter.get_total_flops() / 1e9


@torch.no_grad()
def matmul_gflops(side: int = 2048, repeats: int = 5) -> float:
    """This CPU's float32 matrix-multiply throughput with torch's current threads (the best of ``repeats``)."""
    a, b = torch.randn(side, side), torch.randn(side, side)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * side**3 / best / 1e9


@torch.no_grad()
def precision_check(models, base_state, dtype: torch.dtype) -> dict:
    """How far the teacher's epsilon moves from float32 under ``trainer.teacher_precision`` autocast and pure:
    relative RMS error on 4 random latents and prompts at t = 500 (the figure to weigh against their speed)."""
    from .teacher import Teacher

    unet, dev = models.unet, models.device
    unet.to(torch.float32)
    restore_base(unet, base_state)
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(4, *models.latent_shape, generator=g).to(dev)
    emb = models.encode_text(["a photo of a cat", "a red circle", "a painting by van gogh", ""]).to(dev, torch.float32)
    t = torch.tensor(500, device=dev)
    ref = Teacher(unet, {})(x, t, emb).float()
    with torch.autocast(dev.type, dtype=dtype):
        auto = Teacher(unet, {})(x, t, emb).float()
    unet.to(dtype)
    pure = Teacher(unet, {}, dtype)(x, t, emb)
    unet.to(torch.float32)
    restore_base(unet, base_state)

    def rel(a):
        return float((a - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())

    return dict(dtype=str(dtype).replace("torch.", ""), autocast_rel_rms=round(rel(auto), 5), pure_rel_rms=round(rel(pure), 5))


def _profiler(device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))


@torch.no_grad()
def time_generation(models, n: int, batch: int, steps: int) -> dict:
    """images/s: the project's generation function (:func:`erasure.generation.generate`: batched, per-row seeded) vs
    one plain diffusers pipeline call per image (the reference it is measured against, not a generation path)."""
    pipe = models.pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"prompt number {i}" for i in range(n)]
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=models.resolution, width=models.resolution,
              output_type="np")
    pipe(prompts[:1], generator=torch.Generator("cpu").manual_seed(0), **kw)  # warm-up
    _sync(models.device)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        pipe(p, generator=torch.Generator("cpu").manual_seed(i), **kw)
    _sync(models.device)
    plain = n / (time.perf_counter() - start)
    sampler = Sampler(models.generation_scheduler, steps=steps, guidance=7.5, resolution=models.resolution,
                      batch_size=batch)
    start = time.perf_counter()
    generate(models, prompts, sampler, seeds=list(range(n)))
    _sync(models.device)
    batched = n / (time.perf_counter() - start)
    return dict(plain_images_per_s=plain, batched_images_per_s=batched, ratio=batched / plain, batch=batch, images=n)


@dataclasses.dataclass
class BenchOptions:
    """The numbers ``erasure.bench`` takes (null = the default its help names); ranges from :mod:`erasure.schema`."""

    iterations: int | None = dataclasses.field(default=None, metadata={"rule": schema.or_null(schema.at_least(1))})
    reference_iterations: int | None = dataclasses.field(default=None,  # 0 = the optimized mode only
                                                         metadata={"rule": schema.or_null(schema.at_least(0))})
    baseline_iterations: int | None = dataclasses.field(default=None, metadata={"rule": schema.or_null(schema.at_least(1))})
    teacher_batch: int | None = dataclasses.field(default=None, metadata={"rule": schema.or_null(schema.at_least(1))})
    generation_images: int | None = dataclasses.field(default=None, metadata={"rule": schema.or_null(schema.at_least(1))})
    warmup_iterations: int | None = dataclasses.field(default=None, metadata={"rule": schema.or_null(schema.at_least(0))})
    device: str = "auto"


@exit_on_user_error
def main(argv: list[str]) -> dict:
    setup_logging()
    ap = argparse.ArgumentParser(prog="python -m erasure.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toyworld", help="toyworld | tiny | sd14-random (alias of sd14_random)")
    ap.add_argument("--quick", action="store_true", help="fewer iterations (under 3 minutes on a 2-core CPU)")
    ap.add_argument("--methods", default=None, help="comma-separated methods (default: all registered)")
    ap.add_argument("--iterations", type=int, default=None, help="iterations per mode for `ours` (default 200; quick 40)")
    ap.add_argument("--reference-iterations", type=int, default=None,
                    help="iterations of the one-at-a-time reference (its s/it is stationary; default: same as optimized)")
    ap.add_argument("--baseline-iterations", type=int, default=None, help="iterations per mode for other methods")
    ap.add_argument("--teacher-batch", type=int, default=None, help="optimized mode's trainer.teacher_batch (default: = iterations)")
    ap.add_argument("--generation-images", type=int, default=None)
    ap.add_argument("--warmup-iterations", type=int, default=None,
                    help="untimed optimized iterations before each method's timed modes (default: one teacher batch on "
                         "a GPU, whose first calls pay for kernel selection and allocation; 0 on a CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--concept", default=None, help="concept config (default: the train config's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for both modes, e.g. --set trainer.teacher_precision=pure (repeatable)")
    ap.add_argument("--profile", type=Path, default=None, metavar="FILE",
                    help="also profile 8 optimized iterations of each method; operator tables go to FILE (.<method>.txt)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                    help="also time the optimized mode with these space-separated overrides, in the same process and "
                         "from the same weights, e.g. --variant 'no_cudnn=trainer.sdpa_backends=flash+efficient' "
                         "(repeatable; reported as a ratio to the plain optimized mode)")
    ap.add_argument("--generation-sdpa", default="auto", metavar="SPECS",
                    help="comma-separated trainer.sdpa_backends values to time generation under (default: auto)")
    ap.add_argument("--skip-generation", action="store_true", help="time training only")
    ap.add_argument("--precision-check", action="store_true",
                    help="GPU: relative error of the teacher's epsilon in autocast and pure low precision vs float32")
    args = ap.parse_args(argv)
    schema.check(BenchOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchOptions)}), "bench")
    variants = {}
    for spec in args.variant:
        vname, sep, rest = spec.partition("=")
        if not sep or not vname or not rest.strip():
            raise UserError(f"--variant '{spec}' is not NAME=OVERRIDES: e.g. --variant 'cl=trainer.channels_last=true'")
        variants[vname] = rest.split()
    gen_specs = args.generation_sdpa.split(",")
    for spec in gen_specs:
        sdpa_names(spec)
    model = args.model.replace("-", "_")
    methods = args.methods.split(",") if args.methods else registry.available()
    its = args.iterations or (40 if args.quick else 200)
    base_its = args.baseline_iterations or (3 if args.quick else 10)
    base = [f"model={model}"] + ([f"concept={args.concept}"] if args.concept else []) + [f"trainer.device={args.device}"]
    cfg0 = _compose(base)
    base += args.set  # after cfg0: an override may name a key only some methods have (method.sampler)
    models = load_models(cfg0.model, args.device)
    base_state = {k: v.detach().clone() for k, v in models.unet.state_dict().items()}
    results, rows, flops = {}, [], None
    if args.precision_check and models.device.type == "cuda":
        check = precision_check(models, base_state, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        log.info("teacher precision vs float32: %s", check)
        results["precision_check"] = check
    for name in methods:
        n = its if name == "ours" else base_its
        tb = args.teacher_batch or n
        ref_n = n if args.reference_iterations is None else min(n, args.reference_iterations)
        warm = args.warmup_iterations if args.warmup_iterations is not None else \
            (min(tb, n) if models.device.type == "cuda" else 0)
        optimized = base + [f"method={name}", f"trainer.teacher_batch={tb}"]
        if warm:  # on an H200 the first 100 timed iterations ran at 0.41 s/it, the same again at 0.26 (PERFORMANCE.md)
            time_training(models, base_state, optimized, warm)
        opt = time_training(models, base_state, optimized, n)
        # --reference-iterations 0: optimized mode only (e.g. comparing variants of it with --set)
        ref = time_training(models, base_state, base + [f"method={name}", "trainer.teacher_batch=1"], ref_n) \
            if ref_n > 0 else dict(s_per_it=float("nan"), peak_rss_mb=0.0)
        timed = {}
        for vname, extra in variants.items():  # side by side with `opt`: same process, weights and iterations
            v = time_training(models, base_state, optimized + extra, n)
            timed[vname] = dict(overrides=extra, s_per_it=round(v["s_per_it"], 5),
                                ratio_to_optimized=round(opt["s_per_it"] / v["s_per_it"], 3),
                                **({"peak_vram_mb": round(v["peak_vram_mb"], 1)} if "peak_vram_mb" in v else {}))
            log.info("%s, variant %s (%s): %.4f s/it, %.2fx the plain optimized mode's speed", name, vname,
                     " ".join(extra), v["s_per_it"], opt["s_per_it"] / v["s_per_it"])
        if args.profile:
            pn = min(8, n)
            time_training(models, base_state, base + [f"method={name}", f"trainer.teacher_batch={pn}"], pn,
                          profile=args.profile.with_suffix(f".{name}.txt"))
        results[name] = dict(iterations=n, reference_iterations=ref_n, teacher_batch=tb, warmup_iterations=warm,
                             seconds_optimized=round(opt["seconds"], 2), s_per_it_reference=round(ref["s_per_it"], 5),
                             s_per_it_optimized=round(opt["s_per_it"], 5),
                             speedup=round(ref["s_per_it"] / opt["s_per_it"], 2) if ref_n > 0 else None,
                             it_per_s_optimized=round(1 / opt["s_per_it"], 3),
                             batched=opt["batched"], setup_s=round(opt["setup_s"], 2),
                             peak_mem_mb=round(max(ref["peak_rss_mb"], opt["peak_rss_mb"]), 1))
        if timed:
            results[name]["variants"] = timed
        if "peak_vram_mb" in opt:
            results[name]["peak_vram_mb"] = round(opt["peak_vram_mb"], 1)
        if "teacher_s_per_it" in opt:
            rest = opt["s_per_it"] - opt["teacher_s_per_it"]  # what no batching of the teacher can remove
            results[name].update(teacher_s_per_it_optimized=round(opt["teacher_s_per_it"], 5),
                                 teacher_rows_per_it_optimized=round(opt["teacher_rows_per_it"], 2), ceiling=None)
            if ref_n > 0:
                results[name].update(teacher_s_per_it_reference=round(ref["teacher_s_per_it"], 5),
                                     teacher_rows_per_it_reference=round(ref["teacher_rows_per_it"], 2))
                if rest > 0:
                    results[name]["ceiling"] = round(ref["s_per_it"] / rest, 2)
                if opt["teacher_rows_per_it"] > 0:
                    # the teacher's rows at this CPU's own matmul peak: no batching of the same work can beat this
                    flops = flops or dict(gflop_per_row=unet_gflop_per_row(models), peak_gflops=matmul_gflops())
                    floor = opt["teacher_rows_per_it"] * flops["gflop_per_row"] / flops["peak_gflops"]
                    results[name].update(arithmetic_bound=round(ref["s_per_it"] / (max(rest, 0.0) + floor), 2),
                                         teacher_floor_s_per_it=round(floor, 5),
                                         unet_gflop_per_row=round(flops["gflop_per_row"], 4),
                                         matmul_peak_gflops=round(flops["peak_gflops"], 1))
        rows.append(name)
        log.info("%s: %s", name, results[name])
    models.unet.to(torch.float32)
    restore_base(models.unet, base_state)
    if models.device.type == "cuda" and models.dtype != torch.float32:
        models.unet.to(models.dtype)  # inference in the model's half precision, as the evaluation does on GPU
    gen_n = args.generation_images or (8 if args.quick else 32)
    gen = None
    if not args.skip_generation:
        by_spec = {}
        for spec in gen_specs:
            with sdpa_context(spec):
                by_spec[spec] = time_generation(models, gen_n, batch=8, steps=int(cfg0.model.sample_steps))
            log.info("generation (sdpa_backends=%s): %s", spec, by_spec[spec])
        gen = dict(by_spec[gen_specs[0]])  # the first setting's figures, and each setting's beside them
        if len(by_spec) > 1:
            gen["sdpa"] = {spec: {k: g[k] for k in ("plain_images_per_s", "batched_images_per_s")}
                           for spec, g in by_spec.items()}
    device = torch.cuda.get_device_name() if models.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    lines = [f"model={model}  device={device}  torch={torch.__version__}  overrides={args.set or 'none'}",
             f"{'method':<10}{'its':>5}{'batch':>6}{'s/it ref':>11}{'s/it opt':>11}{'it/s opt':>10}{'speed-up':>10}"
             f"{'teacher rows/it':>16}{'teacher s/it ref|opt':>22}{'ceiling':>9}{'peak MB':>10}"]
    nan = float("nan")
    for name in rows:
        r = results[name]
        lines.append(f"{name:<10}{r['iterations']:>5}{r['teacher_batch'] if r['batched'] else 1:>6}{r['s_per_it_reference']:>11.4f}"
                     f"{r['s_per_it_optimized']:>11.4f}{r['it_per_s_optimized']:>10.2f}{r['speedup'] or nan:>9.2f}x"
                     f"{r.get('teacher_rows_per_it_optimized', nan):>16.1f}"
                     f"{r.get('teacher_s_per_it_reference', nan):>11.4f} |{r.get('teacher_s_per_it_optimized', nan):>8.4f}"
                     f"{r.get('ceiling') or nan:>8.2f}x{r.get('peak_vram_mb', r['peak_mem_mb']):>10.0f}")
    if any("ceiling" in results[n] for n in rows):
        lines.append("ceiling: the speed-up if the teacher's work cost nothing (s/it ref / (s/it opt - teacher s/it opt)); "
                     "the student's forward/backward and the optimizer run once per iteration in both modes")
    for name in rows:
        r = results[name]
        if "arithmetic_bound" in r:
            lines.append(f"{name}: arithmetic bound {r['arithmetic_bound']:.2f}x = s/it ref / (s/it opt outside the teacher "
                         f"+ {r['teacher_rows_per_it_optimized']:.1f} teacher rows x {r['unet_gflop_per_row']:.3f} GFLOP "
                         f"at this CPU's matmul peak of {r['matmul_peak_gflops']:.0f} GFLOP/s); the optimized teacher runs "
                         f"at {r['teacher_floor_s_per_it'] / r['teacher_s_per_it_optimized']:.0%} of that peak")
    for name in rows:
        for vname, v in results[name].get("variants", {}).items():
            lines.append(f"{name}, variant {vname} ({' '.join(v['overrides'])}): {v['s_per_it']:.4f} s/it, "
                         f"{v['ratio_to_optimized']:.2f}x the optimized mode's speed"
                         + (f", peak {v['peak_vram_mb']:.0f} MB" if "peak_vram_mb" in v else ""))
    if gen:
        for spec, g in (gen.get("sdpa") or {}).items():
            lines.append(f"generation, sdpa_backends={spec}: {g['batched_images_per_s']:.2f} img/s batched, "
                         f"{g['plain_images_per_s']:.2f} img/s plain")
        lines.append(f"generation: {gen['batched_images_per_s']:.2f} img/s batched (batch {gen['batch']}) vs "
                     f"{gen['plain_images_per_s']:.2f} img/s plain pipeline, one image per call ({gen['ratio']:.2f}x)")
    print("\n".join(lines), flush=True)
    final = dict(results, generation=gen, device=device, model=model)
    print(json.dumps(final), flush=True)
    return final


if __name__ == "__main__":
    main(sys.argv[1:])
