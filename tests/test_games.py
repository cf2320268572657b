"""Several games (seed 004) and SpaceInvaders: collect.py --game A,B, ALE's 18 actions, one tokenizer and
one dynamics model over two games, load_world(game=...) and play.py --game, the SpaceInvaders tracker and
object detector. Headless and CPU-only, tiny budgets."""
import gymnasium as gym
import numpy as np
import pytest
import torch

import common
from conftest import TINY_VQ, TINY_WORLD, describe, run_script as run

GAMES = ("Pong", "Breakout", "SpaceInvaders")


# -----------------------------------------------------------------------------
# ALE's full action space

@pytest.mark.parametrize("game", GAMES)
def test_full_actions_agree_with_ale(game):
    full = gym.make(common.resolve_game(game), full_action_space=True).unwrapped
    assert tuple(full.get_action_meanings()) == common.FULL_ACTIONS
    env = common.make_env(game)
    for i, j in enumerate(common.full_actions(env.action_meanings)):  # the same emulator action, by name and value
        assert common.FULL_ACTIONS[j] == env.action_meanings[i]
        assert full._action_set[j] == env.unwrapped._action_set[i]
    env.close()


# -----------------------------------------------------------------------------
# collect.py --game A,B

def test_collect_several_games(run_script, tmp_path):
    r = run_script("collect.py", "--game", "Pong,Breakout", "--steps", "60", "--max-episode-steps", "30",
                   "--out", tmp_path)
    assert r.returncode == 0, describe(r)
    for game, folder in (("ALE/Pong-v5", "pong"), ("ALE/Breakout-v5", "breakout")):
        files = common.episode_files(tmp_path / folder)
        assert len(files) == 2
        assert str(common.load_episode(files[0], ["game"])["game"]) == game


@pytest.mark.parametrize("games,message", [("Pong,pong", "names a game twice"), ("Pong,Pongg", "unknown game")])
def test_collect_bad_game_list(run_script, tmp_path, games, message):
    r = run_script("collect.py", "--game", games, "--steps", "10", "--out", tmp_path)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, describe(r)


# -----------------------------------------------------------------------------
# one tokenizer and one world model over two games

@pytest.fixture(scope="module")
def joint(pong_data, tmp_path_factory):
    """A tiny joint model of Pong (the shared dataset) and Breakout (recorded here)."""
    tmp = tmp_path_factory.mktemp("joint")
    r = run("collect.py", "--game", "Breakout", "--steps", "300", "--max-episode-steps", "100",
                   "--out", tmp / "breakout")
    assert r.returncode == 0, describe(r)
    import shutil
    shutil.copytree(pong_data, tmp / "pong")
    data = [tmp / "pong", tmp / "breakout"]
    r = run("train_vqvae.py", "--data", *data, "--out", tmp / "vq.pt", "--assets", tmp, *TINY_VQ)
    assert r.returncode == 0, describe(r)
    r = run("train_world.py", "--data", *data, "--tokenizer", tmp / "vq.pt", "--out", tmp / "world.pt",
                   "--assets", tmp, *TINY_WORLD, timeout=300)
    assert r.returncode == 0, describe(r)
    assert "Pong: acc" in r.stdout and "Breakout: acc" in r.stdout, describe(r)
    return dict(tmp=tmp, data=data, vq=tmp / "vq.pt", world=tmp / "world.pt")


def test_joint_checkpoints_name_their_games(joint):
    for path in (joint["vq"], joint["world"]):
        games = common.trained_games(common.load_checkpoint(path))
        assert list(games) == ["ALE/Pong-v5", "ALE/Breakout-v5"]
        assert games["ALE/Breakout-v5"] == ["NOOP", "FIRE", "RIGHT", "LEFT"]
    ck = common.load_checkpoint(joint["world"])
    assert ck["model_args"]["games"] == 2 and ck["model_args"]["n_actions"] == 18
    assert ck["model_args"]["game_actions"]  # each game its own meaning of the keys, by default
    assert set(ck["metrics"]) == {"ALE/Pong-v5", "ALE/Breakout-v5"}
    assert (joint["tmp"] / "pong+breakout_breakout_dream.gif").exists()


def test_joint_tokenizer_gives_each_game_its_own_codes(joint):
    """64 codes for each game by default, a slice each: every token of a Pong frame is one of the
    first 64, of a Breakout frame one of the next 64, the game told by the frame alone."""
    tok, ck = common.load_tokenizer(joint["vq"])
    assert ck["model_args"]["n_codes"] == 128 and ck["model_args"]["games"] == 2
    for i, folder in enumerate(joint["data"]):
        frames = common.load_episode(common.episode_files(folder)[0], ["frames"])["frames"][:40]
        tokens = tok.encode(common.preprocess(frames, ck["frame_space"]))
        assert tokens.min() >= 64 * i and tokens.max() < 64 * (i + 1)


def test_joint_tokenizer_codes_that_do_not_split(joint, run_script):
    r = run_script("train_vqvae.py", "--data", *joint["data"], "--codes", "63", "--out", joint["tmp"] / "v3.pt",
                   *TINY_VQ)
    assert r.returncode != 0 and "63 cannot be cut into 2 equal slices" in r.stderr, describe(r)
    assert "Traceback" not in r.stderr, describe(r)


