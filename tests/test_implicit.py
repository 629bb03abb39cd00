"""All-but-One's implicit erasing signal (method.signal=implicit): the P2P re-weighting processor, token positions,
the teacher bank with the re-weighted condition, and a short training run."""
import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from omegaconf import OmegaConf

from erasure.allbutone import implicit as p2p
from erasure.errors import UserError
from erasure.allbutone.ours import AllButOne
from tests.conftest import compose_cfg
from tests.test_ours import _method

CIRCLE = ["concept=circle", "method.signal=implicit", "method.implicit.words=[circle]", "method.T=8",
          "method.warmup=1"]


def _tiny():
    from erasure.models import load_models

    return load_models(compose_cfg(["model=tiny"]).model, "cpu")


def test_reweight_one_and_switch_off_give_exactly_the_eps_of_no_processor():
    from erasure.params import select_params
    from erasure.teacher import Teacher, student_eps

    models = _tiny()
    unet = models.unet
    torch.manual_seed(0)
    x, t = torch.randn(2, *models.latent_shape), torch.tensor([501, 21])
    emb = models.encode_text(["a circle", "a red circle"])
    teacher = Teacher(unet, select_params(unet, compose_cfg(["model=tiny"]).params))
    before, before_teacher = student_eps(unet, x, t, emb), teacher(x, t, emb)
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())

    switch = p2p.TokenReweighting()
    chosen = p2p.install(unet, "all", switch)
    assert chosen and all(name.endswith(".attn2") for name in chosen)
    assert all(isinstance(p, p2p.ReweightAttnProcessor) == (".attn2." in n) for n, p in unet.attn_processors.items())
    ones = torch.stack([p2p.token_weights([2], 77, 1.0), p2p.token_weights([3], 77, 1.0)])
    with switch.on(ones):  # the processor's own computation, with the equalizer 1 at the words
        assert torch.equal(student_eps(unet, x, t, emb), before)
        assert torch.equal(teacher(x, t, emb), before_teacher)
    assert torch.equal(student_eps(unet, x, t, emb), before)  # switched off: the processors it replaced
    with switch.on(torch.stack([p2p.token_weights([2], 77, 0.0), p2p.token_weights([3], 77, 0.0)])):
        suppressed = teacher(x, t, emb)  # through functional_call as well
    assert not torch.allclose(suppressed, before_teacher)
    assert torch.equal(student_eps(unet, x, t, emb), before)  # and the student is untouched afterwards
    p2p.install(unet, "all", p2p.TokenReweighting())  # installing again wraps the original processors, once
    assert all(isinstance(p.original, AttnProcessor2_0) for p in unet.attn_processors.values()
               if isinstance(p, p2p.ReweightAttnProcessor))
    p2p.uninstall(unet)
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


def test_reweighted_attention_by_hand():
    torch.manual_seed(0)
    attn = Attention(query_dim=6, cross_attention_dim=5, heads=2, dim_head=3).eval()
    switch = p2p.TokenReweighting()
    attn.set_processor(p2p.ReweightAttnProcessor(AttnProcessor2_0(), switch))
    h, c = torch.randn(2, 4, 6), torch.randn(2, 3, 5)
    # row 0: P2P suppression of token k = 1; row 1: a negative scale on token 2 (no renormalisation either way)
    w = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, -1.0]])
    with switch.on(w), torch.no_grad():
        out = attn(h, encoder_hidden_states=c)

    d = lambda m: m.weight.detach().double()  # noqa: E731
    q, k, v = h.double() @ d(attn.to_q).T, c.double() @ d(attn.to_k).T, c.double() @ d(attn.to_v).T
    expected = torch.zeros(2, 4, 6, dtype=torch.float64)
    for b in range(2):
        for head in range(2):
            cols = slice(3 * head, 3 * head + 3)
            scores = q[b, :, cols] @ k[b, :, cols].T / math.sqrt(3)
            probs = scores.exp() / scores.exp().sum(-1, keepdim=True)  # softmax by hand
            probs = probs * w[b].double()[None, :]  # column k times its weight, rows not renormalised
            expected[b, :, cols] = probs @ v[b, :, cols]
    expected = expected @ d(attn.to_out[0]).T + attn.to_out[0].bias.detach().double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, attn.processor.original(attn, h, c).detach())  # the switch made a difference


