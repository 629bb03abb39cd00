"""trainer.teacher_batch=n (teacher work in bulk) against the one-at-a-time reference (teacher_batch=1)."""
import pytest
import torch

from erasure.delta import read_delta
from erasure.trainer import train
from tests.conftest import compose_cfg
from tests.test_ours import _method

OVR = ["method.T=8", "method.lr=1e-3"]


def test_batched_teacher_work_gives_the_same_z_t_and_targets():
    ref, *_ = _method(OVR)
    bat, *_ = _method(OVR)
    steps = range(1, 7)
    one_by_one = [ref.teacher_work([ref.draw(s)])[0] for s in steps]
    batched = bat.teacher_work([bat.draw(s) for s in steps])
    ts = sorted({d["timestep"].item() for d in batched})
    assert len(ts) > 1  # the batch really mixes different stopping steps
    for a, b in zip(one_by_one, batched):
        assert a["target_index"] == b["target_index"] and int(a["timestep"]) == int(b["timestep"])
        for key in ("z_t", "guidance_target", "teacher_u"):
            # batched kernels round differently; targets are scaled by gamma1 = 7.5
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4)


def test_same_trained_delta_in_both_modes(tmp_path):
    deltas = {}
    for n in (1, 5):
        # adam_eps=1e-4: on a random tiny model many gradient entries are ~1e-9, where Adam's g/(|g|+eps)
        # turns float-rounding noise into full +-lr steps; a larger eps keeps the comparison about the method.
        cfg = compose_cfg(["model=tiny", "concept=nudity", "trainer.iterations=6", "trainer.preview_every=0",
                           f"trainer.teacher_batch={n}", "method.adam_eps=1e-4", *OVR])
        train(cfg, tmp_path / f"tb{n}")
        deltas[n] = read_delta(tmp_path / f"tb{n}")[0]
    assert deltas[1].keys() == deltas[5].keys()
    for name in deltas[1]:
        torch.testing.assert_close(deltas[1][name], deltas[5][name], rtol=1e-4, atol=1e-5)
    # and training moved the weights by far more than that tolerance
    from erasure.models import load_models

    m = load_models(compose_cfg(["model=tiny"]).model, "cpu")
    named = dict(m.unet.named_parameters())
    moved = max((deltas[1][n] - named[n].detach()).abs().max().item() for n in deltas[1])
    assert moved > 1e-3  # 100x the tolerance