@pytest.mark.parametrize("game,n", [("Pong", 6), ("Breakout", 4), (None, 6)])
def test_joint_world_dreams_each_game_with_its_actions(joint, game, n):
    wm = common.load_world(joint["world"], temperature=0, game=game)
    assert wm.game == common.resolve_game(game or "Pong") and wm.n_actions == n
    assert wm.data == str(joint["data"][game == "Breakout"])  # DreamEnv's start="data": that game's folder
    env = common.make_env(wm.game, seed=0)
    obs, _ = env.reset(seed=0)
    wm.reset([wm.observe(obs)] * wm.context)
    frames = [wm.step(a % n) for a in range(5)]
    assert all(f.shape == (84, 64, 3) and f.dtype == np.uint8 for f in frames)
    with pytest.raises(common.KitError, match="out of range"):
        wm.step(n)  # Breakout has 4 actions: its 5th is another game's


def test_joint_world_games_differ(joint):
    """The game input is read: the same history and action give another next frame per game."""
    wm = common.load_world(joint["world"], temperature=0)
    hist = torch.zeros(1, wm.context, *wm.dyn.act_bias.shape[2:], dtype=torch.long)
    act = torch.zeros(1, wm.dyn.actions, dtype=torch.long)
    with torch.no_grad():
        a, b = (wm.dyn(hist, act, torch.zeros_like(hist[:, 0]), None, torch.tensor([g])) for g in (0, 1))
    assert not torch.equal(a, b)


def test_joint_world_refuses_another_game(joint, run_script):
    with pytest.raises(common.KitError, match="trained on Pong, Breakout, not SpaceInvaders"):
        common.load_world(joint["world"], game="SpaceInvaders")
    r = run_script("play.py", "--world", joint["world"], "--game", "SpaceInvaders", "--gif", joint["tmp"] / "x.gif",
                   "--steps", "3")
    assert r.returncode != 0 and "not SpaceInvaders" in r.stderr and "Traceback" not in r.stderr, describe(r)


def test_play_joint_world_game(joint, run_script):
    gif = joint["tmp"] / "breakout.gif"
    r = run_script("play.py", "--world", joint["world"], "--game", "Breakout", "--gif", gif, "--steps", "4",
                   "--temperature", "0")
    assert r.returncode == 0 and gif.exists(), describe(r)


def test_world_data_of_one_game_twice(joint, run_script):
    r = run_script("train_world.py", "--data", joint["data"][0], joint["data"][0], "--tokenizer", joint["vq"],
                   "--out", joint["tmp"] / "w2.pt", *TINY_WORLD)
    assert r.returncode != 0 and "one folder per game" in r.stderr and "Traceback" not in r.stderr, describe(r)
    r = run_script("train_vqvae.py", "--data", joint["data"][1], joint["data"][1], "--out", joint["tmp"] / "v2.pt",
                   *TINY_VQ)
    assert r.returncode != 0 and "one folder per game" in r.stderr and "Traceback" not in r.stderr, describe(r)


def test_world_data_the_tokenizer_never_saw(joint, token_worlds, run_script):
    """A Pong-only tokenizer cannot tokenize Breakout: one line."""
    r = run_script("train_world.py", "--data", *joint["data"], "--tokenizer", token_worlds["vq"],
                   "--out", joint["tmp"] / "w3.pt", *TINY_WORLD)
    assert r.returncode != 0 and "trained on Pong; " in r.stderr and "Traceback" not in r.stderr, describe(r)


def test_one_game_world_over_joint_tokenizer(joint, run_script):
    """A one-game model over the joint tokenizer is that game's model, with its own actions."""
    out = joint["tmp"] / "breakout_only.pt"
    r = run_script("train_world.py", "--data", joint["data"][1], "--tokenizer", joint["vq"], "--out", out,
                   "--assets", joint["tmp"], *TINY_WORLD)
    assert r.returncode == 0, describe(r)
    wm = common.load_world(out)
    assert wm.game == "ALE/Breakout-v5" and wm.n_actions == 4 and "games" not in common.load_checkpoint(out)


# -----------------------------------------------------------------------------
# SpaceInvaders: the tracker and the object detector

def test_spaceinvaders_objects_at_the_start():
    env = common.make_env("SpaceInvaders", seed=0)
    env.reset(seed=0)
    for _ in range(5):
        obs = env.step(0)[0]
    env.close()
    for space in ("rgb84x64", "gray84x84"):
        found = common.spaceinvaders_objects(common.preprocess(obs[None], space)[0].permute(1, 2, 0).numpy().squeeze(),
                                             space)
        assert len(found["invaders"]) == 36 and found["cannon"] is not None, (space, found)


def test_dream_env_of_one_game(joint):
    env = gym.make("AtariDream-v0", world=str(joint["world"]), game="Breakout", temperature=0)
    assert env.action_space.n == 4 and env.unwrapped.get_action_meanings() == ["NOOP", "FIRE", "RIGHT", "LEFT"]
    obs, _ = env.reset(seed=0)
    assert env.step(3)[0].shape == obs.shape
    env.close()
