"""AdvUnlearn and the trainable text encoder: the inner attack against a hand-written Adam loop, the erasing and
retain losses recomputed from the draws with separate copies of the base model, text-encoder subsets, the delta
with text-encoder tensors (format, fingerprint, generation) and a resumed run."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines.esd import compvis_ddim_timesteps, compvis_steps_taken
from erasure.adversarial import encode_embeddings, insert_prefix, prompt_ids, soft_prompt_attack
from erasure.delta import apply_delta, read_delta, save_delta
from erasure.errors import UserError
from erasure.generation import Sampler, generate
from erasure.models import load_models, module_fingerprint
from erasure.sampling import sample_along
from tests.conftest import assert_refused_in_one_sentence, build_session, compose_cfg, run_cli

SMALL = ["model=tiny", "concept=circle", "method=advunlearn", "method.ddim_steps=4", "method.attack_step=3",
         "method.warmup_iter=1", "method.retain_batch=2"]


def session(extra: list[str] = ()):
    return build_session([*SMALL, *extra])


def base_copies(models):
    """Independent copies of the base UNet and text encoder (taken before any step): the second route's teacher."""
    return copy.deepcopy(models.unet), copy.deepcopy(models.text_encoder)


def encode(text_encoder, tokenizer, texts):
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0].float()


def guided_z(unet, models, draw, emb_u, emb_c, ddim_steps, guidance):
    """z of a CompVis draw by a second route: the sampler run along ldm's schedule with ``unet``."""
    n = 1000
    steps = compvis_steps_taken(draw["t_enc"], ddim_steps, n)
    z, _ = sample_along(lambda x, t, e: unet(x, t, encoder_hidden_states=e).sample, models.scheduler, draw["x_T"],
                        [emb_u, emb_c], compvis_ddim_timesteps(ddim_steps, n), [steps] * draw["x_T"].shape[0],
                        ddim_steps, guidance)
    return z


# ---------------------------------------------------------------- text-encoder parameter subsets

def test_text_encoder_subsets_select_encoder_layers_only(tiny_models):
    from erasure.params import select_params

    full = select_params(tiny_models.unet, compose_cfg(["params=text_encoder_full"]).params, tiny_models.text_encoder)
    layer0 = select_params(tiny_models.unet, compose_cfg(["params=text_encoder_layer0"]).params, tiny_models.text_encoder)
    te = dict(tiny_models.text_encoder.named_parameters())
    expected = {f"text_encoder.{n}" for n in te if n.split(".")[0] in ("encoder", "final_layer_norm")
                or n.startswith(("text_model.encoder.", "text_model.final_layer_norm."))}
    assert set(full) == expected and not any("embedding" in n for n in full)
    assert set(layer0) == {n for n in expected if ".layers.0." in n} and layer0
    for name, p in full.items():
        assert p is te[name[len("text_encoder."):]]


# ---------------------------------------------------------------- the inner attack

