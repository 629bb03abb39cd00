"""Robust All-but-One (``method=ours method.adversarial=true``): when the attack runs, the adversarial prompt's
concept term recomputed by hand from separate copies of the base model, the total loss, and the settings check."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from erasure.adversarial import encode_embeddings
from tests.conftest import assert_refused_in_one_sentence, build_session

SMALL = ["model=tiny", "concept=circle", "method=ours", "method.T=4", "method.adversarial=true", "method.adv_steps=3",
         "method.adv_warmup=2", "method.adv_every=3", "lambda=2"]


def session(extra=()):
    sess, models, _ = build_session([*SMALL, *extra])
    return sess, models


def test_attack_schedule_and_concept_term_by_hand():
    sess, models = session()
    unet0, te0 = copy.deepcopy(models.unet), copy.deepcopy(models.text_encoder)
    method = sess.method
    seen = []
    for step in range(1, 6):
        work = method.teacher_work([method.draw(step)])[0]
        terms = method.student_loss(work)
        seen.append("concept_adv" in terms)
        if step == 2:  # the first attack (adv_warmup 2): its term, recomputed with the base copies
            prompt = method.adv_prompts[work["target_index"]]
            assert len(prompt.losses) == 3 and prompt.adv.shape == (1, 1, te0.config.hidden_size)
            hidden = encode_embeddings(te0, prompt.input_ids, prompt.embeds).detach()
            ids = models.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
            with torch.no_grad():
                emb_u = te0(ids)[0]
                eps_adv = unet0(work["z_t"], work["timestep"], encoder_hidden_states=hidden).sample
                eps_u = unet0(work["z_t"], work["timestep"], encoder_hidden_states=emb_u).sample
            expected = ((7.5 * (eps_adv - eps_u) - work["guidance_target"]) ** 2).mean()
            assert terms["concept_adv"].item() == pytest.approx(expected.item(), rel=1e-4)
            total = terms["concept"] + 2 * terms["penalty"] + terms["concept_adv"]
            assert terms["loss"].item() == pytest.approx(total.item(), rel=1e-6)
            # the attack's objective at its final prompt: the student with the adversarial prompt against the
            # teacher's concept prediction (eps*(z_t, t, c)); lower than with the prompt's first embeddings
            emb_c = te0(models.tokenizer(["a circle"], padding="max_length", max_length=77,
                                         return_tensors="pt").input_ids)[0].detach()
            with torch.no_grad():
                target = unet0(work["z_t"], work["timestep"], encoder_hidden_states=emb_c).sample
            final = F.mse_loss(eps_adv, target).item()
            assert final < prompt.losses[0]
    # no attack before iteration 2; the prompt is kept between attacks (iterations 2 and 5) and used every iteration
    assert seen == [False, True, True, True, True]
    assert method.adv_step == 5


def test_plain_ours_is_unchanged_by_the_option_being_off():
    on, _ = session(["method.adv_warmup=100"])  # on, but before its first attack: the plain loss
    off, _ = session(["method.adversarial=false"])
    a = on.method.student_loss(on.method.teacher_work([on.method.draw(1)])[0])
    b = off.method.student_loss(off.method.teacher_work([off.method.draw(1)])[0])
    assert set(a) == set(b) == {"loss", "concept", "penalty"}
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_bad_adversarial_settings_refused():
    assert_refused_in_one_sentence([*SMALL, "method.adv_every=0"], "method.adv_every must be at least 1")
    assert_refused_in_one_sentence([*SMALL, "method.adv_lr=-1"], "method.adv_lr a positive number")


def test_the_attack_reruns_every_adv_every_iterations_warm_started(monkeypatch):
    """Attacks at iterations 2, 5, 8 (adv_warmup 2, adv_every 3); each after the first starts from the target's last
    adversarial embeddings, and every attack holds the trained UNet weights frozen (AdvUnlearn's inner loop as the
    method uses it)."""
    import erasure.allbutone.ours as ours_module

    sess, _ = session()
    method = sess.method
    real, calls, after = ours_module.soft_prompt_attack, [], {}

    def spy(text_encoder, tokenizer, prompt, init, *args, **kwargs):
        calls.append((method.adv_step, init.detach().clone(), {id(p) for p in kwargs["frozen"]}))
        return real(text_encoder, tokenizer, prompt, init, *args, **kwargs)

    monkeypatch.setattr(ours_module, "soft_prompt_attack", spy)
    for step in range(1, 9):
        method.student_loss(method.teacher_work([method.draw(step)])[0])
        if 0 in method.adv_prompts:
            after[step] = method.adv_prompts[0].adv.detach().clone()
    assert [c[0] for c in calls] == [2, 5, 8]
    assert torch.equal(calls[1][1], after[4]) and torch.equal(calls[2][1], after[7])  # warm starts
    assert not torch.equal(after[4], after[5])  # and the attack moved it
    assert all(c[2] == {id(p) for p in sess.method.ctx.trainable.values()} and c[2] for c in calls)


def test_each_target_is_attacked_from_run_generator_words_against_its_own_teacher_prediction(monkeypatch):
    """Two targets, an attack every iteration: a target's first attack starts from k vocabulary words drawn with the
    run's generator (``random_prefix`` on a copy of its state taken before the step), and the attack's objective is
    MSE(eps_student(z_t, t, h), eps*(z_t, t, c_i)) with the teacher on that target's row alone, checked at a fixed
    encoding h against the base copies."""
    import erasure.allbutone.ours as ours_module
    from erasure.adversarial import random_prefix

    sess, models = session(["concept.targets=[a circle,an oval]", "method.adv_warmup=1", "method.adv_every=1",
                            "method.adv_steps=1"])
    unet0, te0 = copy.deepcopy(models.unet), copy.deepcopy(models.text_encoder)
    method, real, calls = sess.method, ours_module.soft_prompt_attack, []

    def spy(text_encoder, tokenizer, prompt, init, steps, lr, loss_fn, **kwargs):
        calls.append((prompt, init.detach().clone(), loss_fn))
        return real(text_encoder, tokenizer, prompt, init, steps, lr, loss_fn, **kwargs)

    monkeypatch.setattr(ours_module, "soft_prompt_attack", spy)

    def encode(text):
        ids = models.tokenizer([text], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return te0(ids)[0]

    first, checked = {}, set()
    for step in range(1, 7):
        work = method.teacher_work([method.draw(step)])[0]
        state = method.ctx.generator.get_state()
        method.student_loss(work)
        prompt, init, loss_fn = calls[-1]
        assert prompt == method.targets[work["target_index"]]
        if prompt not in first:  # the first attack of this target: fresh words from the run's generator
            first[prompt] = init
            expected = random_prefix(te0, method.cfg.adv_tokens, torch.Generator().set_state(state))
            assert torch.equal(init, expected)
        other = "an oval" if prompt == "a circle" else "a circle"
        with torch.no_grad():  # no optimizer step in this loop: the student is still the base model
            hand = F.mse_loss(unet0(work["z_t"], work["timestep"], encoder_hidden_states=encode(other)).sample,
                              unet0(work["z_t"], work["timestep"], encoder_hidden_states=encode(prompt)).sample)
            assert loss_fn(encode(other)).item() == pytest.approx(hand.item(), rel=1e-5)
        checked.add(work["target_index"])
    assert checked == {0, 1} and len(calls) == 6


def test_plain_ours_never_attacks():
    """method.adversarial=false: however many iterations pass the attack's warm-up, no adversarial prompt is made
    and the loss keeps its two terms."""
    sess, _ = session(["method.adversarial=false", "method.adv_warmup=1", "method.adv_every=1"])
    method = sess.method
    for step in range(1, 4):
        terms = method.student_loss(method.teacher_work([method.draw(step)])[0])
        assert set(terms) == {"loss", "concept", "penalty"}
    assert method.adv_step == 0 and method.adv_prompts == {}
