"""trainer.sdpa_backends and trainer.channels_last change how the UNet runs, not what a training step computes;
`erasure.bench --variant` times them beside the plain optimized mode, after an untimed warm-up (docs/PERFORMANCE.md)."""
import pytest
import torch

from tests.conftest import assert_refused_in_one_sentence, build_session

OVR = ["model=tiny", "concept=nudity", "method.T=8", "trainer.iterations=2", "trainer.preview_every=0",
       "trainer.teacher_batch=1"]


def _flags() -> dict:
    b = torch.backends.cuda
    return dict(flash=b.flash_sdp_enabled(), efficient=b.mem_efficient_sdp_enabled(), cudnn=b.cudnn_sdp_enabled(),
                math=b.math_sdp_enabled())


def test_an_unknown_attention_kernel_is_refused_in_one_sentence():
    assert_refused_in_one_sentence(OVR + ["trainer.sdpa_backends=flash+cudnnn"],
                                   r"trainer.sdpa_backends=flash\+cudnnn is not valid")


def test_every_attention_call_of_a_training_step_runs_with_only_the_named_kernels(monkeypatch):
    session, _, _ = build_session(OVR + ["trainer.sdpa_backends=flash+efficient"])
    before = _flags()
    assert all(before.values())  # PyTorch's default: every kernel allowed
    real = torch.nn.functional.scaled_dot_product_attention
    seen = []

    def spy(*a, **k):
        seen.append(_flags())
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)  # diffusers' AttnProcessor2_0
    session.step(1)
    assert len(seen) > 10  # the teacher's trajectory and the student's forward
    assert all(f == dict(flash=True, efficient=True, cudnn=False, math=False) for f in seen)
    assert _flags() == before  # restored after the step


def test_channels_last_convolutions_train_the_same_step():
    out = {}
    for cl in (False, True):
        session, models, _ = build_session(OVR + [f"trainer.channels_last={str(cl).lower()}"])
        conv = models.unet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == cl and conv.is_contiguous() != cl
        loss = session.step(1)["loss"]
        out[cl] = loss, {n: p.detach().clone() for n, p in session.trainable.items()}
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-4, atol=1e-6)
    for name, value in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], value, rtol=1e-4, atol=1e-6)


def test_bench_times_each_variant_from_the_base_weights_after_a_warm_up(monkeypatch):
    from erasure import bench

    from erasure.session import Session

    real, calls, formats = bench.time_training, [], []
    create = Session.create.__func__

    def spy(models, base_state, overrides, iterations, profile=None):
        calls.append((iterations, [o for o in overrides if o.startswith("trainer.")]))
        return real(models, base_state, overrides, iterations, profile)

    def spy_create(cls, cfg, models, *a, **k):  # each timed session starts from the default memory format
        formats.append(models.unet.conv_in.weight.is_contiguous())
        return create(cls, cfg, models, *a, **k)

    monkeypatch.setattr(bench, "time_training", spy)
    monkeypatch.setattr(Session, "create", classmethod(spy_create))
    out = bench.main(["--model", "tiny", "--methods", "ours", "--iterations", "2", "--teacher-batch", "2",
                      "--reference-iterations", "0", "--skip-generation", "--warmup-iterations", "1",
                      "--variant", "cl=trainer.channels_last=true", "--variant", "math=trainer.sdpa_backends=math"])
    r = out["ours"]
    assert calls == [
        (1, ["trainer.device=auto", "trainer.teacher_batch=2"]),  # the warm-up, untimed
        (2, ["trainer.device=auto", "trainer.teacher_batch=2"]),
        (2, ["trainer.device=auto", "trainer.teacher_batch=2", "trainer.channels_last=true"]),
        (2, ["trainer.device=auto", "trainer.teacher_batch=2", "trainer.sdpa_backends=math"])]
    assert formats == [True] * 4  # the channels-last variant did not leak into the next
    assert r["warmup_iterations"] == 1 and set(r["variants"]) == {"cl", "math"}
    for v in r["variants"].values():
        assert v["ratio_to_optimized"] == pytest.approx(r["s_per_it_optimized"] / v["s_per_it"], rel=2e-3)