def test_token_positions_with_the_real_tokenizer():
    from erasure.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer()
    assert p2p.token_positions(tok, "a circle", ["circle"]) == [2]  # <|startoftext|> a circle
    assert p2p.token_positions(tok, "a circle", ["a circle"]) == [1, 2]
    assert p2p.token_positions(tok, "a red circle, a circle", ["circle"]) == [3, 6]
    assert tok.convert_ids_to_tokens(tok("nudity").input_ids) == ["<|startoftext|>", "nu", "dity</w>", "<|endoftext|>"]
    assert p2p.token_positions(tok, "nudity", ["nudity"]) == [1, 2]  # a word of several BPE tokens: all of them
    assert p2p.token_positions(tok, "a square", ["circle"]) == []
    w = p2p.token_weights([3, 6], 77, 0.0)
    assert w.shape == (77,) and w[3] == w[6] == 0 and w.sum() == 75


def test_batched_teacher_work_gives_the_same_z_t_and_targets_with_the_implicit_signal():
    from erasure.sampling import eps_all

    ref, *_ = _method(CIRCLE)
    bat, *_ = _method(CIRCLE)
    steps = range(1, 7)
    draws = [bat.draw(s) for s in steps]
    assert ref.targets == ["a circle"] and torch.equal(ref.token_weights[0, :4], torch.tensor([1.0, 1.0, 0.0, 1.0]))
    active = [bool(bat.active(bat.cfg.T - d["t"])) for d in draws]
    assert any(active) and not all(active)  # window [0, 0.8] of T = 8 -> steps 0..6, warm-up 1
    one_by_one = [ref.teacher_work([ref.draw(s)])[0] for s in steps]
    batched = bat.teacher_work(draws)
    assert len({int(d["timestep"]) for d in batched}) > 1  # the batch really mixes different stopping steps
    for a, b, on in zip(one_by_one, batched, active):
        assert a["target_index"] == b["target_index"] and int(a["timestep"]) == int(b["timestep"])
        for key in ("z_t", "guidance_target", "teacher_u"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4)
        # the target without delta, gamma1 (eps*(z_t, c) - eps*(z_t, ∅)): delta moved it inside the window only
        u, c = eps_all(bat.ctx.teacher, b["z_t"], b["timestep"], [bat.emb_uncond, bat.emb_targets[:1]])
        moved = (b["guidance_target"] - 7.5 * (c - u)).abs().max().item()
        assert moved > 1e-3 if on else moved < 1e-4


def test_delta_is_gamma1_times_suppressed_minus_conditional_inside_the_window_only():
    m, *_ = _method(CIRCLE)
    lo, hi = m.implicit_window
    assert (lo, hi) == (0, math.floor(0.8 * 8)) == (0, 6)
    e0, e1, e2 = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 3.0)
    torch.testing.assert_close(m.delta(3, [e0, e1, e2]), 7.5 * (e2 - e1))
    assert m.delta(0, [e0, e1, e2]) is None  # before the warm-up
    assert m.delta(7, [e0, e1, None]) is None and m.active(7) == [] and m.active(6) == [2]


@pytest.fixture(scope="module")
def ours_node():
    return compose_cfg(["model=tiny"]).method


