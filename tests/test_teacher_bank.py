"""trainer.teacher_batch=n (teacher work in bulk) against the one-at-a-time reference (teacher_batch=1)."""
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