def test_soft_prompt_attack_is_adam_on_accumulated_gradients(tiny_models):
    """attack_util.py never zeroes the embedding's gradient: step s uses the sum of gradients 1..s. A hand-written
    Adam on a quadratic loss of the encoding, with that accumulation, must give the same embeddings and losses."""
    m = tiny_models
    te, tok = m.text_encoder, m.tokenizer
    torch.manual_seed(0)
    init = torch.randn(1, 2, te.config.hidden_size)
    target = torch.randn(1, 77, te.config.hidden_size)

    def loss_fn(hidden):
        return ((hidden - target) ** 2).mean()

    got = soft_prompt_attack(te, tok, "a circle", init, steps=4, lr=0.1, loss_fn=loss_fn)
    ids, n = prompt_ids(tok, "a circle", 2)
    table = te.get_input_embeddings().weight.detach()
    adv = init.clone()
    m1, v1, grad_sum = torch.zeros_like(adv), torch.zeros_like(adv), torch.zeros_like(adv)
    losses = []
    for s in range(1, 5):
        x = adv.clone().requires_grad_(True)
        loss = loss_fn(encode_embeddings(te, ids, insert_prefix(table[ids], x, n)))
        (g,) = torch.autograd.grad(loss, x)
        grad_sum = grad_sum + g
        m1 = 0.9 * m1 + 0.1 * grad_sum
        v1 = 0.999 * v1 + 0.001 * grad_sum ** 2
        adv = adv - 0.1 * (m1 / (1 - 0.9 ** s)) / ((v1 / (1 - 0.999 ** s)).sqrt() + 1e-8)
        losses.append(loss.item())
    torch.testing.assert_close(got.adv, adv, rtol=1e-5, atol=1e-6)
    assert got.losses == pytest.approx(losses, rel=1e-5)
    torch.testing.assert_close(got.embeds, insert_prefix(table[ids], adv, n), rtol=1e-5, atol=1e-6)
    assert all(not p.grad is not None or p.grad.abs().sum() == 0 for p in te.parameters())  # encoder untouched


# ---------------------------------------------------------------- the losses, by a second route

