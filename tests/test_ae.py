"""The continuous path end to end: train_ae (autoencoder, then latent dynamics) -> load_world ->
step, for the seed-000 AE + MLP (gray84x84) and the seed-004 stacked VAE + GRU (gray64x64,
stack 4), each one command with tiny nets and budgets; checkpoint round trip, resume, play.py
and bench.py on a latent world, the VAE's KL term, and bad input as one error line."""
import shutil

import numpy as np
import pytest
import torch

import common
from conftest import describe, first_frames, run_script

AE = ("--steps", "3", "--eval-every", "3", "--batch", "4", "--hidden", "8", "--fc", "32")
DYN = ("--dynamics-steps", "3", "--dynamics-eval-every", "3", "--eval-windows", "4", "--gif-steps", "5",
       "--dynamics-batch", "4", "--dynamics-dim", "32")
PONG_MEANINGS = ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"]


@pytest.fixture(scope="module")
def latent(pong_data, tmp_path_factory):
    """Both continuous models, trained on a private copy of the dataset (the latent cache is
    written beside it); one thread per process, as the batches are tiny."""
    tmp = tmp_path_factory.mktemp("ae")
    data = tmp / "pong"
    shutil.copytree(pong_data, data)
    paths = dict(tmp=tmp, data=data)
    runs = (("ae", ("--frame-space", "gray84x84", "--latent-dim", "16", "--dynamics", "mlp")),
            ("vae", ("--vae", "--frame-space", "gray64x64", "--stack", "4", "--latent-dim", "8", "--dynamics", "gru")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        for kind, flags in runs:
            ae, world = tmp / f"{kind}.pt", tmp / f"world_{kind}.pt"
            r = run_script("train_ae.py", "--data", data, "--out", ae, "--world-out", world, "--assets", tmp,
                           *AE, *DYN, *flags)
            assert r.returncode == 0, describe(r)
            assert "val PSNR" in r.stdout and "ball within 8 px" in r.stdout
            assert "latent_mse@10" in r.stdout and "action_px" in r.stdout and "psnr@30" in r.stdout
            assert "paddle_px@10" in r.stdout
            paths[kind], paths[f"world_{kind}"] = ae, world
    return paths


def one_line_error(r, *words):
    assert r.returncode != 0 and "Traceback" not in r.stderr, describe(r)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and all(w in last for w in words), describe(r)


# -----------------------------------------------------------------------------
# end to end

def test_outputs(latent):
    tmp = latent["tmp"]
    for f in ("pong_ae_recon.png", "pong_vae_recon.png", "pong_dream_ae.gif", "pong_dream_vae.gif"):
        assert (tmp / f).stat().st_size > 0, f
    assert (latent["data"] / "latents.npy").exists() and (latent["data"] / "latents.json").exists()
    ae = common.load_checkpoint(latent["ae"], ("ae",))
    for key in ("model_args", "model", "optimizer", "frame_space", "game", "action_meanings", "step", "args", "metrics"):
        assert key in ae, key
    assert ae["step"] == 3 and ae["model_args"]["vae"] is False
    world = common.load_checkpoint(latent["world_vae"], ("world",))
    assert world["tokenizer_kind"] == "ae" and world["model_args"]["arch"] == "gru"
    assert world["model_args"]["context"] == 1  # 4 frames of history = one latent of a 4-frame stack


@pytest.mark.parametrize("kind, shape, dyn", [("ae", (84, 84), common.LatentMLP), ("vae", (64, 64), common.LatentGRU)])
def test_contract(latent, kind, shape, dyn):
    wm = common.load_world(latent[f"world_{kind}"])
    assert isinstance(wm, common.LatentWorld) and isinstance(wm.dyn, dyn)
    assert wm.context == 4 and wm.n_actions == 6 and wm.game == "ALE/Pong-v5" and wm.action_meanings == PONG_MEANINGS
    frames = first_frames(wm, wm.context)
    assert frames[0].shape == shape and frames[0].dtype == np.uint8
    with pytest.raises(common.KitError):
        wm.step(0)  # before reset
    wm.reset(frames)
    out = [wm.step(a) for a in (0, 2, 3, 1, 5)]
    assert all(f.shape == shape and f.dtype == np.uint8 for f in out)
    with pytest.raises(common.KitError):
        wm.step(wm.n_actions)
    with pytest.raises(common.KitError):
        wm.reset(frames[:2])


@pytest.mark.parametrize("kind, frames", [("ae", 3), ("vae", 2)])
def test_heads_draw_reward_and_end_from_the_latents(latent, kind, frames):
    """The latent dynamics learn reward and end heads beside them (the VAE's world keeps one latent of
    history: its heads read it and the next); the world draws both at every step, at their argmax."""
    ck = common.load_checkpoint(latent[f"world_{kind}"], ("world",))
    assert ck["heads_args"]["frames"] == frames and {"reward_precision@1", "end_recall@10"} <= set(ck["metrics"])
    wm = common.load_world(latent[f"world_{kind}"])
    assert isinstance(wm.heads, common.LatentOutcome) and wm.reward == 0.0 and wm.terminated is False
    wm.reset(first_frames(wm, wm.context))
    before = wm.hist[:, 1 - frames:]
    wm.step(2)
    with torch.inference_mode():
        logits = wm.heads(torch.cat([before, wm.hist[:, -1:]], 1))
    assert wm.reward == common.REWARD_CLASSES[int(logits[0, :3].argmax())] and wm.terminated == bool(logits[0, 3] > 0)


def test_latent_heads_learn_a_reward_rule():
    """A point moves along a line, one latent coordinate its position, another noise; the reward is
    +1 when it reaches the right end, -1 at the left: the heads read it from three latents."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    def episode(n=120):
        pos = np.cumsum(rng.choice([-1, 1], n + 1)) % 9  # wraps: it reaches both ends many times
        z = np.stack([pos / 8.0, rng.normal(size=n + 1), rng.normal(size=n + 1), np.ones(n + 1)], 1)
        rewards = np.where(pos[1:] == 8, 1.0, np.where(pos[1:] == 0, -1.0, 0.0))
        return dict(latents=torch.tensor(z, dtype=torch.float32), rewards=torch.tensor(rewards),
                    terminated=torch.zeros(n, dtype=torch.bool))

    eps = [episode() for _ in range(6)]
    heads = common.LatentOutcome(4, hidden=64)
    heads.standardize_with(torch.cat([ep["latents"] for ep in eps]))
    data = {k: common.pack([ep[k] for ep in eps], "cpu") for k in ("latents", "rewards", "terminated")}
    transitions, events, paid = (torch.as_tensor(x) if i < 2 else x
                                 for i, x in enumerate(common.outcome_transitions(eps)))
    assert paid > 0
    opt = torch.optim.AdamW(heads.parameters(), lr=3e-3)
    for _ in range(800):
        loss = common.outcome_loss(heads, data, transitions, events, rng, 64, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    test = episode()
    j = torch.arange(1, len(test["rewards"]))
    with torch.no_grad():
        logits = heads(torch.stack([test["latents"][k - 1:k + 2] for k in j]))
    got = torch.tensor(common.REWARD_CLASSES, dtype=torch.float64)[logits[:, :3].argmax(1)]
    assert torch.equal(got, test["rewards"][j]) and (logits[:, 3] < 0).all()


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_round_trip_rebuilds_identical_model(latent, kind, tmp_path):
    # the world checkpoint carries its autoencoder: it loads with the autoencoder file gone
    solo = tmp_path / "world.pt"
    shutil.copy(latent[f"world_{kind}"], solo)
    a, b = common.load_world(latent[f"world_{kind}"]), common.load_world(solo)
    for m1, m2 in ((a.dyn, b.dyn), (a.tok, b.tok)):
        s1, s2 = m1.state_dict(), m2.state_dict()
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert "shift" in a.dyn.state_dict() and not torch.equal(a.dyn.scale, torch.ones_like(a.dyn.scale))
    frames = first_frames(a, a.context)
    a.reset(frames)
    b.reset(frames)
    for act in (2, 2, 3, 0, 1):
        assert np.array_equal(a.step(act), b.step(act))


def test_play_and_bench_run(latent, tmp_path):
    gif = tmp_path / "x.gif"
    r = run_script("play.py", "--world", latent["world_ae"], "--gif", gif, "--steps", "10", "--policy", "random")
    assert r.returncode == 0 and gif.stat().st_size > 0, describe(r)
    r = run_script("bench.py", "world", "--world", latent["world_vae"], "--data", latent["data"], "--windows", "3", "--no-compile")
    assert r.returncode == 0, describe(r)
    assert "| 30 |" in r.stdout and "paddle error @10" in r.stdout and "steps/s eager" in r.stdout


# -----------------------------------------------------------------------------
# the models in process

def test_vae_kl_term_present_and_finite():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 4, 64, 64), dtype=torch.uint8)
    vae = common.ConvAE(in_ch=1, size=(64, 64), stack=4, latent_dim=8, hidden=4, fc=16, vae=True).train()
    rec, mu, kl = vae(x)
    assert rec.shape == (3, 4, 64, 64) and mu.shape == (3, 8)
    assert kl.dim() == 0 and torch.isfinite(kl) and kl.item() > 0
    kl.backward()  # the KL reaches the encoder
    assert vae.encoder[-1].weight.grad.abs().sum() > 0
    ae = common.ConvAE(in_ch=1, size=(84, 84), latent_dim=8, hidden=4, fc=16)
    rec, z, kl = ae(x[:, :1].repeat(1, 1, 2, 2)[:, :, :84, :84].contiguous())
    assert rec.shape == (3, 1, 84, 84) and kl.item() == 0.0  # 84 is padded to 96, and cropped back
    assert torch.equal(vae.eval().encode(x), vae(x)[1])  # eval: the mean, no sampling


# -----------------------------------------------------------------------------
# bad input: one line, non-zero exit, no traceback

def test_an_autoencoder_is_not_a_token_world_tokenizer(latent, tmp_path):
    r = run_script("train_world.py", "--data", latent["data"], "--tokenizer", latent["ae"], "--out", tmp_path / "w.pt")
    one_line_error(r, "is a 'ae' checkpoint; expected vqvae")


def test_resume_continues_both_stages(latent, tmp_path):
    ae, world = tmp_path / "ae.pt", tmp_path / "world.pt"
    shutil.copy(latent["ae"], ae)
    shutil.copy(latent["world_ae"], world)
    r = run_script("train_ae.py", "--data", latent["data"], "--out", ae, "--world-out", world, "--assets", tmp_path,
                   "--resume", *AE, *DYN, "--frame-space", "gray84x84", "--latent-dim", "16", "--dynamics-steps", "5")
    assert r.returncode == 0, describe(r)
    assert f"resumed {world} at step 3" in r.stdout and "autoencoder: 3 steps" in r.stdout  # stage one was done
    assert common.load_checkpoint(world)["step"] == 5


def test_resume_over_another_latent_size(latent, tmp_path):
    world = tmp_path / "world.pt"
    shutil.copy(latent["world_ae"], world)  # 16-D latents; vae.pt makes 8-D ones
    r = run_script("train_ae.py", "--data", latent["data"], "--out", latent["vae"], "--world-out", world, "--resume",
                   *AE, *DYN, "--vae", "--frame-space", "gray64x64", "--stack", "4", "--latent-dim", "8")
    one_line_error(r, "--resume", "'latent_dim': 16", "'latent_dim': 8")


def test_context_shorter_than_stack(latent, tmp_path):
    r = run_script("train_ae.py", "--data", latent["data"], "--vae", "--stack", "4", "--context", "2",
                   "--out", tmp_path / "v.pt", *AE, *DYN)
    one_line_error(r, "--context 2", "4 frames")


def test_nan_loss_stops_with_step(latent, tmp_path):
    r = run_script("train_ae.py", "--data", latent["data"], "--out", tmp_path / "x.pt", "--assets", tmp_path,
                   *AE, "--lr", "1e30")
    one_line_error(r, "loss became", "at step")