def test_skipping_inactive_instruction_conditions_changes_nothing():
    """Only the instruction concepts inside their window (and after the warm-up) go through the UNet; the result
    equals the plain route that evaluates every condition at every step and lets delta ignore the idle ones."""
    from erasure.sampling import eps_all, sample_to_step

    m, *_ = _method(OVR)
    draws = [m.draw(s) for s in range(1, 9)]
    work = m.teacher_work(draws)
    ctx, cfg = m.ctx, m.cfg
    assert any(not m.active(cfg.T - d["t"]) for d in draws) and any(m.active(cfg.T - d["t"]) for d in draws)
    calls = {"rows": 0}
    real = ctx.teacher

    def counting(x, t, e):
        calls["rows"] += x.shape[0]
        return real(x, t, e)

    for d, w in zip(draws, work):  # the plain route, one draw at a time, every condition everywhere
        conds = [m.emb_uncond, m.emb_targets[d["target_index"]: d["target_index"] + 1], *m.emb_instr.split(1)]
        steps = cfg.T - d["t"]
        z, ts = sample_to_step(counting, ctx.models.scheduler, d["x_T"], conds, [steps], cfg.T, cfg.gamma1,
                               extra=m.delta)
        eps = eps_all(counting, z, ts, conds)
        target = cfg.gamma1 * (eps[1] - eps[0])
        delta = m.delta(steps, eps)
        target = target if delta is None else target + delta
        torch.testing.assert_close(w["z_t"], z, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(w["guidance_target"], target, rtol=1e-4, atol=1e-4)
    plain = calls["rows"]
    calls["rows"] = 0
    m.ctx.teacher = counting
    try:
        m.teacher_work(draws)
    finally:
        m.ctx.teacher = real
    assert calls["rows"] < plain  # and it really evaluated fewer UNet rows


def test_esd_with_teacher_sampling_trains_the_same_delta_batched(tmp_path):
    """ESD's esd_sd.py option (z_t sampled by the frozen base) batches its trajectories; train-esd.py's student
    sampling cannot, and stays one at a time (the bank is not used)."""
    from erasure.models import load_models
    from erasure.config import validate
    from erasure.session import Session

    deltas = {}
    for n in (1, 4):
        cfg = compose_cfg(["model=tiny", "concept=nudity", "method=esd", "method.sampler=teacher", "method.ddim_steps=6",
                           "method.lr=1e-3", "method.adam_eps=1e-4", "trainer.iterations=4", "trainer.preview_every=0",
                           f"trainer.teacher_batch={n}"])
        train(cfg, tmp_path / f"esd{n}")
        deltas[n] = read_delta(tmp_path / f"esd{n}")[0]
    for name in deltas[1]:
        torch.testing.assert_close(deltas[1][name], deltas[4][name], rtol=1e-4, atol=1e-5)
    cfg = compose_cfg(["model=tiny", "concept=nudity", "method=esd", "method.ddim_steps=6", "trainer.teacher_batch=4"])
    models = load_models(cfg.model, "cpu")
    named = dict(models.unet.named_parameters())
    assert max((deltas[1][n] - named[n].detach()).abs().max().item() for n in deltas[1]) > 1e-3  # it trained
    cls, mcfg = validate(cfg)
    session = Session.create(cfg, models, cls, mcfg)
    assert session.method.supports_teacher_bank is False and session.step_fn == session.method.training_step


def hand_teacher_rows(iterations: int) -> float:
    """Teacher UNet rows per iteration of `ours` on nudity (T = 35, warm-up 5, three instruction concepts in the
    window [floor(0.35 T), T] = [12, 35]), counted by hand for the draws t ~ U{1..T} the run's generator makes
    (trainer.seed 0): each of the T - t sampling steps k evaluates ∅, c and the instruction concepts active at k,
    and the target at z_t evaluates ∅, c and those active at T - t."""
    from tests.test_method_steps import randint

    g = torch.Generator().manual_seed(0)
    rows = 0
    for _ in range(iterations):
        t = randint(g, 1, 36)
        randint(g, 0, 1)  # the target's index (one target)
        torch.randn((1, 4, 16, 16), generator=g)  # x_T
        active = lambda k: 3 if k >= 12 else 0  # noqa: E731  (past the warm-up and inside the window)
        rows += sum(2 + active(k) for k in range(35 - t)) + 2 + active(35 - t)
    return rows / iterations


@pytest.mark.slow  # a benchmark run (about 35 s on 2 cores); the bank's correctness: test_same_trained_delta_in_both_modes
def test_bench_prints_the_table_and_json_with_the_teacher_accounting(capsys):
    """`python -m erasure.bench` on the tiny model: one JSON line keyed by method with the issue's fields; both modes
    evaluate the teacher rows counted by hand (the bank batches the work, it does not change it); the derived
    figures are the formulas the table prints, on its own timings."""
    import json

    from erasure import bench

    out = bench.main(["--model", "tiny", "--methods", "ours,fmn", "--iterations", "4", "--baseline-iterations", "2",
                      "--skip-generation", "--concept", "nudity"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == json.loads(json.dumps(out))
    assert any(line.startswith("ceiling: the speed-up if the teacher's work cost nothing") for line in printed[:-1])
    ours = out["ours"]
    assert (ours["iterations"], ours["reference_iterations"], ours["teacher_batch"], ours["batched"]) == (4, 4, 4, True)
    assert ours["teacher_rows_per_it_reference"] == ours["teacher_rows_per_it_optimized"] == hand_teacher_rows(4)
    ref, opt = ours["s_per_it_reference"], ours["s_per_it_optimized"]
    assert ours["speedup"] == pytest.approx(ref / opt, abs=0.01)
    assert ours["it_per_s_optimized"] == pytest.approx(1 / opt, rel=1e-3)
    assert ours["seconds_optimized"] == pytest.approx(4 * opt, abs=0.01)
    assert 0 < ours["teacher_s_per_it_optimized"] < opt
    rest = opt - ours["teacher_s_per_it_optimized"]
    assert ours["ceiling"] == pytest.approx(ref / rest, rel=0.02)
    floor = ours["teacher_rows_per_it_optimized"] * ours["unet_gflop_per_row"] / ours["matmul_peak_gflops"]
    assert ours["teacher_floor_s_per_it"] == pytest.approx(floor, rel=0.02)
    assert ours["arithmetic_bound"] == pytest.approx(ref / (rest + floor), rel=0.02)
    fmn = out["fmn"]  # FMN never asks the teacher, and its sampler cannot be batched
    assert fmn["teacher_rows_per_it_optimized"] == 0 and not fmn["batched"] and fmn["iterations"] == 2


def test_teacher_counts_and_freezes_both_its_unet_and_text_encoder_copies():
    """The teacher's size (reported beside the student's in the bench and the run log) is its frozen UNet tensors
    plus its frozen text-encoder tensors, counted by hand here; the copies do not follow the student's later steps."""
    from erasure.models import load_models
    from erasure.teacher import Teacher

    models = load_models(compose_cfg(["model=tiny"]).model, "cpu")
    unet = dict(models.unet.named_parameters())
    text = dict(models.text_encoder.named_parameters())
    chosen_unet, chosen_text = list(unet)[:3], list(text)[:2]
    trainable = {**{n: unet[n] for n in chosen_unet}, **{f"text_encoder.{n}": text[n] for n in chosen_text}}
    teacher = Teacher(models.unet, trainable, text_encoder=models.text_encoder)
    assert teacher.numel() == sum(unet[n].numel() for n in chosen_unet) + sum(text[n].numel() for n in chosen_text)
    assert set(teacher.params) == set(chosen_unet) and set(teacher.text_params) == set(chosen_text)
    with torch.no_grad():
        unet[chosen_unet[0]].add_(1.0)
    assert not teacher.params[chosen_unet[0]].equal(unet[chosen_unet[0]])
    with pytest.raises(ValueError, match="need the text encoder"):
        Teacher(models.unet, trainable)