@pytest.mark.parametrize("override, words", [
    ({"implicit": {"reweight": float("nan")}}, "method.implicit.reweight must be a finite number"),
    ({"implicit": {"layers": "up_blocks.(attn2"}}, "method.implicit.layers must be 'all' or a regular expression"),
    ({"implicit": {"window": [0.9, 0.1]}}, "0 <= low <= high <= 1"),
    ({"implicit": {"window": [0.5]}}, "0 <= low <= high <= 1"),
    ({"implicit": {"words": []}}, "method.implicit.words must be null or a non-empty list"),
    ({"implicit": {"words": ["circle", " "]}}, "method.implicit.words must be null or a non-empty list"),
    ({"signal": "p2p"}, "method.signal must be 'explicit', 'implicit' or 'none'"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_bad_implicit_config_is_one_sentence(ours_node, override, words):
    with pytest.raises(UserError) as err:
        AllButOne.parse_config(OmegaConf.merge(ours_node, override))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_implicit_defaults(ours_node):
    cfg = AllButOne.parse_config(ours_node)
    assert cfg.signal == "explicit"  # explicit stays the default
    assert (cfg.implicit.reweight, cfg.implicit.layers, list(cfg.implicit.window), cfg.implicit.words) == \
        (0.0, "all", [0.0, 0.8], None)
    assert cfg.implicit == p2p.ImplicitConfig()  # the yaml and the schema agree


@pytest.mark.parametrize("override, words", [
    ("method.implicit.layers=nosuchblock", "matches none of the 4 cross-attention layers"),
    ("method.implicit.words=[square]", "do not occur in the target prompt 'a circle'"),
])
def test_what_needs_the_model_is_checked_when_the_method_is_built(override, words):
    with pytest.raises(UserError, match=words):
        _method([*CIRCLE, override])


def test_layer_regex_selects_a_subset():
    m, models, *_ = _method([*CIRCLE, "method.implicit.layers='^up_blocks'"])
    procs = models.unet.attn_processors
    wrapped = [n for n, p in procs.items() if isinstance(p, p2p.ReweightAttnProcessor)]
    assert wrapped and all(n.startswith("up_blocks.") and ".attn2." in n for n in wrapped)
    assert any(".attn2." in n and not isinstance(p, p2p.ReweightAttnProcessor) for n, p in procs.items())


def test_a_short_implicit_run_trains_a_plain_student_on_the_reweighted_target(tmp_path):
    """A short run (the teacher bank batching 2 iterations) against a replay: the same draws' teacher work one at a
    time, and a plain UNet (no P2P processor) as the student, its loss written out (Algorithm 1, lines 11-12) and
    stepped by AdamW with the run's settings. The trained delta is the replay's, and the replay's targets carry the
    implicit signal: inside the window they differ from gamma1 (eps*(z_t, c) - eps*(z_t, ∅)) of a plain base UNet."""
    from erasure.delta import read_delta
    from erasure.models import load_models
    from erasure.trainer import train
    from tests.conftest import build_method

    overrides = ["model=tiny", "trainer.preview_every=0", "method.lr=1e-3", "method.adam_eps=1e-4", "method.T=4",
                 *CIRCLE[:3], "method.warmup=1"]
    cfg = compose_cfg([*overrides, "trainer.iterations=3", "trainer.teacher_batch=2", "trainer.seed=3"])
    assert cfg.method.signal == "implicit"
    trained, _ = read_delta(train(cfg, tmp_path / "run"))

    m, ctx, _ = build_method(overrides, generator_seed=3)  # the run's generator: t = 3, 2, 4
    base, student = load_models(cfg.model, "cpu"), load_models(cfg.model, "cpu")  # plain UNets
    named = dict(student.unet.named_parameters())
    params = {n: named[n] for n in ctx.trainable}
    assert set(params) == set(trained) and all(".to_out." in n for n in params)
    for p in student.unet.parameters():
        p.requires_grad_(p in set(params.values()))
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3, eps=1e-4, betas=(0.9, 0.999), weight_decay=0.01)
    emb_u, emb_c = student.encode_text([""]), student.encode_text(["a circle"])
    signal = []
    for step in (1, 2, 3):
        d = m.draw(step)
        w = m.teacher_work([d])[0]
        z, t = w["z_t"], w["timestep"]
        with torch.no_grad():
            plain = 7.5 * (base.unet(z, t, encoder_hidden_states=emb_c).sample
                           - base.unet(z, t, encoder_hidden_states=emb_u).sample)
        moved = float((w["guidance_target"] - plain).abs().max())
        scale = float(plain.abs().max())
        if m.active(4 - d["t"]):  # measured: moved by 25% and 28% of the target's size
            signal.append(moved / scale)
        else:  # before the warm-up: the plain target (measured 2e-4 of its size: batched vs single calls)
            assert moved < 2e-3 * scale, step
        eps_c = student.unet(z, t, encoder_hidden_states=emb_c).sample
        eps_u = student.unet(z, t, encoder_hidden_states=emb_u).sample
        concept = ((7.5 * (eps_c - eps_u.detach()) - w["guidance_target"]) ** 2).mean()
        loss = concept + 5.0 * ((eps_u - w["teacher_u"]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert len(signal) == 2 and min(signal) > 0.1  # the two draws inside the window: there the target moved
    start = dict(load_models(cfg.model, "cpu").unet.named_parameters())
    moved_by = max(float((trained[n] - start[n]).abs().max()) for n in trained)
    assert moved_by > 1e-3  # trained by far more than the tolerance below
    for n, p in params.items():
        torch.testing.assert_close(trained[n], p.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("warmup, window, warned", [
    (3, [0.75, 1.0], False),  # T = 4: window steps 3..4, warm-up 3: step 3, the last the sampler takes, is active
    (4, [0.75, 1.0], True),   # warm-up 4: no step 0..3 is left
    (0, [0.25, 0.25], False),  # one step, 1
])
def test_a_window_with_no_active_step_is_warned_of(caplog, warmup, window, warned):
    """The implicit signal reads only at steps s with max(lo, warm-up) <= s <= min(hi, T - 1) (``active``): when no
    step is left the run is warned that delta is always zero; at the edge it is not."""
    m, *_ = _method(["concept=circle", "method.signal=implicit", "method.implicit.words=[circle]", "method.T=4",
                     f"method.warmup={warmup}", f"method.implicit.window={window}"])
    steps = [s for s in range(4) if m.active(s)]
    assert (steps == []) == warned
    assert any("delta is always zero" in r.getMessage() for r in caplog.records) == warned


def test_without_words_the_whole_target_is_reweighted():
    """``method.implicit.words`` null: every token of the target prompt ("a circle": positions 1 and 2) is re-weighted
    (by the default 0), start and padding are not."""
    m, *_ = _method(["concept=circle", "method.signal=implicit", "method.implicit.words=null", "method.T=8"])
    assert m.cfg.implicit.reweight == 0.0
    assert torch.equal(m.token_weights[0, :4], torch.tensor([1.0, 0.0, 0.0, 1.0]))


@pytest.mark.parametrize("instructions, said", [(None, True), ("[]", False)])
def test_the_implicit_signal_says_it_leaves_the_concepts_instruction_concepts_unused(caplog, instructions, said):
    """The circle concept's instruction concepts drive the explicit signal only: with the implicit one the run says
    they are not used; a concept without them gets no such line."""
    import logging

    extra = [] if instructions is None else [f"concept.instructions={instructions}"]
    with caplog.at_level(logging.INFO, logger="erasure.allbutone.ours"):
        m, *_ = _method([*CIRCLE, *extra])
    assert m.instructions == []
    assert any("instruction concepts are not used" in r.getMessage() for r in caplog.records) == said


def test_a_target_past_the_77_token_cut_gets_an_equalizer_of_77_weights():
    """CLIP reads 77 tokens: a target prompt longer than that is cut, and its equalizer has one weight per token read
    (the words found before the cut re-weighted)."""
    long = "a circle " + "beside a small red square " * 20
    m, models, *_ = _method(["concept=circle", f"concept.targets=[{long}]", "method.signal=implicit",
                             "method.implicit.words=[circle]", "method.T=8"])
    assert len(models.tokenizer(long).input_ids) > 100
    assert m.token_weights.shape == (1, 77)
    assert torch.equal(m.token_weights[0, :4], torch.tensor([1.0, 1.0, 0.0, 1.0]))
