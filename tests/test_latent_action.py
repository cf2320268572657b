"""Latent actions end to end (train_vqvae -> train_latent_action -> load_world -> step and
step_latent_action -> play.py --latent-actions), the proof that stage one never reads the recorded actions,
and bad input."""
import shutil

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import common
from conftest import describe, first_frames, run_script

VQ = ("--steps", "6", "--eval-every", "6", "--batch", "8")
LAM = ("--steps", "6", "--eval-every", "3", "--batch", "4", "--map-steps", "20", "--eval-windows", "32")


@pytest.fixture(scope="module")
def lam(pong_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lam")
    data = tmp / "pong"
    shutil.copytree(pong_data, data)
    vq, out = tmp / "vq.pt", tmp / "lam.pt"
    r = run_script("train_vqvae.py", "--data", data, "--out", vq, "--assets", tmp, *VQ)
    assert r.returncode == 0, describe(r)
    r = run_script("train_latent_action.py", "--data", data, "--tokenizer", vq, "--out", out, "--assets", tmp, *LAM)
    assert r.returncode == 0, describe(r)
    return dict(tmp=tmp, data=data, vq=vq, out=out, stdout=r.stdout)


def test_outputs_and_report(lam):
    assert (lam["tmp"] / "pong_latent_actions.png").stat().st_size > 0
    out = lam["stdout"]
    for word in ("map_accuracy", "table_accuracy", "acc_changed_posterior", "acc_changed_shuffled", "acc_changed_mapped"):
        assert word in out, word
    ck = common.load_checkpoint(lam["out"], ("world",))
    assert ck["model_args"]["arch"] == "lam" and ck["model_args"]["n_latent_actions"] == 6  # Pong's 6 actions by default
    assert ck["step"] == 6 and ck["map_step"] == 20
    table = np.array(ck["table"])
    assert table.shape == (6, 6) and table.sum() > 0  # real action x latent action counts on validation


def test_world_contract(lam):
    wm = common.load_world(lam["out"])
    assert isinstance(wm, common.LatentActionWorld) and wm.context == 4 and wm.n_actions == 6 and wm.n_latent_actions == 6
    wm.reset(first_frames(wm))
    frames = [wm.step(a) for a in range(6)] + [wm.step_latent_action(c) for c in range(6)]
    assert all(f.shape == (84, 64, 3) and f.dtype == np.uint8 for f in frames)
    with pytest.raises(common.KitError):
        wm.step_latent_action(6)
    with pytest.raises(common.KitError):
        wm.step(6)


def test_heads_and_the_dream_as_an_environment(lam):
    """Stage two fits reward and end heads on the labelled episodes: scored in the world's dream,
    saved, loaded, drawn at every step, and the world is a gymnasium env, tokens too."""
    ck = common.load_checkpoint(lam["out"], ("world",))
    assert "heads" in ck and {"reward_precision@1", "reward_recall@10", "end_recall@1"} <= set(ck["metrics"])
    assert "reward_precision@1" in lam["stdout"]
    wm = common.load_world(lam["out"], temperature=0)
    assert wm.heads is not None
    wm.reset(first_frames(wm))
    wm.step(0)
    with torch.inference_mode():  # the argmax of the heads on the tokens the step drew
        logits = wm.heads(wm.hist[:, -3:])
    assert wm.reward == common.REWARD_CLASSES[int(logits[0, :3].argmax())]
    check_env(common.DreamEnv(wm, start="data", data=str(lam["data"]), max_episode_steps=10))
    vec = common.DreamVecEnv(str(lam["out"]), num_envs=2, start="data", data=str(lam["data"]), obs="tokens")
    obs, _ = vec.reset(seed=0)
    obs, reward, terminated, truncated, _ = vec.step(np.zeros(2, dtype=np.int64))
    assert obs.shape == (2, *wm.hist.shape[-2:]) and reward.shape == (2,)


def test_map_is_the_only_user_of_actions(lam):
    # the map's latent action drives the forward model exactly as firing it does
    wm = common.load_world(lam["out"])
    frames = first_frames(wm)
    wm.seed(0)
    wm.reset(frames)
    with torch.inference_mode():
        latent = int(wm.dyn.latent_action(wm.hist, torch.tensor([2])))
    a = wm.step(2)
    wm.seed(0)  # the same draws
    wm.reset(frames)
    assert np.array_equal(a, wm.step_latent_action(latent))


def test_encoder_never_receives_recorded_actions(lam, tmp_path):
    """Train stage one twice on the same frames, once with every episode's recorded actions
    scrambled: the encoder and the forward model must come out bit-identical (and the map,
    which is supposed to read the actions, must not)."""
    other = tmp_path / "pong"
    shutil.copytree(lam["data"], other)
    rng = np.random.default_rng(0)
    for f in common.episode_files(other):
        ep = common.load_episode(f)
        acts = rng.integers(0, 6, size=len(ep["actions"]))
        meta = {k: ep[k] for k in ep if k not in common.EPISODE_KEYS}
        common.save_episode(f, ep["frames"], acts, ep["rewards"], ep["terminated"], ep["truncated"], **meta)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    for data, out in ((lam["data"], a), (other, b)):
        r = run_script("train_latent_action.py", "--data", data, "--tokenizer", lam["vq"], "--out", out,
                       "--assets", tmp_path, *LAM)
        assert r.returncode == 0, describe(r)
    ca, cb = (common.load_checkpoint(p, ("world",)) for p in (a, b))
    for key in ca["encoder"]:
        assert torch.equal(ca["encoder"][key], cb["encoder"][key]), key
    dyn = [k for k in ca["model"] if k.startswith("dynamics.")]
    assert dyn and all(torch.equal(ca["model"][k], cb["model"][k]) for k in dyn)
    maps = [k for k in ca["model"] if k.startswith("map.")]
    assert any(not torch.equal(ca["model"][k], cb["model"][k]) for k in maps)


def test_without_map_steps_only_latent_actions_play(lam, tmp_path):
    out = tmp_path / "nomap.pt"
    r = run_script("train_latent_action.py", "--data", lam["data"], "--tokenizer", lam["vq"], "--out", out,
                   "--assets", tmp_path, *LAM[:-4], "--map-steps", "0", "--eval-windows", "8")
    assert r.returncode == 0, describe(r)
    assert "heads" not in common.load_checkpoint(out, ("world",))  # fitted in stage two, with the map
    wm = common.load_world(out)
    wm.reset(first_frames(wm))
    assert wm.step_latent_action(1).shape == (84, 64, 3)
    with pytest.raises(common.KitError, match="no map"):
        wm.step(0)
    # --map-only fits the map onto the same encoder and forward model
    r = run_script("train_latent_action.py", "--data", lam["data"], "--out", out, "--assets", tmp_path,
                   "--map-only", "--map-steps", "10", "--eval-windows", "8")
    assert r.returncode == 0, describe(r)
    ck = common.load_checkpoint(out, ("world",))
    assert ck["map_step"] == 10 and "heads" in ck
    wm = common.load_world(out)
    wm.reset(first_frames(wm))
    assert wm.step(0).shape == (84, 64, 3)


def test_play_latent_gif(lam, tmp_path):
    gif = tmp_path / "latent.gif"
    r = run_script("play.py", "--world", lam["out"], "--latent-actions", "--gif", gif, "--steps", "6", "--actions", "0,1,5")
    assert r.returncode == 0, describe(r)
    import imageio.v2 as imageio
    assert len(imageio.mimread(gif)) == 6
    r = run_script("play.py", "--world", lam["out"], "--latent-actions", "--benchmark", "5")
    assert r.returncode == 0 and "shadow off" in r.stdout, describe(r)


@pytest.mark.parametrize("args, message", [
    (("--latent-actions", "1"), "at least 2 latent actions"),
    (("--latent-actions", "0"), "--latent-actions: must be positive"),
    (("--n-codes", "1"), "at least 2 latent actions"),  # the old name, for one release
    (("--map-frames", "5"), "the map sees 0 to 4"),
])
def test_bad_codebook(lam, tmp_path, args, message):
    r = run_script("train_latent_action.py", "--data", lam["data"], "--tokenizer", lam["vq"],
                   "--out", tmp_path / "x.pt", *args)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, describe(r)


def test_bad_inputs(lam, tmp_path):
    # frames too few for context + rollout
    short = tmp_path / "short"
    r = run_script("collect.py", "--steps", "12", "--max-episode-steps", "3", "--policy", "random", "--out", short)
    assert r.returncode == 0, describe(r)
    r = run_script("train_latent_action.py", "--data", short, "--tokenizer", lam["vq"], "--out", tmp_path / "x.pt")
    assert r.returncode != 0 and "shorter than" in r.stderr and "Traceback" not in r.stderr, describe(r)
    # a map for another game's action set
    breakout = tmp_path / "breakout"
    r = run_script("collect.py", "--game", "Breakout", "--steps", "60", "--max-episode-steps", "6", "--policy", "random",
                   "--out", breakout)
    assert r.returncode == 0, describe(r)
    r = run_script("bench.py", "world", "--world", lam["out"], "--data", breakout, "--no-compile")
    assert r.returncode != 0 and "trained on Pong, not Breakout" in r.stderr and "Traceback" not in r.stderr, describe(r)
    r = run_script("train_latent_action.py", "--data", lam["data"], "--out", lam["out"], "--map-only",
                   "--map-data", breakout)
    assert r.returncode != 0 and "has actions" in r.stderr and "Traceback" not in r.stderr, describe(r)
    # no tokenizer yet; --latent-actions on a world that has none
    r = run_script("train_latent_action.py", "--data", tmp_path / "no_tokenizer_for_this", "--out", tmp_path / "x.pt")
    assert r.returncode != 0 and "train_vqvae.py" in r.stderr, describe(r)
    world = tmp_path / "w.pt"
    r = run_script("train_world.py", "--data", lam["data"], "--tokenizer", lam["vq"], "--out", world, "--assets", tmp_path,
                   "--steps", "2", "--eval-every", "2", "--eval-windows", "2", "--gif-steps", "3", "--batch", "2")
    assert r.returncode == 0, describe(r)
    r = run_script("play.py", "--world", world, "--latent-actions", "--gif", tmp_path / "x.gif", "--steps", "2")
    assert r.returncode != 0 and "latent-action model" in r.stderr, describe(r)


def test_ctrl_c_keeps_a_resumable_checkpoint(lam, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    out = tmp_path / "lam.pt"
    cmd = [sys.executable, str(ROOT / "train_latent_action.py"), "--data", str(lam["data"]), "--tokenizer",
           str(lam["vq"]), "--out", str(out), "--assets", str(tmp_path), "--steps", "100000", "--eval-every", "2",
           "--batch", "2", "--eval-windows", "8"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 90
    while not out.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr and "continue with --resume" in stderr, stderr[-2000:]
    ck = common.load_checkpoint(out, ("world",))
    step = ck["step"]
    assert step >= 2 and ck["map_step"] == 0
    r = run_script("train_latent_action.py", "--data", lam["data"], "--out", out, "--assets", tmp_path, "--resume",
                   "--steps", step + 2, "--eval-every", "2", "--batch", "2", "--eval-windows", "8", "--map-steps", "5")
    assert r.returncode == 0 and f"resumed {out} at step {step}" in r.stdout, describe(r)
    ck = common.load_checkpoint(out, ("world",))
    assert ck["step"] == step + 2 and ck["map_step"] == 5