def test_unlearn_loss_on_the_adversarial_prompt_by_hand():
    """After the warm-up the erasing loss is ESD's, with the student's encoding of the adversarial prompt:
    MSE(eps(z, t, E_student([adv, c])), eps*(z, t, ∅) - eta (eps*(z, t, c) - eps*(z, t, ∅))) at t = t_enc_ddpm."""
    sess, models, cfg = session(["method.eta=2.0"])
    unet0, te0 = base_copies(models)
    method = sess.method
    terms = method.training_step(2)  # step 2 = official iteration 1 >= warmup_iter 1: attack, then the loss
    assert "attack_loss" in terms and len(method.adv.losses) == 3
    draw = method.last_draw
    emb_u = encode(te0, models.tokenizer, [""])
    emb_c = encode(te0, models.tokenizer, ["a circle"])
    z = guided_z(unet0, models, draw, emb_u, emb_c, 4, 3.0)
    t = draw["query"]
    with torch.no_grad():
        eu = unet0(z, t, encoder_hidden_states=emb_u).sample
        ec = unet0(z, t, encoder_hidden_states=emb_c).sample
        en = unet0(z, t, encoder_hidden_states=encode_embeddings(te0, method.adv.input_ids, method.adv.embeds)).sample
    expected = ((en - (eu - 2.0 * (ec - eu))) ** 2).mean()
    assert terms["unlearn"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert terms["loss"].item() == pytest.approx(terms["unlearn"].item())  # retain_train iter: nothing added here
    lo, hi = (20 * draw["t_enc"], 20 * draw["t_enc"] + 20) if cfg.method.ddim_steps == 50 else \
        (round(draw["t_enc"] / 4 * 1000), round((draw["t_enc"] + 1) / 4 * 1000))
    assert lo <= int(t) < hi


def test_warmup_uses_the_plain_word():
    sess, models, _ = session(["method.warmup_iter=5"])
    unet0, te0 = base_copies(models)
    method = sess.method
    terms = method.training_step(1)
    assert "attack_loss" not in terms and method.adv is None
    draw = method.last_draw
    emb_u = encode(te0, models.tokenizer, [""])
    emb_c = encode(te0, models.tokenizer, ["a circle"])
    z = guided_z(unet0, models, draw, emb_u, emb_c, 4, 3.0)
    with torch.no_grad():
        t = draw["query"]
        eu, ec = (unet0(z, t, encoder_hidden_states=e).sample for e in (emb_u, emb_c))
    assert terms["unlearn"].item() == pytest.approx(((ec - (eu - (ec - eu))) ** 2).mean().item(), rel=1e-4)


def test_retain_prompts_drawn_without_replacement_until_exhausted():
    sess, _, _ = session(["method.retain_batch=3"])
    method = sess.method
    seen = []
    for _ in range(3):  # 10 retain prompts on the toy circle: 3 + 3 + 3, then a reset
        seen += method._retain_batch()
    assert len(set(seen)) == 9
    method._retain_batch()  # 1 left < 3: all put back first
    assert len(method.unseen) == 7
    method.cfg.retain_batch = 5  # exactly a batch left: it is drawn, not put back
    method.unseen = list(range(10))
    assert len(set(method._retain_batch() + method._retain_batch())) == 10 and method.unseen == []


def test_retain_after_text_encoder_moves_is_the_student_against_the_base():
    """Once the encoder has moved, the retain loss is MSE(eps(z_r, t, E_student(r)), eps*(z_r, t, E_base(r)))."""
    sess, models, _ = session(["method.warmup_iter=5"])
    unet0, te0 = base_copies(models)
    with torch.no_grad():
        for name, p in sess.trainable.items():
            p.add_(0.05 * torch.randn_like(p))
    method = sess.method
    retain = method.followup_loss(1, 0)["retain"]
    picked = [i for i in range(len(method.retain)) if i not in method.unseen]
    draw = method.last_draw
    emb_u = encode(te0, models.tokenizer, [""])
    best = None
    for order in (picked, picked[::-1]):
        texts = [method.retain[i] for i in order]
        emb_r = encode(te0, models.tokenizer, texts)
        emb_n = encode(models.text_encoder, models.tokenizer, texts)  # the moved encoder
        z = guided_z(unet0, models, draw, emb_u, emb_r, 4, 3.0)
        t = draw["query"].expand(2)
        with torch.no_grad():
            value = F.mse_loss(unet0(z, t, encoder_hidden_states=emb_n).sample,
                               unet0(z, t, encoder_hidden_states=emb_r).sample).item()
        best = value if best is None or abs(value - retain.item()) < abs(best - retain.item()) else best
    assert retain.item() > 0 and retain.item() == pytest.approx(best, rel=1e-4)


def test_retain_train_reg_draws_its_own_start_codes_at_the_unlearn_draws_timestep():
    """retain_train reg (get_loss.py l.300-320): in the same step as the erasing loss, the retain loss samples z_r from
    start codes of its own (``retain_batch`` of them, drawn after the retain prompts) at the erasing draw's t_enc and
    query timestep, and the total is unlearn + retain_loss_w * retain. Every draw replayed from a copy of the
    generator; the losses from base copies and the moved encoder."""
    sess, models, _ = session(["method.warmup_iter=5", "method.retain_train=reg", "method.retain_loss_w=0.3"])
    unet0, te0 = base_copies(models)
    with torch.no_grad():  # move the encoder so that the retain loss is not zero
        for name, p in sess.trainable.items():
            p.add_(0.05 * torch.randn_like(p))
    method = sess.method
    g = torch.Generator()
    g.set_state(method.ctx.generator.get_state())
    terms = method.training_step(1)

    def randint(low, high):
        return int(torch.randint(low, high, (1,), generator=g))

    shape = models.latent_shape
    assert randint(0, 1) == 0  # the word (one target)
    t_enc = randint(0, 4)
    query = randint(round(t_enc / 4 * 1000), round((t_enc + 1) / 4 * 1000))
    x_unlearn = torch.randn((1, *shape), generator=g)
    picked = torch.randperm(10, generator=g)[:2].tolist()
    x_retain = torch.randn((2, *shape), generator=g)
    assert method.ctx.generator.get_state().equal(g.get_state())
    draw = method.last_draw  # the retain draw
    assert draw["t_enc"] == t_enc and int(draw["query"]) == query and draw["x_T"].equal(x_retain)

    texts = [method.retain[i] for i in picked]
    emb_u = encode(te0, models.tokenizer, [""])
    emb_r = encode(te0, models.tokenizer, texts)
    emb_n = encode(models.text_encoder, models.tokenizer, texts)
    z_r = guided_z(unet0, models, {"t_enc": t_enc, "x_T": x_retain}, emb_u, emb_r, 4, 3.0)
    t = torch.tensor([query, query])
    with torch.no_grad():
        retain = F.mse_loss(unet0(z_r, t, encoder_hidden_states=emb_n).sample,
                            unet0(z_r, t, encoder_hidden_states=emb_r).sample)
    assert terms["retain"].item() > 0 and terms["retain"].item() == pytest.approx(retain.item(), rel=1e-4)
    assert terms["loss"].item() == pytest.approx(terms["unlearn"].item() + 0.3 * retain.item(), rel=1e-4)
    # the erasing term used the first start code, not the retain ones
    emb_c = encode(te0, models.tokenizer, ["a circle"])
    z = guided_z(unet0, models, {"t_enc": t_enc, "x_T": x_unlearn}, emb_u, emb_c, 4, 3.0)
    with torch.no_grad():
        eu, ec = (unet0(z, t[:1], encoder_hidden_states=e).sample for e in (emb_u, emb_c))
        en = unet0(z, t[:1], encoder_hidden_states=encode(models.text_encoder, models.tokenizer, ["a circle"])).sample
    assert terms["unlearn"].item() == pytest.approx(((en - (eu - (ec - eu))) ** 2).mean().item(), rel=1e-4)


@pytest.mark.parametrize("attack_init, attack_method", [("latest", "pgd"), ("random", "fast_at")])
def test_each_attack_starts_from_the_latest_prompt_or_a_fresh_random_one(attack_init, attack_method, monkeypatch):
    """attack_util.py init_adv: the first attack starts from k vocabulary embeddings drawn from the generator (replayed
    here: the word, then the token ids); later ones from the previous attack's result (attack_init latest) or from
    new random tokens (random). The attack runs on the current word's own embedding (the target's row)."""
    import baselines.advunlearn as advunlearn_module
    from erasure.adversarial import soft_prompt_attack as real_attack

    seen = []

    def recording_attack(text_encoder, tokenizer, prompt, init, *args, **kwargs):  # the real attack, its inputs kept
        seen.append((prompt, init.clone()))
        assert kwargs["method"] == attack_method and {id(p) for p in kwargs["frozen"]} == \
            {id(p) for p in sess.trainable.values()}  # the trained weights held still during the attack
        return real_attack(text_encoder, tokenizer, prompt, init, *args, **kwargs)

    monkeypatch.setattr(advunlearn_module, "soft_prompt_attack", recording_attack)
    sess, models, _ = session([f"method.attack_init={attack_init}", "method.adv_prompt_num=2",
                               f"method.attack_method={attack_method}"])
    method = sess.method
    table = models.text_encoder.get_input_embeddings().weight.detach()
    method.training_step(1)  # warm-up (iteration 0 < warmup_iter 1): no attack
    assert seen == []
    g = torch.Generator()
    g.set_state(method.ctx.generator.get_state())
    method.training_step(2)
    assert int(torch.randint(0, 1, (1,), generator=g)) == 0  # the word
    first = table[torch.randint(0, table.shape[0], (2,), generator=g)][None]
    assert seen[0][0] == "a circle" and seen[0][1].equal(first)
    latest = method.adv.adv.detach().clone()
    assert not latest.equal(first)  # the attack moved it
    method.training_step(3)
    assert seen[1][1].equal(latest) is (attack_init == "latest")
    if attack_init == "random":
        rows = seen[1][1][0]  # each a row of the vocabulary table, and not the first attack's tokens again
        assert bool((rows[:, None, :] == table[None]).all(-1).any(-1).all()) and not rows.equal(first[0])


@pytest.mark.parametrize("retain_train, steps", [("iter", 3), ("reg", 1)])
def test_retain_train_iter_adds_its_optimizer_steps_and_reg_does_not(retain_train, steps):
    """AdvUnlearn.py l.165-195: retain_train iter follows each erasing step with retain_step retain-only optimizer steps
    (here 2: three AdamW updates per iteration, the last reported as ``retain``); reg puts the retain loss in the one
    step's loss."""
    sess, _, _ = session([f"method.retain_train={retain_train}", "method.retain_step=2"])
    terms = sess.step(1)
    assert "retain" in terms and "unlearn" in terms
    counts = {int(state["step"]) for state in sess.optimizer.state.values()}
    assert counts == {steps}


# ---------------------------------------------------------------- training, delta, generation

def test_training_moves_only_the_text_encoder_and_the_delta_carries_it(tmp_path):
    run = tmp_path / "run"
    r = run_cli(["-m", "erasure.train", *SMALL, "trainer.iterations=3", "trainer.preview_every=0", "method.lr=1e-3",
                 f"hydra.run.dir={run}"])
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = compose_cfg(SMALL)
    tensors, meta = read_delta(run)
    assert meta["format"] == "erasure-delta/3" and all(n.startswith("text_encoder.") for n in tensors)
    base = load_models(cfg.model, "cpu")
    assert meta["text_encoder_fingerprint"] == base.text_encoder_fingerprint
    te0 = {n: p.detach().clone() for n, p in base.text_encoder.named_parameters()}
    moved = [n for n, t in tensors.items() if not torch.equal(t, te0[n[len("text_encoder."):]])]
    assert moved  # the encoder trained
    sampler = Sampler(base.generation_scheduler, steps=2, guidance=7.5, resolution=base.resolution, batch_size=2)
    before = generate(base, ["a circle"], sampler, seeds=[0])
    with_delta = generate(base, ["a circle"], sampler, seeds=[0], params=tensors)
    assert not np.array_equal(before, with_delta)  # generation swaps the encoder in
    assert np.array_equal(before, generate(base, ["a circle"], sampler, seeds=[0]))  # and out again
    apply_delta(base, run / "delta.safetensors")
    assert np.array_equal(with_delta, generate(base, ["a circle"], sampler, seeds=[0]))
    trained = {n: p for n, p in base.text_encoder.named_parameters()}
    for n, t in tensors.items():
        torch.testing.assert_close(trained[n[len("text_encoder."):]], t)


def test_delta_on_another_text_encoder_is_refused(tmp_path, tiny_models):
    params = {"text_encoder.encoder.layers.0.mlp.fc1.bias": torch.zeros_like(
        dict(tiny_models.text_encoder.named_parameters())["encoder.layers.0.mlp.fc1.bias"])}
    path = tmp_path / "delta.safetensors"
    save_delta(path, params, {"base_model": "tiny", "base_fingerprint": tiny_models.fingerprint,
                              "text_encoder_fingerprint": "0123456789abcdef", "method": "advunlearn"})
    with pytest.raises(UserError, match="text encoder fingerprint 0123456789abcdef"):
        apply_delta(tiny_models, path)
    with pytest.raises(ValueError, match="text_encoder_fingerprint"):
        save_delta(path, params, {"base_model": "tiny", "base_fingerprint": tiny_models.fingerprint})


def test_text_encoder_fingerprint_sees_one_weight(tiny_cfg):
    a = load_models(tiny_cfg.model, "cpu")
    b = load_models(tiny_cfg.model, "cpu")
    with torch.no_grad():
        next(b.text_encoder.parameters()).view(-1)[0] += 1e-3
    # computed at load time (before any training), so the attribute keeps the base's value; the hash sees the change
    assert b.text_encoder_fingerprint == a.text_encoder_fingerprint
    assert module_fingerprint(b.text_encoder) != a.text_encoder_fingerprint
    assert module_fingerprint(a.text_encoder) == a.text_encoder_fingerprint and a.fingerprint == b.fingerprint


def test_kill_and_resume_is_bit_identical(tmp_path):
    """SIGKILL past the warm-up (an adversarial prompt and half-drawn retain prompts in the method's state), resume:
    the same delta, byte for byte, as an uninterrupted run."""
    from tests.test_resume import _kill_resume_compare

    _kill_resume_compare(tmp_path, ["method=advunlearn", "method.ddim_steps=4", "method.attack_step=2",
                                    "method.warmup_iter=2", "method.retain_batch=2"])


def test_bad_settings_refused():
    assert_refused_in_one_sentence([*SMALL, "method.retain_train=both"], "method.retain_train must be one of")
    assert_refused_in_one_sentence([*SMALL, "method.attack_step=0"], "method.attack_step must be at least 1")
    assert_refused_in_one_sentence(["model=tiny", "concept=red", "method=advunlearn"], "needs retain prompts")


def test_with_several_targets_each_attack_runs_on_the_word_drawn_for_its_round(monkeypatch):
    """AdvUnlearn.py l.80: every adv_prompt_update_step iterations one target word is drawn (random.sample(words, 1);
    here the generator's randint, replayed before each step) and the attack runs on that word's prompt; the unlearn
    step then uses that word's embedding."""
    import baselines.advunlearn as advunlearn_module
    from erasure.adversarial import soft_prompt_attack as real_attack

    seen = []

    def recording_attack(text_encoder, tokenizer, prompt, *args, **kwargs):
        seen.append(prompt)
        return real_attack(text_encoder, tokenizer, prompt, *args, **kwargs)

    monkeypatch.setattr(advunlearn_module, "soft_prompt_attack", recording_attack)
    words = ["a circle", "a round shape", "a ring"]
    sess, models, _ = session(["concept.targets=[" + ",".join(f"'{w}'" for w in words) + "]", "method.warmup_iter=0",
                               "method.attack_step=1", "method.adv_prompt_update_step=1"])
    method = sess.method
    assert method.emb_targets.shape[0] == 3
    drawn = []
    for step in range(1, 9):
        g = torch.Generator()
        g.set_state(method.ctx.generator.get_state())
        drawn.append(int(torch.randint(0, 3, (1,), generator=g)))
        method.training_step(step)
        assert method.word == drawn[-1]
    assert seen == [words[w] for w in drawn] and len(set(drawn)) > 1
    rows = encode(models.text_encoder, models.tokenizer, words)
    assert torch.allclose(method.emb_targets.float(), rows, atol=1e-5)  # row w is word w's own embedding


def test_retain_prompts_come_from_the_list_then_the_file_found_from_the_repository(tmp_path, monkeypatch):
    """``advunlearn:`` section: ``retain_prompts`` first, then the ``prompt`` column of ``retain_file`` (the shipped
    coco_object set, relative to the repository from any working directory, or an absolute path); a missing file, a
    file without the column, or no prompts at all are refused in one sentence."""
    from baselines.advunlearn import retain_prompts
    from tests.conftest import ROOT

    monkeypatch.chdir(tmp_path)  # a relative retain_file is the repository's, not the working directory's
    shipped = compose_cfg(["model=tiny", "concept=nudity", "method=advunlearn"]).concept
    lines = (ROOT / shipped.advunlearn.retain_file).read_text().splitlines()
    assert lines[0] == "case_num,source,prompt"
    want = [line.split(",", 2)[2] for line in lines[1:]]
    assert len(want) == 243 and want[0] == "a photo of chair"
    assert retain_prompts(shipped) == want

    own = tmp_path / "own.csv"
    own.write_text("prompt,note\na red car,x\n\"a dog, sitting\",y\n")
    concept = compose_cfg(["model=tiny", "concept=nudity", "method=advunlearn", f"concept.advunlearn.retain_file={own}",
                           "+concept.advunlearn.retain_prompts=[a tree]"]).concept
    assert retain_prompts(concept) == ["a tree", "a red car", "a dog, sitting"]

    def refused(overrides, words):
        c = compose_cfg(["model=tiny", "concept=nudity", "method=advunlearn", *overrides]).concept
        with pytest.raises(UserError, match=words) as err:
            retain_prompts(c)
        assert "\n" not in str(err.value)

    refused(["concept.advunlearn.retain_file=data/prompts/train/nothing_here.csv"], "does not exist")
    (tmp_path / "bad.csv").write_text("text\na red car\n")
    refused([f"concept.advunlearn.retain_file={tmp_path / 'bad.csv'}"], "has no 'prompt' column")
    (tmp_path / "empty.csv").write_text("prompt\n")
    refused([f"concept.advunlearn.retain_file={tmp_path / 'empty.csv'}"], "has no 'prompt' column")
    refused(["concept.advunlearn.retain_file=null"], "method advunlearn needs retain prompts")


def test_attack_rounds_are_counted_and_between_rounds_before_the_first_the_plain_word_is_used():
    """adv_prompt_update_step 2 with warm-up 1 (AdvUnlearn.py l.74-80): iteration 1 is past the warm-up but draws no
    attack, so it still unlearns on the plain word; the rounds (checkpointed) count the attacks."""
    sess, _, _ = session(["method.adv_prompt_update_step=2"])
    method = sess.method
    rounds = []
    for step in range(1, 6):
        terms = method.training_step(step)
        rounds.append((method.attack_round, "attack_loss" in terms, method.adv is None))
    assert rounds == [(0, False, True), (0, False, True), (1, True, False), (1, False, False), (2, True, False)]
    assert method.state_dict()["attack_round"] == 2


def test_ddim_steps_two_is_the_fewest_accepted():
    """The attack and the erasing draw sample z along ldm's DDIM schedule, which needs two steps; called on the class
    (erasure.config.validate memoises what it accepted)."""
    from baselines.advunlearn import AdvUnlearn, AdvUnlearnConfig

    AdvUnlearn.validate(AdvUnlearnConfig(ddim_steps=2))
    with pytest.raises(UserError, match="method.ddim_steps must be at least 2, got 1"):
        AdvUnlearn.validate(AdvUnlearnConfig(ddim_steps=1))


def test_the_teachers_base_params_draw_the_base_model_while_the_text_encoder_is_trained_in_place():
    """The run's probe draws its 'before' images and the SSIM reference with ``teacher.base_params`` swapped in. For a
    text-encoder method these must hold the frozen text-encoder copies too: with the UNet's alone the images came
    from the trained encoder (AdvUnlearn's toy probe read 'before' = 'after' and SSIM 1.0)."""
    sess, models, _ = session()
    sampler = Sampler(models.generation_scheduler, steps=2, guidance=7.5, resolution=models.resolution, batch_size=2)
    base = generate(models, ["a circle"], sampler, seeds=[0])
    teacher = sess.teacher
    assert teacher.text_params and set(teacher.base_params) == set(sess.trainable)
    with torch.no_grad():
        for p in sess.trainable.values():
            p.add_(0.05 * torch.randn_like(p))
    moved = generate(models, ["a circle"], sampler, seeds=[0])
    assert not np.array_equal(moved, base)
    assert np.array_equal(generate(models, ["a circle"], sampler, seeds=[0], params=teacher.base_params), base)
    assert not np.array_equal(generate(models, ["a circle"], sampler, seeds=[0], params=teacher.params), base)


def test_a_prompt_past_the_77_token_cut_is_cut_to_what_clip_reads():
    """The student's text ids (retain prompts come from a user's file): a prompt of more than 77 CLIP tokens is cut at
    77, beside a short one padded to 77, and the cut keeps its start."""
    sess, models, _ = session()
    long = "a photo of a cat " + "sitting on a small red chair " * 15
    ids = sess.method._ids([long, "a circle"])
    assert len(models.tokenizer(long).input_ids) > 90
    assert ids.shape == (2, 77)
    assert ids[0, :5].tolist() == models.tokenizer(long).input_ids[:5]
