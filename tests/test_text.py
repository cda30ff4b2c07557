"""Text prompts: the tokenizer, the prompt generator, the padding mask, gradients into the
text encoder, guidance with the empty prompt, the command line's refusals, and (slow) a
smoke-preset text LDM trained, sampled and evaluated end to end."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_main
from ldm_jax import diffusion, models, nets, sample, text
from test_bad_input import _one_line_exit_2

ALL_PAIRS = text.TRAIN_PAIRS + text.HELD_OUT_PAIRS
# The three checks that compile a U-Net (~90 s together on the shared 2-core machine, in
# the 2026-11-26 suite run) run with -m slow: CI's default run was already at 9 min 55 s.
SLOW_NET = pytest.mark.slow


def _prompts(pairs):
    return [text.make_prompt(d, t, s) for t, s in pairs for d in range(10)]


# ----------------------------------------------------------------------------- Tokenizer


def test_vocabulary_is_the_templates_characters_and_all_are_trained():
    assert text.VOCAB == "".join(sorted(set("".join(_prompts(ALL_PAIRS)))))
    # No character only in held-out prompts: its embedding would never be trained.
    assert set(text.VOCAB) == set("".join(_prompts(text.TRAIN_PAIRS)))
    assert max(len(p) for p in _prompts(ALL_PAIRS)) <= text.MAX_CHARS
    assert not set(text.HELD_OUT_PAIRS) & set(text.TRAIN_PAIRS)
    assert {s for _, s in text.TRAIN_PAIRS} == set(text.SPELLINGS)


def test_tokenizer_round_trips():
    rng = np.random.default_rng(0)
    letters = [c for c in text.VOCAB if c != " "]
    made = ["".join(rng.choice(letters, size=rng.integers(1, text.MAX_CHARS + 1)))
            for _ in range(200)]
    for prompt in _prompts(ALL_PAIRS) + made + ["", "7"]:
        tokens = text.encode(prompt)
        assert tokens.shape == (text.SEQ_LEN,) and tokens.dtype == np.int32
        assert tokens[0] == text.BOS and text.decode(tokens) == prompt
        mask = np.asarray(text.padding_mask(jnp.asarray(tokens)))
        assert mask.sum() == len(prompt) + 1 and mask[:len(prompt) + 1].all()
    assert text.decode(text.encode("  A Handwritten\t 8 ")) == "a handwritten 8"
    assert text.make_prompt(8, "a {}", "word") == "an eight"
    assert text.make_prompt(8, "a drawing of a {}", "numeral") == "a drawing of an 8"
    assert text.make_prompt(7, "number {}, written by hand", "word") == \
        "number seven, written by hand"


def test_tokenizer_refuses_what_it_cannot_encode():
    with pytest.raises(text.PromptError, match=r"outside the vocabulary: '!', 'J', 'é'"):
        text.encode("Jolly 7é!")
    assert text.decode(text.encode("x" * text.MAX_CHARS)) == "x" * text.MAX_CHARS
    with pytest.raises(text.PromptError, match=f"is 41 characters long; the text encoder "
                                               f"takes at most {text.MAX_CHARS}"):
        text.encode("x" * 41)


def test_training_prompts_name_the_label_and_drop_to_the_empty_prompt():
    table = text.prompt_table()
    assert table.shape == (10, len(text.TRAIN_PAIRS), text.SEQ_LEN)
    train = {d: set(text.make_prompt(d, t, s) for t, s in text.TRAIN_PAIRS) for d in range(10)}
    held = set(_prompts(text.HELD_OUT_PAIRS))
    labels = jnp.arange(2000) % 10
    tokens = np.asarray(text.sample_prompts(jax.random.key(0), labels, jnp.asarray(table), 0.1))
    decoded = [text.decode(t) for t in tokens]
    empty = np.array([p == "" for p in decoded])
    assert 0.07 < empty.mean() < 0.13, empty.mean()
    np.testing.assert_array_equal(tokens[empty], np.broadcast_to(text.encode(""), tokens[empty].shape))
    for p, d in zip(decoded, np.asarray(labels)):
        assert p == "" or (p in train[d] and p not in held), (p, d)
    assert len(set(decoded)) > 200  # many (digit, template, spelling) combinations drawn


# ----------------------------------------------------------------------------- Networks


def _text_unet():
    encoder = text.TextEncoder(width=16, layers=2, heads=2, conv=3)
    return nets.UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, heads=2, groups=4,
                     conditioning="text", context_dim=16, text_encoder=encoder)


def _perturbed(params, scale=0.05):
    """Every leaf moved off its initial value (zero-initialised output layers would hide
    the prompt's effect, and block gradients to the text encoder)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return treedef.unflatten([p + scale * jax.random.normal(k, p.shape)
                              for p, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def text_unet():
    unet = _text_unet()
    x, t = jnp.ones((2, 7, 7, 4)), jnp.array([3, 30])
    params = jax.jit(unet.init)(jax.random.key(0), x, t, jnp.asarray(text.encode_batch(["", ""])))
    return unet, _perturbed(params["params"])


@pytest.mark.parametrize("conv", [0, 5])
def test_text_encoder_output_ignores_padding(conv):
    """The character convolution must see padding as it sees the prompt's end: a prompt
    that fills 20 tokens exactly (no padding) and the same prompt padded to 41."""
    encoder = text.TextEncoder(width=16, layers=1, heads=2, conv=conv)
    short = jnp.asarray(text.encode_batch(["a handwritten seven", "3"], length=20))
    full = jnp.asarray(text.encode_batch(["a handwritten seven", "3"]))
    params = encoder.init(jax.random.key(0), full)
    out_short, mask_short = encoder.apply(params, short)
    out_full, _ = encoder.apply(params, full)
    m = np.asarray(mask_short)
    np.testing.assert_allclose(np.asarray(out_short)[m], np.asarray(out_full)[:, :20][m],
                               atol=1e-5)
    assert ("char_conv" in params["params"]) == bool(conv)


@SLOW_NET
def test_padding_changes_nothing(text_unet):
    unet, params = text_unet
    x = jax.random.normal(jax.random.key(2), (2, 7, 7, 4))
    t = jnp.array([3, 30])
    prompts = ["a handwritten seven", "3"]
    apply = lambda tok: unet.apply({"params": params}, x, t, jnp.asarray(tok))
    short = apply(text.encode_batch(prompts, length=20))
    full = apply(text.encode_batch(prompts))  # 21 more padding tokens, other positions
    np.testing.assert_allclose(short, full, atol=1e-5)
    other = apply(text.encode_batch(["a handwritten three", "8"], length=20))
    assert float(jnp.abs(other - short).max()) > 1e-3  # the prompt does reach the output


@SLOW_NET
def test_text_encoder_gets_gradients(text_unet):
    unet, params = text_unet
    x0 = jax.random.normal(jax.random.key(3), (4, 7, 7, 4))
    sched = models.build_schedule(dict(schedule="linear", timesteps=50, beta_start=1e-4,
                                       beta_end=0.02))
    table = jnp.asarray(text.prompt_table())

    def loss(p, key):  # the text LDM's training loss (stages.diffusion_task)
        y = text.sample_prompts(key, jnp.array([0, 3, 7, 9]), table, 0.1)
        net = lambda x, t: unet.apply({"params": p}, x, t, y)
        return jnp.mean(diffusion.training_losses(net, sched, x0, key, prediction="v"))

    grads = jax.jit(jax.grad(loss))(params, jax.random.key(4))["text_encoder"]
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert len(flat) > 10
    for path, g in flat:
        assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


@SLOW_NET
def test_guidance_with_the_empty_prompt_at_w0_is_conditional_sampling(text_unet):
    unet, params = text_unet
    sched = models.build_schedule(dict(schedule="linear", timesteps=50, beta_start=1e-4,
                                       beta_end=0.02))
    cfg = dict(model=dict(conditioning="text"), sample=dict(steps=3),
               diffusion=dict(prediction="v", clip_x0=False, var_type="fixed_small"))
    gen = sample.Generator(stage="ldm", unet=unet, params=params, sched=sched, config=cfg,
                           shape=(7, 7, 4))
    tokens = jnp.asarray(text.encode_batch(["a handwritten seven", "2", "nine"]))
    run = sample.sample_fn(gen, 3, "ddim", 3)
    key = jax.random.key(5)
    guided = {w: run(key, tokens, w) for w in (0.0, 2.0)}
    net_fn = lambda x, t: unet.apply({"params": params}, x, t, tokens)
    plain = diffusion.ddim_sample(diffusion.eps_fn_from_model(net_fn, sched, "v"), sched, key,
                                  (3, 7, 7, 4), 3, 0.0, False)
    np.testing.assert_allclose(guided[0.0], jnp.clip(plain, -1, 1), atol=1e-5)
    assert float(jnp.abs(guided[2.0] - guided[0.0]).max()) > 1e-2  # w does something
    # The empty prompt is the unconditional model: guiding it towards itself is a no-op.
    uncond = {w: run(key, None, w) for w in (0.0, 2.0)}
    np.testing.assert_allclose(uncond[0.0], uncond[2.0], atol=1e-4)  # 3e - 2e, in float32
    np.testing.assert_allclose(run(key, text.encode_batch(["", "", ""]), 0.0), uncond[0.0])


# ----------------------------------------------------------------------------- Command line


@pytest.mark.parametrize("args,message", [
    (["--prompt=" + "x" * 41], "prompt '" + "x" * 41 + "' is 41 characters long; the text "
                                                       "encoder takes at most 40"),
    (["--prompt=a handwritten 7!"], "has characters outside the vocabulary: '!'"),
    (["--prompt=7", "--prompt=Jolly Q?"], "outside the vocabulary: '?', 'J'"),
    (["--prompt=7", "--prompt=8", "--num=3"], "--num must be a multiple of 2, got 3"),
    (["--prompt=7", "--label=7"], "give one of them"),
    (["--prompt=7", "--prompt_file={tmp}/p.txt"], "give --prompt or --prompt_file, not both"),
    (["--prompt_file={tmp}/missing.txt"], "--prompt_file {tmp}/missing.txt does not exist"),
    (["--prompt_file={tmp}/p.txt"], "prompt 'a seven; please' has characters outside the "
                                    "vocabulary: ';'"),
])
def test_sample_refuses_bad_prompts(tmp_path, args, message):
    """Checked before the workdir is read: exit 2, one line, nothing written."""
    (tmp_path / "p.txt").write_text("seven\n\na seven; please\n")
    (tmp_path / "w").mkdir()
    r = run_main("sample", f"--workdir={tmp_path / 'w'}", f"--out={tmp_path / 'g.png'}",
                 *(a.format(tmp=tmp_path) for a in args))
    _one_line_exit_2(r, message.format(tmp=tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["p.txt", "w"] and not os.listdir(tmp_path / "w")


@pytest.mark.parametrize("args", [["--prompt=a handwritten seven"], ["--prompt="],
                                  ["--prompt_file={tmp}/p.txt"]])
def test_prompt_on_a_model_without_text_conditioning(smoke_workdir, tmp_path, args):
    (tmp_path / "p.txt").write_text("seven\n")
    r = run_main("sample", f"--workdir={smoke_workdir}", f"--out={tmp_path / 'g.png'}",
                 *(a.format(tmp=tmp_path) for a in args))
    _one_line_exit_2(r, f"the ldm model in {smoke_workdir} is not text-conditioned "
                        "(conditioning=none)")
    assert os.listdir(tmp_path) == ["p.txt"]


@pytest.mark.parametrize("override,message", [
    ("--config.model.text_layers=0", "model.text_layers must be >= 1, got 0"),
    ("--config.model.text_conv=-1", "model.text_conv must be >= 0, got -1"),
    ("--config.model.context_dim=30", "attention width 30 is not divisible by model.heads=4"),
    ("--config.model.conditioning=words", "model.conditioning must be none|class|crossattn|text"),
])
def test_train_refuses_bad_text_config(tmp_path, override, message):
    r = run_main("train", "--stage=ldm", "--preset=cpu-quick", f"--workdir={tmp_path / 'w'}",
                 "--config.model.conditioning=text", override)
    _one_line_exit_2(r, message)
    assert not os.listdir(tmp_path)


def test_help_says_the_empty_prompt_is_unconditional(capsys):
    r = run_main("sample", "--help")
    assert r.returncode == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "An empty prompt (--prompt='') is the unconditional model" in out


# ----------------------------------------------------------------------------- End to end


@pytest.mark.slow  # ~2 min on 2 cores: a train, two sample commands and an evaluate
def test_text_ldm_smoke_run_end_to_end(smoke_workdir, tmp_path):
    from ldm_jax import checkpoints
    workdir = tmp_path / "w"
    shutil.copytree(os.path.join(smoke_workdir, "vae"), workdir / "vae")
    r = run_main("train", "--stage=ldm", "--preset=smoke", f"--workdir={workdir}",
                 "--config.model.conditioning=text")
    assert r.returncode == 0, r.stderr[-1500:]
    # Trained jointly: the text encoder's EMA weights moved away from the initial ones
    # (train.py initialises with the first half of key(seed), seed 0 here).
    gen = sample.load_generator(str(workdir), "ldm")
    assert sample.is_text(gen) and checkpoints.stored_meta(str(workdir / "ldm"))["finished"]
    init = gen.unet.init(jax.random.split(jax.random.key(0))[0], jnp.zeros((1, *gen.shape)),
                         jnp.zeros((1,), jnp.int32), jnp.asarray(text.encode(""))[None])
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                         gen.params["text_encoder"], init["params"]["text_encoder"])
    assert min(jax.tree.leaves(moved)) > 0, moved
    out = tmp_path / "rows.png"
    r = run_main("sample", f"--workdir={workdir}", "--prompt=a handwritten seven",
                 "--prompt=3", "--prompt=", "--num=6", "--steps=3", "--guidance=2",
                 f"--out={out}")
    assert r.returncode == 0, r.stderr[-1500:]
    with np.load(tmp_path / "rows.npz", allow_pickle=False) as z:
        assert z["images"].shape == (6, 28, 28)
        assert list(z["prompts"]) == ["a handwritten seven"] * 2 + ["3"] * 2 + [""] * 2
    before = sorted(os.listdir(tmp_path))
    r = run_main("sample", f"--workdir={workdir}", "--label=3", f"--out={tmp_path / 'x.png'}")
    _one_line_exit_2(r, "is text-conditioned; use --prompt instead of --label")
    assert sorted(os.listdir(tmp_path)) == before
    from ldm_jax import evaluate
    result = evaluate.evaluate(str(workdir), "smoke", num=20, cost=False)
    rows = result["text"]["ldm"]
    assert set(rows) == {str(w) for w in evaluate.TEXT_GUIDANCE}
    for row in rows.values():
        for k in ("seen", "held_out", "words", "numerals", "same_digit", "fid", "recognisable"):
            assert 0.0 <= row[k] <= 1.0 or k == "fid", (k, row)
    assert os.path.isfile(workdir / "eval" / "prompts.png")
    assert "Text prompts" in open(workdir / "eval" / "report.md").read()
    json.load(open(workdir / "eval" / "metrics.json"))
