"""common.py -- the one shared module: what two or more scripts use, in pipeline order.

  1. running a script   KitError, run, flags() and its type checks, pick_device, compiled,
                        seed_everything, LossWatch, resume; torchrun: distributed, per_rank,
                        rank_zero_first, all_sum, all_gather, average_gradients
  2. the game           make_env (every script and evaluation plays through it), ALE's 18 actions
                        (full_actions, trained_games: models of several games), the keyboard,
                        check_display, the policies (random, sticky, tracker, mix), the trained
                        agent (Agent, AgentPolicy: train_agent.py)
  3. frames             FRAME_SPACES, preprocess, to_image, to_float / to_uint8, stack_frames
  4. files              episodes, the train/validation split, scan_dataset(s), frame_runs,
                        background, FrameStream (frames read as training needs them),
                        checkpoints, the token and latent caches, windows, pack/take (batches
                        gathered on the device)
  5. tokenizers         VQVAE (discrete, seed 003), ConvAE (continuous, seeds 000 and 004)
  6. dynamics           TokenDynamics (conv), TokenAttention, Outcome (reward and end heads) and
                        their training (outcome_transitions, outcome_loss), LatentMLP, LatentGRU,
                        LatentOutcome, LatentActionDynamics, make_dynamics
  7. the world contract load_world -> context, observe, reset, step (+ reward, terminated); the
                        batched core under it; the dream as a gymnasium env: DreamEnv
                        ("AtariDream-v0"), DreamVecEnv
  8. scoring            psnr, the Pong, Breakout and SpaceInvaders objects and their scores, open_loop,
                        outcome_scores, dream_gif

Read it top to bottom once; the scripts are thin on purpose.
"""
import argparse
import atexit
import ctypes
import datetime
import difflib
import functools
import glob
import hashlib
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor

import ale_py
import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

gym.register_envs(ale_py)  # ale-py ships the ROMs; this makes ALE/<Game>-v5 known to gym.make

# =============================================================================
# 1. running a script: errors, flags, device, seeding, the training loop's guards

class KitError(Exception):
    """A user-facing error: printed as one line by `run`, exit code 2."""


def run(main):
    """Call `main()`; turn a KitError into `error: ...` on stderr and exit 2, and a Ctrl-C that
    lands outside a script's own handler (loading data, say) into a quiet exit 130."""
    try:
        main()
        if dist.is_initialized():  # torchrun: the ranks leave together, once rank 0 has written
            dist.barrier()
            dist.destroy_process_group()
        return
    except KitError as e:
        error = str(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    # printed once the exception, and with it main's progress bars, are gone: a bar closed
    # after the message would redraw itself below it
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def flags(doc):
    """A script's argparse parser: the docstring's first line as its description, defaults in
    --help, and a bad flag as one `error:` line and exit 2, like any other bad input."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda message: p.exit(2, f"error: {message} (see {p.prog} --help)\n")
    return p


def renamed(p, old, new, **kw):
    """Keep an old flag name working for one release: hidden from --help, a warning when used,
    and the value stored under the new flag's name."""
    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"warning: {old} is now {new}; the old name goes away in the next release", file=sys.stderr)
            setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
    p.add_argument(old, dest=new.lstrip("-").replace("-", "_"), action=Renamed, help=argparse.SUPPRESS, **kw)


def _number(text, kind, ok, what):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got '{text}'")
    return value


def positive_int(text):
    return _number(text, int, lambda v: v > 0, "positive (an integer)")


def nonneg_int(text):
    return _number(text, int, lambda v: v >= 0, "0 or more (an integer)")


def positive_float(text):
    return _number(text, float, lambda v: v > 0, "positive (a finite number)")


def nonneg_float(text):
    return _number(text, float, lambda v: v >= 0, "0 or more (a finite number)")


def probability(text):
    return _number(text, float, lambda v: 0 <= v <= 1, "between 0 and 1")


def policy_flag(*names):
    """The type of a --policy flag: one of `names`, or agent:PATH (a train_agent.py checkpoint)."""
    def check(text):
        if text in names or (text.startswith("agent:") and len(text) > len("agent:")):
            return text
        raise argparse.ArgumentTypeError(f"'{text}' is not a policy ({', '.join(names)}, agent:PATH)")
    return check

def pick_device(name=None):
    """cuda, then mps, then cpu; `name` (the --device flag) overrides. On CUDA, cuDNN picks its
    fastest algorithm once per conv shape (every shape here is fixed) and float32 matmuls may
    use TF32 ("high"): both are free speed for models this small."""
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise KitError(f"--device {name}: CUDA is not available on this machine")
        if name == "mps" and not torch.backends.mps.is_available():
            raise KitError("--device mps: MPS is not available on this machine")
        if name not in ("cpu", "mps") and not name.startswith("cuda"):
            raise KitError(f"--device {name}: not a device this kit runs on (cuda, cuda:N, mps, cpu)")
        device = torch.device(name)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                              else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    return device


def compiled(model, device, in_place=False, **kw):
    """torch.compile(model, **kw) (`in_place`: model.compile(), so that the module stays itself
    and its state_dict carries no "_orig_mod." keys), or one line saying why not: before torch
    2.8 Inductor has no MPS backend, and the first compiled call on a Mac dies in a traceback."""
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if torch.device(device).type == "mps" and version < (2, 8):
        raise KitError(f"--compile on mps needs torch 2.8 or later (this is {torch.__version__}): "
                       f"upgrade torch or leave --compile off")
    if in_place:
        model.compile(**kw)
        return model
    return torch.compile(model, **kw)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class LossWatch:
    """A training loop's view of its loss without a GPU->CPU sync every step: the first step
    whose loss is not finite is kept on the device, and read (with the loss for the progress
    bar) only every `every` steps and before each save. A NaN then stops the run within
    `every` steps, still naming the step it began at, and is never saved over a good checkpoint."""

    def __init__(self, every=20):
        self.every, self.first_bad = every, None

    def __call__(self, loss, step):
        """Note this step's loss -> True on the steps whose loss the caller may read (and check())."""
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(bad, step, -1) if self.first_bad is None else \
            torch.where((self.first_bad < 0) & bad, step, self.first_bad)
        return (step + 1) % self.every == 0

    def check(self, out):
        """Stop with one line if any loss since the start was not finite; the last good
        checkpoint at `out` stays as it is."""
        if self.first_bad is not None and int(self.first_bad) >= 0:
            kept = f"last good checkpoint kept at {out}" if os.path.exists(out) else "no checkpoint was written yet"
            raise KitError(f"loss became non-finite at step {int(self.first_bad)}; {kept}")


def resume(path, kind, model, opt, **same):
    """--resume: load `path`'s weights, optimizer, step and metrics into model and opt. Every
    keyword names a checkpoint entry that must equal this run's (model_args, frame_space, ...):
    other flags would make another model. -> (checkpoint, step, metrics)"""
    ck = load_checkpoint(path, (kind,))
    for key, value in same.items():
        if ck.get(key) != value:
            raise KitError(f"--resume: {path} was trained with another {key} ({ck.get(key)}; this run: {value})")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    print(f"resumed {path} at step {ck['step']}")
    return ck, ck["step"], ck.get("metrics", {})


def distributed(name=None):
    """This process's place among torchrun's processes -> (rank, ranks, device); a plain run is
    (0, 1, pick_device(name)). Under `torchrun --nproc_per_node N` (RANK is set) it joins the
    process group as nanoGPT's train.py does: NCCL on CUDA, each rank on its own GPU
    (LOCAL_RANK), gloo on the CPU. Rank 0 logs, evaluates and writes; the other ranks print
    nothing and draw no progress bars (theirs would draw over rank 0's), but their errors show."""
    device = pick_device(name)
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "mps":
        raise KitError("torchrun: gloo cannot reduce MPS tensors; run one process, or --device cpu")
    rank, ranks = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    try:  # rank 0 alone writes the caches while the others wait (8 minutes for a million frames on 2 cores)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    except (ValueError, RuntimeError) as e:  # RANK set by hand, or a rendezvous that never answers
        raise KitError(f"cannot join the torchrun process group ({first_line(e)}): launch with "
                       f"torchrun --nproc_per_node N, or unset RANK to run one process") from None
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())  # an error's way out
    if rank:
        import tqdm
        sys.stdout = open(os.devnull, "w")
        init = tqdm.tqdm.__init__
        tqdm.tqdm.__init__ = lambda self, *a, **kw: init(self, *a, **{**kw, "disable": True})
    return rank, ranks, device


def per_rank(batch, ranks, flag="--batch"):
    """Each rank's share of a global batch. average_gradients makes N ranks of batch/N one step
    of the global batch, so a run's batch, and with it its loss curve, does not change with N."""
    if batch % ranks:
        raise KitError(f"{flag} {batch} does not split over {ranks} processes: use a multiple of {ranks}")
    return batch // ranks


def rank_zero_first(rank, fn):
    """fn() on rank 0 first (it may write a cache), then on the other ranks (which read it)."""
    if rank == 0:
        out = fn()
    if dist.is_initialized():
        dist.barrier()
    return fn() if rank else out


def all_sum(x, ranks):
    """x summed over the ranks (x itself in one process)."""
    if ranks > 1:
        x = x.detach().clone()
        dist.all_reduce(x)
    return x


def all_gather(x, ranks):
    """Every rank's x, concatenated in rank order along dim 0 (x itself in one process)."""
    if ranks == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(ranks)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def average_gradients(params, ranks):
    """What DistributedDataParallel does to a step, between backward and the optimizer: every
    rank's gradients become the mean over the ranks. One all-reduce of one flat buffer: DDP's
    buckets overlap it with the backward, which buys nothing at these model sizes, and a plain
    call works unchanged across several modules, K-step rollouts and two-stage scripts."""
    if ranks == 1:
        return
    params = [p for p in params if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.div_(ranks).split([p.numel() for p in params])):
        p.grad = g.view_as(p)


# =============================================================================
# 2. the game: the env every script and evaluation uses, the keyboard, the policies

def _ale_games():
    return {k[4:-3].lower(): k for k in gym.registry if k.startswith("ALE/") and k.endswith("-v5")}


def resolve_game(game):
    """'Pong', 'pong', 'ALE/Pong-v5' -> 'ALE/Pong-v5'; unknown -> KitError with a suggestion."""
    games = _ale_games()
    if game in games.values():
        return game
    key = game.lower().removeprefix("ale/").split("-v")[0].replace("_", "").replace(" ", "")
    if key in games:
        return games[key]
    close = difflib.get_close_matches(key, games, n=3)
    hint = f" (did you mean {', '.join(games[c][4:-3] for c in close)}?)" if close else ""
    raise KitError(f"unknown game '{game}'{hint}; any ALE game works, e.g. Pong, Breakout, SpaceInvaders")


class MaxPoolSkip(gym.Wrapper):
    """Repeat each action `skip` frames and return the max of the last two frames.

    Atari sprites flicker (drawn on alternate frames), so the DQN-style max over the
    last two emulator frames keeps them visible (seed 003, "max-pool last 2 frames").
    Steps the ALE directly: the emulator is the cost, not Python wrappers.
    """

    def __init__(self, env, skip):
        super().__init__(env)
        self.skip = skip
        self.ale = env.unwrapped.ale
        self.action_set = env.unwrapped._action_set
        self._a = np.zeros((210, 160, 3), np.uint8)
        self._b = np.zeros((210, 160, 3), np.uint8)

    def step(self, action):
        ale, a, reward = self.ale, self.action_set[int(action)], 0.0
        for k in range(self.skip):
            reward += ale.act(a)
            if k == self.skip - 2:
                ale.getScreenRGB(self._a)
        ale.getScreenRGB(self._b)
        obs = np.maximum(self._a, self._b) if self.skip > 1 else self._b.copy()
        return obs, reward, ale.game_over(with_truncation=False), ale.game_truncated(), {"lives": ale.lives()}


def make_env(game, seed=None, sticky=0.0, frameskip=4):
    """The kit's Atari env: frameskip 4 with max of the last two frames, sticky actions off
    by default (`sticky` is the repeat probability, 0.25 in Machado et al. 2018), the game's
    minimal action set. Reset once with `seed` so that the first episode is reproducible."""
    env_id = resolve_game(game)
    env = MaxPoolSkip(gym.make(env_id, frameskip=1, repeat_action_probability=sticky), frameskip)
    env.game = env_id
    env.action_meanings = env.unwrapped.get_action_meanings()
    if seed is not None:
        env.reset(seed=int(seed))
    return env


FULL_ACTIONS = tuple(a.name for a in ale_py.Action)  # ALE's 18 actions, in full_action_space=True order


def full_actions(meanings):
    """A game's minimal action meanings -> their indices among ALE's 18: the one action space
    that several games share in a joint model (seed 004)."""
    return [FULL_ACTIONS.index(m) for m in meanings]


def trained_games(ck):
    """The games a tokenizer or world checkpoint was trained on -> {game id: its minimal action
    meanings}, in the order of the model's game input."""
    return dict(ck["games"]) if "games" in ck else {ck["game"]: [str(m) for m in ck["action_meanings"]]}


# -----------------------------------------------------------------------------
# keyboard: the keymap comes from the game's action meanings (collect --policy human, play.py)

KEYS = ("UP", "DOWN", "LEFT", "RIGHT", "FIRE")


def action_for_keys(pressed, meanings):
    """Map a set of held keys (names from KEYS) to the game's action index; nothing -> NOOP.

    Games with LEFT/RIGHT but no UP/DOWN (Pong: RIGHT moves the paddle up) take the
    UP/DOWN arrows as RIGHT/LEFT, so the arrow you press is the way the paddle goes."""
    pressed = set(pressed)
    has_vertical = any("UP" in m or "DOWN" in m for m in meanings)
    if not has_vertical:
        pressed = {"RIGHT" if k == "UP" else "LEFT" if k == "DOWN" else k for k in pressed}
    for a, b in (("UP", "DOWN"), ("LEFT", "RIGHT")):
        if a in pressed and b in pressed:
            pressed -= {a, b}
    best, best_n = 0, 0
    for i, m in enumerate(meanings):
        parts = {k for k in KEYS if k in m}
        if parts <= pressed and len(parts) > best_n:
            best, best_n = i, len(parts)
    return best


def check_display(hint):
    """Fail before loading anything when no window can open, and say what works instead."""
    driver = os.environ.get("SDL_VIDEODRIVER", "")
    if driver in ("dummy", "offscreen"):
        raise KitError(f"no window can open with SDL_VIDEODRIVER={driver}; {hint}")
    has_display = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if sys.platform.startswith("linux") and not driver and not has_display:
        raise KitError(f"no display to open a window on (DISPLAY is not set); {hint}")


def pygame_keys():
    """pygame key code -> name in KEYS (arrows, space for FIRE). Imported lazily: headless
    scripts never load pygame."""
    import pygame
    return {pygame.K_UP: "UP", pygame.K_DOWN: "DOWN", pygame.K_LEFT: "LEFT",
            pygame.K_RIGHT: "RIGHT", pygame.K_SPACE: "FIRE"}


# -----------------------------------------------------------------------------
# policies: random, sticky, tracker (reads the RAM), mix. collect.py records them,
# play.py drives dreams with them.

class RandomPolicy:
    def __init__(self, n, rng):
        self.n, self.rng = n, rng

    def __call__(self, env, obs=None):
        return int(self.rng.integers(self.n))


class StickyPolicy:
    """Hold a random action for 1..max_hold steps: far more paddle positions than uniform noise."""

    def __init__(self, n, rng, max_hold=16):
        self.n, self.rng, self.max_hold, self.left, self.a = n, rng, max_hold, 0, 0

    def __call__(self, env, obs=None):
        if self.left <= 0:
            self.a, self.left = int(self.rng.integers(self.n)), int(self.rng.integers(1, self.max_hold + 1))
        self.left -= 1
        return self.a


SPACE_INVADERS_CANNON = (185, 195)   # raw rows of the player's cannon
SPACE_INVADERS_FIELD = (31, 155)     # raw rows the invaders march in, above the bunkers
SPACE_INVADERS_GREEN = (50, 132, 50)  # the cannon (and the player's score)
SPACE_INVADERS_SHOT = (142, 142, 142)
SPACE_INVADERS_DANGER = 150           # shots below this raw row reach the cannon within a few steps


class TrackerPolicy:
    """A scripted player: it follows the ball using the emulator RAM (Pong, Breakout), or stands
    under the nearest invader and shoots (SpaceInvaders, from the frame it is shown).

    It plays the role the seeds give a trained DQN agent: it reaches rallies, broken bricks and
    later waves that random play never sees. RAM offsets were checked against the pixels
    (tests/test_collect.py). `eps` random actions keep it from being perfectly predictable."""

    GAMES = ("ALE/Pong-v5", "ALE/Breakout-v5", "ALE/SpaceInvaders-v5")

    def __init__(self, game, meanings, rng, eps=0.05):
        self.game, self.rng, self.eps = game, rng, eps
        self.idx = {m: i for i, m in enumerate(meanings)}

    def __call__(self, env, obs=None):
        ram = env.ale.getRAM()
        if self.rng.random() < self.eps:
            return int(self.rng.integers(len(self.idx)))
        if self.game == "ALE/SpaceInvaders-v5":
            return self.aim(obs)
        if self.game == "ALE/Pong-v5":
            if ram[54] == 0:  # ball not in play
                return self.idx["NOOP"]
            # paddle centre row = ram[51] - 6, ball centre row = ram[54] - 12 (raw pixels)
            d = (int(ram[54]) - 12) - (int(ram[51]) - 6)
            return self.idx["RIGHT"] if d < -3 else self.idx["LEFT"] if d > 3 else self.idx["NOOP"]
        # Breakout: paddle centre col = ram[72] - 39, ball centre col = ram[99] - 48
        if ram[101] == 0:  # ball not in play: serve
            return self.idx["FIRE"]
        d = (int(ram[99]) - 48) - (int(ram[72]) - 39)
        return self.idx["RIGHT"] if d > 4 else self.idx["LEFT"] if d < -4 else self.idx["NOOP"]

    def aim(self, obs):
        """SpaceInvaders: the cannon (green, raw rows 185-194) under the nearest column of invaders
        (anything drawn between the top score and the bunkers but the grey shots), firing. The RAM
        keeps the invaders as a bitmask per row and a formation offset; the pixels are simpler."""
        cannon = np.nonzero(np.all(obs[SPACE_INVADERS_CANNON[0]:SPACE_INVADERS_CANNON[1]] == SPACE_INVADERS_GREEN,
                                   axis=-1).any(0))[0]
        field = obs[SPACE_INVADERS_FIELD[0]:SPACE_INVADERS_FIELD[1]]
        invaders = np.nonzero((field.any(-1) & ~np.all(field == SPACE_INVADERS_SHOT, axis=-1)).any(0))[0]
        if not len(cannon) or not len(invaders):
            return self.idx["FIRE"]
        x = cannon.mean()
        shots = np.nonzero(np.all(obs[SPACE_INVADERS_DANGER:SPACE_INVADERS_CANNON[0]] == SPACE_INVADERS_SHOT,
                                  axis=-1).any(0))[0]
        near = shots[np.abs(shots - x) < 8]
        if len(near):  # a shot coming down on the cannon: step away from it first
            return self.idx["LEFTFIRE"] if near.mean() > x else self.idx["RIGHTFIRE"]
        d = invaders[np.argmin(np.abs(invaders - x))] - x
        return self.idx["RIGHTFIRE"] if d > 2 else self.idx["LEFTFIRE"] if d < -2 else self.idx["FIRE"]


class MixPolicy:
    """Switch among tracker / sticky / random segments of 10..200 steps, so the data has both
    competent play and every action in every situation."""

    def __init__(self, parts, weights, rng):
        self.parts, self.rng, self.left, self.cur = parts, rng, 0, None
        self.p = np.asarray(weights, np.float64) / np.sum(weights)

    def __call__(self, env, obs=None):
        if self.left <= 0:
            self.cur = self.parts[int(self.rng.choice(len(self.parts), p=self.p))]
            self.left = int(self.rng.integers(10, 201))
            getattr(self.cur, "reset", lambda: None)()  # an agent's frame stack is stale by now
        self.left -= 1
        return self.cur(env, obs)


def make_policy(name, env, rng, mix_weights=(0.5, 0.3, 0.2), warn=True, agent=None):
    """random | sticky | tracker | mix | agent:PATH (a train_agent.py checkpoint). A tracker asked
    for a game without one falls back to sticky, with a warning; mix then drops its tracker share,
    unless `agent` (a checkpoint path) plays that share instead."""
    n = env.action_space.n
    has_tracker = env.game in TrackerPolicy.GAMES
    if name == "random":
        return RandomPolicy(n, rng)
    if name == "sticky":
        return StickyPolicy(n, rng)
    if name.startswith("agent:"):
        return AgentPolicy.load(name[len("agent:"):], env.game, env.action_meanings, rng)
    if name == "tracker":
        if has_tracker:
            return TrackerPolicy(env.game, env.action_meanings, rng)
        if warn:
            print(f"warning: no tracker for {env.game} (only Pong, Breakout, SpaceInvaders); using sticky",
                  file=sys.stderr)
        return StickyPolicy(n, rng)
    if name == "mix":
        w_track, w_sticky, w_rand = mix_weights
        if agent:
            player = AgentPolicy.load(agent, env.game, env.action_meanings, rng)
        elif has_tracker:
            player = TrackerPolicy(env.game, env.action_meanings, rng)
        else:
            if warn and w_track > 0:
                print(f"warning: no tracker for {env.game}; mix uses sticky and random only", file=sys.stderr)
            player, w_track = None, 0.0
        parts = [player, StickyPolicy(n, rng), RandomPolicy(n, rng)]
        keep = [(p, w) for p, w in zip(parts, (w_track, w_sticky, w_rand)) if w > 0 and p is not None]
        if not keep:
            raise KitError("--mix weights must have at least one positive entry")
        return MixPolicy([p for p, _ in keep], [w for _, w in keep], rng)
    raise KitError(f"unknown policy '{name}' (random, sticky, tracker, mix, agent:PATH)")


# -----------------------------------------------------------------------------
# the learned agent (train_agent.py): an actor-critic over a world's tokens, trained in the
# dream; as a policy it plays any frames: the real game (collect.py, the evaluation) or a
# dream (play.py), through its own copy of the world's tokenizer.

class Agent(nn.Module):
    """Actor-critic over the last `stack` frames of tokens (B, stack, h, w): a learned embedding
    per code, two strided convs, one hidden layer, then the policy's logits and the value.
    CleanRL's ppo_atari.py network and initialisation, shrunk to a 21x16 grid of codes."""

    def __init__(self, n_codes, grid, n_actions, stack=4, emb=8, dim=32, hidden=256):
        super().__init__()
        self.n_actions, self.stack = n_actions, stack

        def init(layer, std=math.sqrt(2)):  # orthogonal, as CleanRL (from Engstrom et al. 2020)
            nn.init.orthogonal_(layer.weight, std)
            nn.init.zeros_(layer.bias)
            return layer

        self.embed = nn.Embedding(n_codes, emb)
        self.convs = nn.Sequential(init(nn.Conv2d(stack * emb, dim, 4, 2, 1)), nn.ReLU(),
                                   init(nn.Conv2d(dim, 2 * dim, 3, 2, 1)), nn.ReLU(), nn.Flatten())
        n = self.convs(torch.zeros(1, stack * emb, *grid)).shape[1]
        self.hidden = nn.Sequential(init(nn.Linear(n, hidden)), nn.ReLU())
        self.actor = init(nn.Linear(hidden, n_actions), 0.01)  # near-uniform first policy
        self.critic = init(nn.Linear(hidden, 1), 1.0)

    def forward(self, tokens):
        """(B, stack, h, w) codes -> policy logits (B, n_actions), value (B,)"""
        x = self.embed(tokens).permute(0, 1, 4, 2, 3).flatten(1, 2)
        x = self.hidden(self.convs(x))
        return self.actor(x), self.critic(x)[:, 0]


def push_frames(stack, codes, fresh):
    """The agent's frame stack (B, stack, h, w) with the newest codes (B, h, w) appended; a dream
    or game that starts afresh (fresh: (B,) bool) fills its stack with its first frame, as
    gymnasium's FrameStackObservation does at a reset."""
    stack = torch.cat([stack[:, 1:], codes[:, None]], 1)
    stack[fresh] = codes[fresh, None]
    return stack


class AgentPolicy:
    """A trained agent as a policy: frames -> tokens (the agent's copy of the world's tokenizer)
    -> its frame stack -> an action drawn from its policy. One game (__call__, as collect.py's
    policies) or a batch of games in lockstep (act_batch, train_agent.py's evaluation)."""

    def __init__(self, agent, tok, space, seed=0):
        self.agent, self.tok, self.space = agent.eval(), tok.eval(), space
        self.gen, self.stack = torch.Generator().manual_seed(int(seed)), None

    @staticmethod
    @functools.lru_cache(maxsize=4)
    def _read(path):
        """A checkpoint's agent and tokenizer, read once per process: collect.py asks for a fresh
        policy every episode, and they only ever run inference."""
        ck = load_checkpoint(path, ("agent",))
        agent, tok = Agent(**ck["model_args"]), VQVAE(**ck["tokenizer_args"])
        agent.load_state_dict(ck["model"])
        tok.load_state_dict(ck["tokenizer"])
        return agent, tok, ck["frame_space"], ck["game"], list(ck["action_meanings"])

    @classmethod
    def load(cls, path, game, meanings, rng):
        agent, tok, space, its_game, its_meanings = cls._read(path)
        if its_game != game or its_meanings != list(meanings):
            raise KitError(f"agent {path} plays {its_game} with actions {its_meanings}; "
                           f"this is {game} with {list(meanings)}")
        return cls(agent, tok, space, int(rng.integers(2 ** 62)))

    def reset(self):
        self.stack = None

    @torch.inference_mode()
    def act_batch(self, frames, fresh):
        """frames (B, C, H, W) uint8 in the agent's frame space, fresh (B,) bool -> actions (B,) numpy"""
        codes = self.tok.encode(frames)
        fresh = torch.as_tensor(fresh) | (self.stack is None)
        self.stack = push_frames(codes[:, None].repeat(1, self.agent.stack, 1, 1) if self.stack is None
                                 else self.stack, codes, fresh)
        logits, _ = self.agent(self.stack)
        return torch.multinomial(logits.softmax(-1).cpu(), 1, generator=self.gen)[:, 0].numpy()

    def act(self, frame):
        """One frame of a dream, as the contract gives it (H, W, C or H, W numpy) -> an action."""
        return int(self.act_batch(frames_tensor(frame[None]), [False])[0])

    def __call__(self, env, obs):
        """A raw frame of the real game (210, 160, 3) -> an action."""
        return int(self.act_batch(preprocess(obs[None], self.space), [False])[0])


# =============================================================================
# 3. frames: data is stored raw (210x160x3); each model preprocesses at training time

FRAME_SPACES = {  # name -> (H, W, C)
    "rgb84x64": (84, 64, 3),   # aspect-true RGB (seed 003)
    "rgb84x64max": (84, 64, 3),  # the same grid, each pixel the brightest of its raw footprint
    "gray84x84": (84, 84, 1),  # seed 000
    "gray64x64": (64, 64, 1),  # seed 004
}


def frame_shape(space):
    if space not in FRAME_SPACES:
        raise KitError(f"unknown frame space '{space}' ({', '.join(FRAME_SPACES)})")
    return FRAME_SPACES[space]


def _fifths(x, dim, pool=sum):
    """5 -> 2 along dim, pooling raw pixels 0-2 and 2-4: area resampling's windows at 2.5x."""
    s = lambda i: x.narrow(dim, i, x.shape[dim] - 4)[(slice(None),) * dim + (slice(None, None, 5),)]
    return torch.stack([pool([s(0), s(1), s(2)]), pool([s(2), s(3), s(4)])], dim + 1).flatten(dim, dim + 1)


def _brightest(xs):
    return functools.reduce(torch.maximum, xs)


@torch.no_grad()
def preprocess(frames, space, chunk=512):
    """(N, 210, 160, 3) uint8 (numpy or torch) -> (N, C, H, W) uint8 torch, on the CPU.

    Area resampling (torch's adaptive average pooling): each output pixel is the mean of the
    raw pixels its footprint touches. Pong's ball is 2 raw pixels wide; nearest sampling at 64
    columns (every 2.5 px) can drop it and an antialiased bilinear resize smears it, while area
    keeps it as a 40-80% blob. At exactly 2.5x (210x160 -> rgb84x64, the default) the same
    means are summed in integers, twice as fast: streaming trainers preprocess every episode.
    A space whose name ends in "max" takes the brightest raw pixel of the same footprint
    instead (adaptive max pooling): a small sprite keeps its full color at every position,
    where area draws it as one of several faint blends of it and the background."""
    H, W, C = frame_shape(space)
    frames = torch.as_tensor(np.asarray(frames))
    single = frames.dim() == 3
    if single:
        frames = frames[None]
    out = torch.empty((len(frames), C, H, W), dtype=torch.uint8)
    lum = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    fifths = C == 3 and frames.shape[1:3] == (H * 5 // 2, W * 5 // 2) and H % 2 == W % 2 == 0
    max_pool = space.endswith("max")
    for i in range(0, len(frames), chunk):
        if fifths and max_pool:
            x = _fifths(_fifths(frames[i:i + chunk], 1, _brightest), 2, _brightest)
            out[i:i + chunk] = x.permute(0, 3, 1, 2)
            continue
        if fifths:  # 3x3 raw pixels per output pixel: 9 x 255 fits int16, and x / 9 is never a tie
            x = _fifths(_fifths(frames[i:i + chunk].to(torch.int16), 1), 2)
            out[i:i + chunk] = ((x + 4) // 9).to(torch.uint8).permute(0, 3, 1, 2)
            continue
        x = frames[i:i + chunk].permute(0, 3, 1, 2).float()
        if C == 1:
            x = (x * lum).sum(1, keepdim=True)
        x = F.adaptive_max_pool2d(x, (H, W)) if max_pool else F.interpolate(x, size=(H, W), mode="area")
        out[i:i + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out[0] if single else out


def to_image(x):
    """(C, H, W) or (H, W, C) uint8 -> (H, W, 3) uint8 numpy, for PNGs, GIFs and the screen."""
    x = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    if x.ndim == 3 and x.shape[0] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(1, 2, 0)
    if x.ndim == 2:
        x = x[..., None]
    return np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x


def to_float(x):
    """uint8 [0, 255] -> float [-1, 1]"""
    return x.float().div(127.5).sub(1.0)


def to_uint8(x):
    return x.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def stack_frames(frames, stack, starts=None):
    """(N, C, H, W) -> (len(starts), stack * C, H, W): for each start j, frames j .. j + stack - 1
    as channels, oldest first (default: every start). Only the stacks asked for are copied."""
    if starts is None:
        starts = torch.arange(len(frames) - stack + 1)
    return frames[starts[:, None] + torch.arange(stack)].flatten(1, 2)


# =============================================================================
# 4. files: episodes, checkpoints, the code caches

# episodes: one compressed npz per episode, allow_pickle=False.
# frames (N+1, 210, 160, 3) uint8; actions/rewards/terminated/truncated (N,):
# action[i] takes frames[i] to frames[i+1].

EPISODE_KEYS = ("frames", "actions", "rewards", "terminated", "truncated")


def _atomic_write(path, write):
    """write(fileobj) into a temp file beside `path`, then rename: readers never see half a file."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_episode(path, frames, actions, rewards, terminated, truncated, **meta):
    n = len(actions)
    assert len(frames) == n + 1 and len(rewards) == n, "frames must be N+1, actions/rewards N"
    arrays = dict(frames=np.asarray(frames, np.uint8), actions=np.asarray(actions, np.int64),
                  rewards=np.asarray(rewards, np.float32), terminated=np.asarray(terminated, bool),
                  truncated=np.asarray(truncated, bool))
    arrays.update({k: np.asarray(v) for k, v in meta.items()})

    def write(f):  # np.savez_compressed, at zlib level 1: 2x faster, files ~2x larger
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
            for k, v in arrays.items():
                with z.open(f"{k}.npy", "w", force_zip64=True) as fo:
                    np.lib.format.write_array(fo, v, allow_pickle=False)
    _atomic_write(path, write)


def load_episode(path, keys=None):
    """Load and validate one episode; any problem -> KitError naming the file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ep = {k: z[k] for k in (keys or z.files)}
            missing = [k for k in EPISODE_KEYS if k not in z.files]
    except Exception as e:  # zipfile.BadZipFile, OSError, ValueError, zlib.error, EOFError...
        raise KitError(f"cannot read episode {path}: {type(e).__name__}: {e}") from None
    if missing:
        raise KitError(f"{path} is not an episode file (missing {', '.join(missing)})")
    if "frames" in ep and "actions" in ep and len(ep["frames"]) != len(ep["actions"]) + 1:
        raise KitError(f"{path}: {len(ep['frames'])} frames for {len(ep['actions'])} actions (want N+1 for N)")
    return ep


def episode_files(folder):
    if not os.path.isdir(folder):
        raise KitError(f"no dataset folder {folder} (run collect.py first)")
    files = sorted(glob.glob(os.path.join(folder, "ep_*.npz")))
    if not files:
        raise KitError(f"no episodes (ep_*.npz) in {folder} (run collect.py first)")
    return files


def split_episodes(files, val_frac=0.1, seed=0):
    """Split by episode, never by frame, with a fixed seed. A file's side depends only on its
    name and the seed (a hash below the val_frac quantile), so adding episodes never moves an
    existing one across. A folder too small to get a validation episode gives its lowest hash."""
    key = lambda f: int(hashlib.sha1(f"{seed}:{os.path.basename(f)}".encode()).hexdigest()[:15], 16)
    val = {f for f in files if key(f) < val_frac * 16 ** 15}
    if not val and len(files) >= 2:
        val = {min(files, key=key)}
    return [f for f in files if f not in val], [f for f in files if f in val]


def scan_dataset(folder, val_frac=0.1, seed=0, skip_bad=False):
    """The episodes of `folder` without a frame read (only their small entries): (train, val,
    meta); train and val are lists of (file, frames in it), meta the game and its actions. For
    trainers that stream frames (FrameStream) instead of holding them all."""
    files, meta, lengths = episode_files(folder), None, {}
    for f in files:
        try:
            ep = load_episode(f, ["actions", "game", "action_meanings"])
        except KitError as e:
            if not skip_bad:
                raise KitError(f"{e} (use --skip-bad to go on without it)") from None
            print(f"warning: skipping {e}", file=sys.stderr)
            continue
        meta = meta or {"game": str(ep["game"]), "action_meanings": [str(m) for m in ep["action_meanings"]]}
        if str(ep["game"]) != meta["game"]:
            raise KitError(f"{f} is {ep['game']} but {folder} also holds {meta['game']}: one game per folder")
        if len(ep["actions"]):
            lengths[f] = len(ep["actions"]) + 1
    if not lengths:
        raise KitError(f"no usable episodes in {folder}")
    train_f, val_f = split_episodes(sorted(lengths), val_frac, seed)
    train, val = [(f, lengths[f]) for f in train_f], [(f, lengths[f]) for f in val_f]
    return (val, [], meta) if not train else (train, val, meta)


def scan_datasets(folders, val_frac=0.1, seed=0, skip_bad=False):
    """scan_dataset of several folders, one game each (a model of several games) -> [(train, val,
    meta)] in their order; a game in two folders is refused."""
    out, seen = [], set()
    for folder in folders:
        train, val, meta = scan_dataset(folder, val_frac, seed, skip_bad)
        if meta["game"] in seen:
            raise KitError(f"{folder} is {meta['game'][4:-3]} again: one folder per game")
        seen.add(meta["game"])
        out.append((train, val, meta))
    return out


def frame_runs(episodes, space, n, length=1, most=16):
    """n runs of `length` consecutive frames, evenly spaced over all the runs of `most` episodes
    evenly spaced in `episodes` ((file, frames) pairs) -> (n, length, C, H, W) uint8, reading
    one episode at a time: a validation set, quick to read whatever the dataset's size."""
    episodes = [episodes[i] for i in np.linspace(0, len(episodes) - 1, min(most, len(episodes))).round().astype(int)]
    runs = [max(count - length + 1, 0) for _, count in episodes]
    picks = torch.linspace(0, sum(runs) - 1, min(n, sum(runs))).long()
    out, offset = [], 0
    for (f, _), count in zip(episodes, runs):
        mine = picks[(picks >= offset) & (picks < offset + count)] - offset
        if len(mine):
            frames = preprocess(load_episode(f, ["frames"])["frames"], space)
            out.append(frames[mine[:, None] + torch.arange(length)])
        offset += count
    if not out:
        raise KitError(f"no episode holds {length} frames")
    return torch.cat(out)


def background(episodes, space, seed=0):
    """The static background, (C, H, W) float: the median of 2000 frames of 8 random episodes
    ((file, frames) pairs). The tokenizers' trainers weight the pixels that differ from it."""
    few = [episodes[i] for i in np.random.default_rng(seed).permutation(len(episodes))[:8]]
    return frame_runs(few, space, 2000)[:, 0].float().median(0).values


def release_heap():
    """Hand freed heap back to the OS. Decoding an episode frees ~0.3 GB of temporaries that
    glibc keeps in its arenas, and a worker holding 0.5 GB of frames was measured at 2 GB
    without this. A no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class FrameStream(torch.utils.data.IterableDataset):
    """Endless batches of `batch` runs of `length` consecutive frames, (batch, length, C, H, W)
    uint8, read from the episode files as they are needed. Each DataLoader worker holds
    episodes, decoded and preprocessed, up to `hold` frames, and draws every batch uniformly
    over their runs: a dataset that fits is held whole (and read once, an episode per batch
    while the first batches train); a larger one streams through, the oldest episode swapped
    for a random unheld one (by file size, ~ length) every `turn` batches. Memory is `hold`
    frames a worker whatever the dataset's size. A bad file is skipped with a warning
    (skip_bad) or handed to the trainer, as the KitError to raise."""

    def __init__(self, episodes, space, batch, length=1, seed=0, skip_bad=False, hold=2 ** 15, turn=64):
        super().__init__()
        self.files = [f for f, count in episodes if count >= length]
        self.space, self.batch, self.length, self.seed, self.skip_bad = space, batch, length, seed, skip_bad
        self.hold, self.turn = hold, turn

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        size = np.array([os.path.getsize(f) for f in self.files], float)
        held, bad, n = [], set(), 0  # held: (file index, frames), oldest first
        while True:
            free = np.setdiff1d(np.arange(len(self.files)), [*bad, *(j for j, _ in held)])
            growing = sum(len(frames) for _, frames in held) < self.hold
            if len(free) and (growing or n % self.turn == 0):
                i = rng.choice(free, p=size[free] / size[free].sum())
                try:
                    frames = preprocess(load_episode(self.files[i], ["frames"])["frames"], self.space)
                except KitError as e:
                    if not self.skip_bad:
                        yield KitError(f"{e} (use --skip-bad to go on without it)")
                        return
                    print(f"warning: skipping {e}", file=sys.stderr)
                    bad.add(i)
                    continue
                held = held[int(not growing):] + [(i, frames)]  # a swap drops the oldest
                release_heap()
            if not held:
                yield KitError("no readable episodes to stream")
                return
            runs = np.array([len(frames) - self.length + 1 for _, frames in held])
            which = rng.choice(len(held), self.batch, p=runs / runs.sum())
            starts = rng.integers(runs[which])
            yield torch.stack([held[k][1][s:s + self.length] for k, s in zip(which, starts)])
            n += 1


# the trainers' --workers: a quarter of the cores, at most 4, and none below 4 cores, where a worker
# takes a core from training's threads (1M Pong frames on 2 cores: 5.3 steps/s with one, 5.7 without)
STREAM_WORKERS = min(4, (os.cpu_count() or 1) // 4)


def frame_stream(episodes, space, batch, length=1, workers=STREAM_WORKERS, seed=0, skip_bad=False, hold=2 ** 15):
    """An endless iterator of FrameStream batches from `workers` processes (0: this one), each
    with its own seed, so decoding runs beside training. Raises what a worker could not read."""
    loader = torch.utils.data.DataLoader(FrameStream(episodes, space, batch, length, seed, skip_bad, hold),
                                         batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
                                         persistent_workers=workers > 0)
    for x in loader:
        if isinstance(x, KitError):
            raise x
        yield x

# -----------------------------------------------------------------------------
# checkpoints: self-describing dicts (kind, model args, frame space, game, actions, step,
# flags, weights); written atomically, read with weights_only=True

def save_checkpoint(path, ckpt):
    """Written atomically; a Ctrl-C that lands while it is written waits for the write, then
    stops the script as usual (whose handler saves once more): a checkpoint is never cut short."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if threading.current_thread() is not threading.main_thread():  # signals are the main thread's
        return _atomic_write(path, lambda f: torch.save(ckpt, f))
    caught, handler = [], signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        _atomic_write(path, lambda f: torch.save(ckpt, f))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if handler is None else handler)
    if caught:  # now, to the script's own handler
        signal.raise_signal(signal.SIGINT)


# constructor arguments renamed since checkpoints were first written: old files still load
RENAMED_ARGS = {"latent": "code_dim", "n_latent": "n_latent_actions"}


def first_line(e):
    """An exception as `Type: first line of its message`, for one-line errors."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def load_checkpoint(path, kinds=None):
    """Load a kit checkpoint; `kinds` is the tuple of kinds the caller accepts."""
    if not os.path.isfile(path):
        raise KitError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KitError(f"cannot read checkpoint {path}: {first_line(e)}") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise KitError(f"{path} is not a checkpoint written by this kit")
    if kinds and ckpt["kind"] not in kinds:
        raise KitError(f"{path} is a '{ckpt['kind']}' checkpoint; expected {' or '.join(kinds)}")
    for key in ("model_args", "tokenizer_args", "encoder_args"):
        if isinstance(ckpt.get(key), dict):
            ckpt[key] = {RENAMED_ARGS.get(k, k): v for k, v in ckpt[key].items()}
    return ckpt


# -----------------------------------------------------------------------------
# code caches: every frame of a dataset encoded once per tokenizer

def file_key(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@torch.no_grad()
def _encoded(data_dir, tok_path, encode, space, game, skip_bad, name, read=True):
    """encode(frames) of every episode of `data_dir` (frames (N+1, C, H, W) uint8 in `space`
    -> a numpy array), cached under the tokenizer checkpoint's hash, so that the dynamics never
    re-encode frames. Two files: data_dir/<name>.npy, every episode's codes one after another,
    and data_dir/<name>.json, the index (which episode starts where). A cache built by another
    tokenizer is rebuilt; episodes added since are encoded and appended. The file is written
    one episode at a time while two threads decode the next ones: memory holds three episodes,
    not the dataset. It is read memory-mapped (as nanoGPT reads its token files): the trainers
    gather their windows from the file, so their memory stays flat as the dataset grows.
    `game`: the tokenizer's game, or its games (trained_games). -> {file name: array}, slices
    of one memory-mapped array (pack() reads them in place), or None if not `read`."""
    from tqdm import tqdm
    games = [game] if isinstance(game, str) else list(game)
    key, path, index = file_key(tok_path), os.path.join(data_dir, f"{name}.npy"), os.path.join(data_dir, f"{name}.json")
    files = episode_files(data_dir)
    # an episode re-recorded under the same name has another size or mtime: encode it again
    sig = {os.path.basename(f): f"{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in files}
    old, kept = _read_cache(path, index, key, name), []
    if old is not None:
        kept = [e for e in old[1] if e[0] in sig and e[1] == sig[e[0]]]
    done = {e[0] for e in kept}
    todo = [f for f in files if os.path.basename(f) not in done]

    def decode(f):  # zlib and the resize release the GIL: the next episodes decode while one encodes
        try:
            ep = load_episode(f, keys=["frames", "game"])
        except KitError as e:
            return e
        return str(ep["game"]), preprocess(ep["frames"], space) if str(ep["game"]) in games else None

    episodes = []  # [file, sig, first row, rows] of each episode written

    def write(fo):
        fo.write(bytes(_NPY_HEADER))  # the header, once the shape is known, goes here at the end
        rows, like = 0, old[0][:0] if kept else None
        for f, s, start, n in kept:
            fo.write(old[0][start:start + n].tobytes())
            episodes.append([f, s, rows, n])
            rows += n
        with ThreadPoolExecutor(2) as pool:
            ahead = [(f, pool.submit(decode, f)) for f in todo[:2]]
            for i in tqdm(range(len(todo)), desc=f"encode {name}", unit="ep", leave=False):
                f, job = ahead.pop(0)
                if i + 2 < len(todo):
                    ahead.append((todo[i + 2], pool.submit(decode, todo[i + 2])))
                got = job.result()
                if isinstance(got, KitError):
                    if skip_bad:
                        continue
                    raise KitError(f"{got} (use --skip-bad to go on without it)")
                if got[1] is None:
                    raise KitError(f"tokenizer {tok_path} was trained on {', '.join(games)}, {f} is {got[0]}")
                codes = encode(got[1])
                like = codes[:0] if like is None else like
                assert codes.dtype == like.dtype and codes.shape[1:] == like.shape[1:], "codes change shape"
                fo.write(codes.tobytes())
                episodes.append([os.path.basename(f), sig[os.path.basename(f)], rows, len(codes)])
                rows += len(codes)
        like = np.zeros((0,), np.int16) if like is None else like
        fo.seek(0)
        fo.write(_npy_header(like.dtype, (rows, *like.shape[1:])))

    if todo or old is None:
        _atomic_write(path, write)
        size = os.path.getsize(path)  # the index names the data it describes: a torn pair is rebuilt
        _atomic_write(index, lambda fo: fo.write(json.dumps(dict(key=key, bytes=size, episodes=episodes)).encode()))
        old = None
    if not read:
        return None
    codes, episodes = old or _read_cache(path, index, key, name)
    base = torch.from_numpy(codes)
    return {f: base[start:start + n] for f, _, start, n in episodes if f in sig}


_NPY_HEADER = 256  # bytes: the .npy v1.0 header, padded to a fixed size so it can be written last


def _npy_header(dtype, shape):
    """The .npy format's v1.0 header (numpy.lib.format), padded to _NPY_HEADER bytes."""
    d = repr(dict(descr=np.lib.format.dtype_to_descr(dtype), fortran_order=False, shape=tuple(shape)))
    head = d.encode("latin1").ljust(_NPY_HEADER - 11) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head


def _read_cache(path, index, key, name):
    """(codes memory-mapped (copy on write: never written back), [[file, sig, start, n], ...])
    when the cache exists and is this tokenizer's, else None (with a line saying why)."""
    if not os.path.exists(index) and not os.path.exists(path):
        return None
    try:
        with open(index) as f:
            meta = json.load(f)
        if meta["key"] != key:
            print(f"{name} cache {path} was built by another tokenizer: rebuilding", file=sys.stderr)
            return None
        assert meta["bytes"] == os.path.getsize(path)
        return np.load(path, mmap_mode="c", allow_pickle=False), meta["episodes"]
    except Exception:
        print(f"{name} cache {path} is unreadable: rebuilding", file=sys.stderr)
        return None


def token_cache(data_dir, tok_path, tok, space, device, game, skip_bad=False, batch=256, read=True):
    """Tokens of every episode: {file name: (N+1, h, w) int16}, cached in data_dir/tokens.npy
    and .json, memory-mapped (None when not `read`: a tokenizer's trainer only writes them).
    int16 on disk, a quarter of int64's 2.7 GB at a million 21x16 frames: a batch is made long
    when gathered."""
    tok = tok.to(device).eval()
    encode = lambda frames: torch.cat([tok.encode(x.to(device)).cpu() for x in frames.split(batch)]).numpy().astype(
        np.int16)
    return _encoded(data_dir, tok_path, encode, space, game, skip_bad, "tokens", read)


def latent_cache(data_dir, ae_path, ae, space, device, game, skip_bad=False, batch=256, read=True):
    """Latents of every episode: {file name: (N + 2 - stack, latent_dim) float32}, latent j
    encoding frames j .. j + stack - 1; cached in data_dir/latents.npy and .json, memory-mapped
    (None when not `read`)."""
    ae = ae.to(device).eval()
    encode = lambda frames: torch.cat([torch.zeros(0, ae.latent_dim)] + [  # an episode may be shorter than a stack
        ae.encode(stack_frames(frames, ae.stack, starts).to(device)).cpu()
        for starts in torch.arange(len(frames) - ae.stack + 1).split(batch)]).numpy()
    return _encoded(data_dir, ae_path, encode, space, game, skip_bad, "latents", read)


def coded_episodes(folder, codes, key, space=None, val_frac=0.1, seed=0, actions=True, most_val=16):
    """The episodes of `folder` that have codes in a cache ({file name: codes}, as token_cache and
    latent_cache return), split by episode as the tokenizer was: (train, val), lists of dicts
    with the codes under `key`, the actions, rewards and terminated (N,) unless actions=False, and, for validation
    episodes when `space` is given, the frames preprocessed to it (dreams are scored on them).
    At most `most_val` validation episodes are read: their frames are 16 MB per 1000 steps."""
    files = [f for f in episode_files(folder) if os.path.basename(f) in codes]
    train_f, val_f = split_episodes(files, val_frac, seed)
    val_f = val_f[:most_val]
    if not val_f:
        val_f = train_f[-1:]
        print(f"warning: one episode only in {folder}: validating on training data", file=sys.stderr)

    def episode(f, frames):
        keys = ["actions", "rewards", "terminated"] * actions + ["frames"] * frames
        ep, out = load_episode(f, keys) if keys else {}, {key: codes[os.path.basename(f)]}
        if actions:
            out.update({k: torch.as_tensor(ep[k]) for k in ("actions", "rewards", "terminated")})
        if frames:
            out["frames"] = preprocess(ep["frames"], space)
        return out

    return [episode(f, False) for f in train_f], [episode(f, space is not None) for f in val_f]


def pack(seqs, device):
    """Sequences (n_i, ...) -> (all of them concatenated on the device, where each one starts):
    a batch of windows is then one indexing on the device (take()), not a Python loop over the
    batch and a host-to-device copy every step. On the CPU, slices of one array (a memory-mapped
    code cache) are read in place: nothing is copied, and memory does not grow with the data."""
    base = seqs[0]._base if len(seqs) else None
    if torch.device(device).type == "cpu" and base is not None and base.is_contiguous() and all(
            x._base is base and x.is_contiguous() for x in seqs):
        row = max(base[:1].numel(), 1)
        return base, torch.tensor([(x.storage_offset() - base.storage_offset()) // row for x in seqs])
    lengths = torch.tensor([len(x) for x in seqs], dtype=torch.long)
    flat = torch.empty((int(lengths.sum()), *seqs[0].shape[1:]), dtype=seqs[0].dtype, device=device)
    for x, start in zip(seqs, (lengths.cumsum(0) - lengths).tolist()):  # one at a time: no second host copy
        flat[start:start + len(x)] = x.to(device)
    return flat, (lengths.cumsum(0) - lengths).to(device)


def take(packed, ep, start, length, fill=None):
    """Windows of packed sequences: ep and start (B,) long on the device -> (B, length, ...).
    Positions before a sequence's start read `fill` (the actions before an episode begins)."""
    flat, offsets = packed
    t = start[:, None] + torch.arange(length, device=flat.device)
    out = flat[offsets[ep][:, None] + t.clamp(min=0)]
    if fill is None:
        return out
    return torch.where((t < 0).view(*t.shape, *[1] * (out.dim() - 2)), fill, out)


def windows(lengths, length):
    """(episode index, start) of every run of `length` consecutive entries in sequences of the
    given lengths, an (n, 2) int64 array: the training and evaluation windows of the dynamics
    scripts (16 bytes a window: a million of them as Python tuples would take ten times that)."""
    counts = np.maximum(np.asarray(lengths, dtype=np.int64).reshape(-1) - length + 1, 0)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    return np.stack([np.repeat(np.arange(len(counts)), counts), np.arange(counts.sum()) - first], 1)


# =============================================================================
# 5. tokenizers: frames <-> tokens (VQ-VAE) or latent vectors (autoencoder)

def groups(c):
    return 8 if c % 8 == 0 else 1


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.net = nn.Sequential(nn.GroupNorm(groups(c), c), nn.GELU(), nn.Conv2d(c, c, 3, padding=1),
                                 nn.GroupNorm(groups(c), c), nn.GELU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        return x + self.net(x)


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with EMA codebook updates (van den Oord et al. 2017, App. A.1;
    decay 0.99 as seed 003) and a straight-through gradient. Dead codes (EMA usage below
    `dead_frac` of the mean) are re-seeded from the batch's encoder outputs. `games` > 1 cuts
    the codebook into that many equal slices, one per game: every token of a frame comes from
    one slice, its game's (given, or else the slice that draws the frame nearest), so a game
    with a one-pixel ball keeps its share of codes beside games of many sprites."""

    def __init__(self, n_codes, dim, decay=0.99, dead_frac=0.01, eps=1e-5, games=1):
        super().__init__()
        if n_codes % games:
            raise KitError(f"{n_codes} codes cannot be cut into {games} equal slices, one per game")
        self.n_codes, self.dim, self.decay, self.dead_frac, self.eps = n_codes, dim, decay, dead_frac, eps
        self.games = games
        self.register_buffer("embed", torch.randn(n_codes, dim) * 0.1)
        self.register_buffer("cluster_size", torch.ones(n_codes))
        self.register_buffer("embed_avg", self.embed.clone())

    def codes(self, z, game=None):
        """z (B, dim, h, w) -> (indices (B, h, w), z as rows); game (B,) long: each frame's slice
        of the codebook (None: the slice nearest to the whole frame)"""
        B, _, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim)
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t() + self.embed.pow(2).sum(1)
        if self.games == 1:
            return d.argmin(1).view(B, h, w), flat
        best, idx = d.view(B, h * w, self.games, -1).min(3)  # the nearest code of each slice
        if game is None:
            game = best.sum(1).argmin(1)
        pick = game[:, None, None].expand(B, h * w, 1)
        idx = idx.gather(2, pick)[..., 0] + pick[..., 0] * (self.n_codes // self.games)
        return idx.view(B, h, w), flat

    def lookup(self, idx):
        return F.embedding(idx, self.embed).permute(0, 3, 1, 2)

    def forward(self, z, game=None):
        idx, flat = self.codes(z, game)
        q = self.lookup(idx)
        if self.training:
            with torch.no_grad():
                onehot = F.one_hot(idx.reshape(-1), self.n_codes).type(flat.dtype)
                stats = torch.cat([onehot.sum(0)[:, None], onehot.t() @ flat], 1)
                if dist.is_initialized():  # under torchrun every rank's codebook moves by the global batch
                    dist.all_reduce(stats)
                self.cluster_size.mul_(self.decay).add_(stats[:, 0], alpha=1 - self.decay)
                self.embed_avg.mul_(self.decay).add_(stats[:, 1:], alpha=1 - self.decay)
                n = self.cluster_size.sum()
                size = (self.cluster_size + self.eps) / (n + self.n_codes * self.eps) * n
                self.embed.copy_(self.embed_avg / size[:, None])
        commit = F.mse_loss(z, q.detach())
        return z + (q - z).detach(), idx, commit

    @torch.no_grad()
    def reset_dead(self, z, weight=None, game=None):
        """Re-seed rarely used codes with encoder outputs drawn by `weight` (B, h, w), each slice's
        from its own game's frames (game (B,) long); returns how many. Uniform draws land on the
        background (~98% of Atari tokens) and make near-duplicate background codes that flip from
        frame to frame; drawing from where things are does not."""
        size = self.cluster_size.view(self.games, -1)
        dead = size < self.dead_frac * size.mean(1, keepdim=True)
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim)
        w = torch.ones(z.shape[0], *z.shape[2:], device=z.device) if weight is None else weight + 1e-6
        for g in range(self.games):
            n = int(dead[g].sum())
            w_g = w if game is None or self.games == 1 else w * (game == g)[:, None, None]
            if n and w_g.sum() > 0:
                pick = flat[torch.multinomial(w_g.reshape(-1), n, replacement=True)]
                codes = g * size.shape[1] + dead[g].nonzero()[:, 0]
                self.embed[codes] = pick
                self.embed_avg[codes] = pick
                self.cluster_size[codes] = 1.0
        n = int(dead.sum())
        if n and dist.is_initialized():  # each rank drew from its own batch: rank 0's draws win
            for buffer in (self.embed, self.embed_avg, self.cluster_size):
                dist.broadcast(buffer, 0)
        return n


class VQVAE(nn.Module):
    """(B, C, H, W) uint8 frames <-> (B, H/2^down, W/2^down) token indices. `hidden`: channels
    of the full-resolution convs (doubling at each stride-2 stage); `code_dim`: channels at the
    token grid, which is the size of each codebook vector; `n_codes`: the codebook's size;
    `games` > 1: a slice of it for each game (VectorQuantizer)."""

    def __init__(self, in_ch=3, hidden=32, code_dim=64, n_codes=64, down=2, n_res=2, patch=False, games=1):
        super().__init__()
        self.n_codes, self.down = n_codes, down
        if patch:  # each token sees its own patch and nothing else: same pixels, same token
            w, k = hidden * 2 ** down, 2 ** down
            enc = [nn.Conv2d(in_ch, w, k, stride=k), nn.GELU(), nn.Conv2d(w, w, 1), nn.GELU(), nn.Conv2d(w, w, 1),
                   nn.GELU(), nn.Conv2d(w, code_dim, 1)]
        else:
            enc = [nn.Conv2d(in_ch, hidden, 3, padding=1)]
            c = hidden
            for i in range(down):
                c_out = code_dim if i == down - 1 else hidden * 2 ** (i + 1)
                enc += [nn.Conv2d(c, c_out, 4, stride=2, padding=1), nn.GroupNorm(groups(c_out), c_out), nn.GELU()]
                c = c_out
            enc += [ResBlock(code_dim) for _ in range(n_res)] + [nn.Conv2d(code_dim, code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.quantizer = VectorQuantizer(n_codes, code_dim, games=games)
        dec = [nn.Conv2d(code_dim, code_dim, 1)] + [ResBlock(code_dim) for _ in range(n_res)]
        c = code_dim
        for i in reversed(range(down)):
            c_out = hidden * 2 ** i
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c_out, 3, padding=1),
                    nn.GroupNorm(groups(c_out), c_out), nn.GELU()]
            c = c_out
        dec += [nn.Conv2d(c, in_ch, 3, padding=1), nn.Tanh()]
        self.decoder = nn.Sequential(*dec)

    def forward(self, x, game=None):
        """x uint8 -> (reconstruction in [-1, 1], indices, commitment loss, pre-quantization z);
        game (B,) long: each frame's game, for a codebook cut per game (None: told by the frames)"""
        z = self.encoder(to_float(x))
        q, idx, commit = self.quantizer(z, game)
        return self.decoder(q), idx, commit, z

    @torch.no_grad()
    def encode(self, x):
        return self.quantizer.codes(self.encoder(to_float(x)))[0]

    def decode(self, idx):
        """indices (B, h, w) -> frames in [-1, 1]"""
        return self.decoder(self.quantizer.lookup(idx))


# -----------------------------------------------------------------------------
# continuous autoencoder (seed 000: 84x84 gray -> 128-D AE; seed 004: 4 stacked 64x64 gray
# frames -> 64-D VAE): four stride-2 convs, two FC layers each way, transposed-conv decoder,
# GroupNorm after every conv but the last.

class ConvAE(nn.Module):
    """(B, stack * C, H, W) uint8 frames <-> (B, latent_dim) vectors; a VAE when `vae`.

    Frames are padded to a multiple of 16 so that four stride-2 stages divide evenly (84x84
    -> 96x96 -> 6x6), and the decoder's output is cropped back."""

    def __init__(self, in_ch=1, size=(84, 84), stack=1, latent_dim=128, hidden=32, fc=512, vae=False):
        super().__init__()
        self.in_ch, self.size, self.stack, self.latent_dim, self.vae = in_ch, tuple(size), stack, latent_dim, vae
        h0, w0 = -(-size[0] // 16), -(-size[1] // 16)  # ceil
        self.pad = (0, 16 * w0 - size[1], 0, 16 * h0 - size[0])
        widths = [hidden * 2 ** i for i in range(4)]  # seed 004: 32, 64, 128, 256
        enc, c = [], in_ch * stack
        for w in widths:  # GroupNorm is not in the seeds: without it the AE sat at the mean frame for 500 steps
            enc += [nn.Conv2d(c, w, 4, stride=2, padding=1), nn.GroupNorm(groups(w), w), nn.ReLU()]
            c = w
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(c * h0 * w0, fc), nn.ReLU(),
                                     nn.Linear(fc, latent_dim * (2 if vae else 1)))
        if vae:  # noise std 0.05 at the start, not 1: the decoder must learn to use the latent before noise
            # teaches it not to
            with torch.no_grad():
                self.encoder[-1].bias[latent_dim:].fill_(-6.0)
        dec = [nn.Linear(latent_dim, fc), nn.ReLU(), nn.Linear(fc, c * h0 * w0), nn.ReLU(),
               nn.Unflatten(1, (c, h0, w0))]
        for w in widths[-2::-1]:
            dec += [nn.ConvTranspose2d(c, w, 4, stride=2, padding=1), nn.GroupNorm(groups(w), w), nn.ReLU()]
            c = w
        self.decoder = nn.Sequential(*dec, nn.ConvTranspose2d(c, in_ch * stack, 4, stride=2, padding=1), nn.Tanh())

    def forward(self, x):
        """x uint8 -> (reconstruction in [-1, 1], latent (the mean for a VAE), KL term). The
        VAE samples its latent in training only; the KL is summed over latent dims, averaged
        over the batch, and 0 for a plain AE."""
        h = self.encoder(F.pad(to_float(x), self.pad))
        if not self.vae:
            return self.decode(h), h, h.new_zeros(())
        mu, logvar = h.chunk(2, 1)
        logvar = logvar.clamp(-20, 10)  # exp() of an early outlier must not overflow
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        kl = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1).mean()
        return self.decode(z), mu, kl

    @torch.no_grad()
    def encode(self, x):
        """(B, stack * C, H, W) uint8 -> (B, latent_dim); a VAE gives its mean"""
        return self.encoder(F.pad(to_float(x), self.pad))[:, :self.latent_dim]

    def decode(self, z, last=False):
        """(B, latent_dim) -> frames in [-1, 1]: all `stack` of them, or only the newest"""
        x = self.decoder(z)[:, :, :self.size[0], :self.size[1]]
        return x[:, -self.in_ch:] if last else x


def load_tokenizer(path, kinds=("vqvae",)):
    """A tokenizer checkpoint (VQ-VAE, or autoencoder when "ae" is in kinds) -> (model in
    eval mode, checkpoint dict)."""
    ck = load_checkpoint(path, kinds)
    model = (ConvAE if ck["kind"] == "ae" else VQVAE)(**ck["model_args"])
    model.load_state_dict(ck["model"])
    return model.eval(), ck


# =============================================================================
# 6. dynamics: the next frame's code from the history and the action

# token dynamics: next-frame tokens from `context` frames of tokens and the action.
# A conv net on the token grid: Atari physics is local, and at batch 1 on a CPU a 3x3 conv
# over 21x16 positions costs a fraction of attention over them (README, "Why a conv net").
# Action conditioning as seed 003 v1.6: a per-action spatial bias on the input and FiLM in
# every block; plus a copy-the-last-frame logit, since ~99% of tokens do not change.

class FiLMBlock(nn.Module):
    def __init__(self, c, cond, attend=False, sides=False):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(groups(c), c), nn.Conv2d(c, c, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(groups(c), c), nn.Conv2d(c, c, 3, padding=1)
        self.film = nn.Linear(cond, 2 * c)
        self.glob = nn.Linear(c, c)  # global context: scores, serves, events far away
        # where the global context looks: attention pooling (one learned score per cell) in place of
        # the mean, in which one ball is 1 cell of 336
        self.where = nn.Conv2d(c, 1, 1) if attend or sides else None
        # sides: each row also sees the same pooling over the rows above it and over those below:
        # "the ball is above me", which a global vector cannot say and 3x3 convs see 7 cells far
        self.above, self.below = (nn.Linear(c, c), nn.Linear(c, c)) if sides else (None, None)

    def forward(self, x, cond):
        g, b = self.film(cond)[:, :, None, None].chunk(2, 1)
        h = self.c1(F.gelu(self.n1(x)))
        score = None if self.where is None else self.where(h)
        if score is None:
            pooled = h.mean((2, 3))
        else:
            pooled = (score.flatten(2).softmax(-1) * h.flatten(2)).sum(-1)
        ctx = self.glob(pooled)[:, :, None, None]
        if self.above is not None:
            ctx = ctx + self.sides(h, score)
        h = F.gelu(self.n2(h) * (1 + g) + b + ctx)
        return x + self.c2(h)

    def sides(self, h, score):
        """(B, c, H, 1): the rows above and below each row, pooled by the attention scores (B, 1,
        H, W) of the global context, each through its own linear."""
        e = (score - score.amax((2, 3), keepdim=True)).exp()
        num, den = (e * h).sum(3), e.sum(3)  # per row: (B, c, H), (B, 1, H)
        cn, cd = num.cumsum(2), den.cumsum(2)
        above = (cn - num) / (cd - den + 1e-6)  # rows 0..r-1 (none for row 0: zero)
        below = (cn[:, :, -1:] - cn) / (cd[:, :, -1:] - cd + 1e-6)  # rows r+1..H-1
        side = self.above(above.transpose(1, 2)) + self.below(below.transpose(1, 2))
        return side.transpose(1, 2)[..., None]


class TokenDynamics(nn.Module):
    """Next-frame token logits from `context` frames of tokens and the last `actions` actions.
    More than one action because Pong's paddle answers a key over two steps: the frames show
    what the older keys did, not what the last one is doing (a previous action before the
    first frame is unknown: index n_actions). `memory` > 0 adds the steps since each cell's
    token last changed, up to `memory` (ages() below): a cheap memory for hidden timers
    longer than the context, such as Pong's serve, 16 steps after a point, which four frames of
    an empty field cannot count. `masked` adds the next frame as far as it is decided (MASK
    where it is not) as an input, so that the uncertain cells of a frame can be drawn given each
    other (MaskGIT, Chang et al. 2022): one ball served, not two halves of two balls. `games`
    > 0 makes one model of several games (seed 004): the game is an input, beside the actions,
    which are then ALE's 18 (full_actions), each game with its own embeddings of them with
    `game_actions`. `attend` pools each block's view of the whole frame
    by attention rather than the mean, so that one small far object (the ball) is seen; `sides`
    pools the rows above each row and those below it apart, so that a cell knows on which side
    it is (Pong's opponent follows the ball's row from across the field)."""

    def __init__(self, n_codes, n_actions, grid, context=4, emb=32, dim=96, n_blocks=4, memory=0, masked=False,
                 actions=1, games=0, attend=False, sides=False, game_actions=False):
        super().__init__()
        self.n_codes, self.n_actions, self.context = n_codes, n_actions, context
        self.memory, self.masked, self.actions, self.games = memory, masked, actions, games
        self.game = nn.Embedding(games, dim) if games else None
        n_act = n_actions if actions == 1 else actions * (n_actions + 1)  # per lag, and "unknown"
        # the same key means another move in another game: RIGHT moves Pong's paddle up, Breakout's right
        self.per_game = n_act if games and game_actions else 0
        n_act = n_act * games if self.per_game else n_act
        self.tok = nn.Embedding(n_codes, emb)
        self.time = nn.Parameter(torch.zeros(context, emb, 1, 1))
        self.age = nn.Embedding(memory + 2, emb) if memory else None  # 0..memory, then longer ago or unknown
        self.partial = nn.Embedding(n_codes + 1, emb) if masked else None  # index n_codes: MASK
        self.inp = nn.Conv2d((context + bool(memory) + masked) * emb, dim, 3, padding=1)
        self.act = nn.Embedding(n_act, dim)
        self.act_bias = nn.Parameter(torch.zeros(n_act, dim, *grid))
        self.blocks = nn.ModuleList(FiLMBlock(dim, dim, attend, sides) for _ in range(n_blocks))
        self.out = nn.Sequential(nn.GroupNorm(groups(dim), dim), nn.GELU(), nn.Conv2d(dim, n_codes, 1))
        self.copy = nn.Parameter(torch.tensor(3.0))

    def forward(self, hist, action, age=None, partial=None, game=None):
        """hist (B, T, h, w) long tokens, oldest first; action (B,) long, the action now, or (B,
        actions) long, the last actions, oldest first (n_actions: unknown), or (B, n_actions) float
        weights (a straight-through one-hot from train_latent_action.py); age (B, h, w) long, the
        memory; partial (B, h, w) long, the next frame's tokens decided so far, n_codes where not
        (None: nothing decided); game (B,) long, which game (a model of several) -> logits
        (B, n_codes, h, w)"""
        B, T, h, w = hist.shape
        if self.masked and partial is None:
            partial = torch.full_like(hist[:, -1], self.n_codes)
        grids = [*hist.unbind(1)] + ([age] if self.memory else []) + ([partial] if self.masked else [])
        if torch.is_grad_enabled():  # training: the conv over the embeddings (a lookup's backward is slower)
            x = (self.tok(hist).permute(0, 1, 4, 2, 3) + self.time).reshape(B, -1, h, w)  # T frames of embeddings
            embeddings = [e for e in (self.age, self.partial) if e is not None]
            x = self.inp(torch.cat([x] + [e(g).permute(0, 3, 1, 2) for e, g in zip(embeddings, grids[T:])], 1))
        else:
            x = self.looked_up(grids)
        if action.is_floating_point():
            a, bias = action @ self.act.weight, torch.einsum("bn,nchw->bchw", action, self.act_bias)
        else:  # one embedding per (lag, action), summed over the lags
            action = action.view(B, -1)[:, -self.actions:]
            if self.actions > 1:
                action = action + (self.n_actions + 1) * torch.arange(self.actions, device=action.device)
            if self.per_game:
                action = action + self.per_game * game[:, None]
            a, bias = self.act(action).sum(1), self.act_bias[action].sum(1)
        if self.games:  # the game conditions every block as the actions do, and the input
            a = a + self.game(game)
            bias = bias + self.game(game)[:, :, None, None]
        x = x + bias
        for blk in self.blocks:
            x = blk(x, a)
        logits = self.out(x)  # + self.copy at each cell's last token:
        return logits.scatter_add_(1, hist[:, -1:], self.copy.to(logits.dtype).expand(B, 1, h, w))

    def looked_up(self, grids):
        """self.inp over the embedded grids (each (B, h, w) long, one per input: the T frames, the
        ages, the partial frame), without embedding them: a 3x3 conv over the embedding of a
        symbol is, for each of its 9 offsets, a (vocabulary, dim) table, so the conv is a sum of
        9 x inputs rows per cell. Exact up to rounding, ~7x faster than embedding + conv at
        64 dreams (32x fewer multiplies)."""
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())  # a step, load_state_dict, .to() change it
        if getattr(self, "_tables", (None,))[0] != key:
            self._tables = key, self.tables()
        table, starts, n = self._tables[1]
        B, h, w = grids[0].shape
        sym = F.pad(torch.stack(grids, -1) + starts, (0, 0, 1, 1, 1, 1), value=n - 1)  # (B, h + 2, w + 2, inputs)
        rows = torch.stack([sym[:, y:y + h, x:x + w] + (3 * y + x) * n for y in range(3) for x in range(3)], -1)
        out = F.embedding_bag(rows.view(B * h * w, -1), table, mode="sum")
        return out.view(B, h, w, -1).permute(0, 3, 1, 2).contiguous() + self.inp.bias[:, None, None]

    def tables(self):
        """-> (the 9 offsets' tables, one after another, (9 x symbols, dim); where each input's
        symbols start; symbols), the last symbol being "past the frame's edge" (zero padding)."""
        embs = [self.tok.weight + self.time[t, :, 0, 0] for t in range(self.context)]
        embs += [e.weight for e in (self.age, self.partial) if e is not None]
        W = self.inp.weight.flatten(2).unflatten(1, (len(embs), -1))  # (dim, inputs, emb, 9 offsets)
        tables = [torch.einsum("ve,dek->kvd", E, W[:, i]) for i, E in enumerate(embs)]
        tables = torch.cat(tables + [torch.zeros_like(tables[0][:, :1])], 1)  # (9, symbols, dim)
        starts = torch.tensor([0] + [len(E) for E in embs[:-1]], device=W.device).cumsum(0)
        return tables.flatten(0, 1), starts, tables.shape[1]


def ages(tokens, cap, unknown=False):
    """Steps since each cell's token last changed: tokens (..., N, h, w) -> (..., N, h, w) long,
    0 at every change, counting up to `cap`; cap + 1 is "longer ago than cap steps, or never
    seen": a past the frames do not tell (`unknown`: a dream started from real frames of any
    moment) and a cell still for longer than cap steps are one state. The first frame is a change
    (an episode starts with a reset, which changes every cell), unless `unknown`. So a dream whose
    field has stood still longer than the data ever shows it (Pong's: 16 steps from a point to
    the serve; a ball lost in mid-flight scores no point to count from) is where a dream started
    from real frames is, which the model learned to end by serving."""
    out = torch.full_like(tokens, cap + 1 if unknown else 0)
    for t in range(1, tokens.shape[-3]):
        out[..., t, :, :] = next_age(out[..., t - 1, :, :], tokens[..., t - 1, :, :], tokens[..., t, :, :], cap)
    return out


def next_age(age, last, nxt, cap):
    return torch.where(nxt != last, 0, (age + 1).clamp(max=cap + 1))


class TokenAttention(nn.Module):
    """The alternative layout, kept for the measured comparison (README, "Why a conv net"):
    one position per next-frame token, whose input sums the embeddings of the same
    position's past tokens (sequence h*w + 1 instead of seed 003's 5*h*w + 1), a pre-LN
    transformer, the same action conditioning and copy logit as TokenDynamics."""

    def __init__(self, n_codes, n_actions, grid, context=4, dim=128, n_blocks=4, heads=4):
        super().__init__()
        self.n_codes, self.n_actions, self.context = n_codes, n_actions, context
        n = grid[0] * grid[1]
        self.tok = nn.Embedding(n_codes, dim)
        self.time = nn.Parameter(torch.randn(context, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(n, dim) * 0.02)
        self.act = nn.Embedding(n_actions, dim)
        self.act_bias = nn.Parameter(torch.zeros(n_actions, n, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, 0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_blocks, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, n_codes))
        self.copy = nn.Parameter(torch.tensor(3.0))

    def forward(self, hist, action, age=None, partial=None):
        B, T, h, w = hist.shape
        x = (self.tok(hist.flatten(2)) + self.time).sum(1) + self.pos + self.act_bias[action]
        x = torch.cat([self.act(action)[:, None], x], 1)
        logits = self.out(self.blocks(x)[:, 1:]).transpose(1, 2).reshape(B, self.n_codes, h, w)
        return logits + self.copy * F.one_hot(hist[:, -1], self.n_codes).permute(0, 3, 1, 2).to(logits.dtype)



# -----------------------------------------------------------------------------
# the outcome of a transition: its reward and whether it ends the episode, as IRIS's and
# DIAMOND's heads predict them (DIAMOND: the reward's sign in 3 classes, the end in 2).
# Read from the tokens around the transition, not from the dynamics' features: Pong pays a
# point when the ball leaves the field, one frame before the score changes on screen, so
# the last two frames and the drawn next one say it; and the heads stay exactly in step with
# the frame the dream drew, whichever way it was drawn.

REWARD_CLASSES = (-1.0, 0.0, 1.0)  # the reward's sign; its real value stays in the data


class Outcome(nn.Module):
    """(B, frames, h, w) long tokens: the frames before a transition and the one after it ->
    (B, 4) logits: the reward's sign (-1, 0, +1), then the end of the episode. Two convs, then
    the max over the rows: which side of the screen a change is on (who scored) is kept, the
    row is not, since a point is the same wherever along the edge the ball leaves. On Pong's
    validation points this read 39 of 39 from the true frames, strided convs that keep the row
    35 of 39 (both 242 of 242 in training: they learn the rows they were shown)."""
    key, stack = "tokens", 1  # what they read of a packed episode (outcome_loss); frames a code covers

    def __init__(self, n_codes, grid, frames=3, emb=8, dim=32):
        super().__init__()
        self.n_codes, self.grid, self.frames = n_codes, tuple(grid), frames
        self.tok = nn.Embedding(n_codes, emb)
        self.net = nn.Sequential(nn.Conv2d(frames * emb, dim, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(dim, dim, 3, padding=1), nn.GELU())
        self.out = nn.Linear(dim * grid[1], len(REWARD_CLASSES) + 1)

    def forward(self, tokens):
        x = self.tok(tokens.long()).permute(0, 1, 4, 2, 3).flatten(1, 2)
        return self.out(self.net(x).amax(2).flatten(1))


def outcome_transitions(episodes, first=1):
    """The transitions the heads train on, (n, 2) int64 (episode, step), from step `first` on
    (the first whose codes the heads can read: frames + stack - 3, so 1 for Outcome's three
    frames of tokens); the rare ones that pay or end, with the two steps either side (the ball
    is just as gone one step after the point, which pays nothing); and how many pay or end.
    episodes: dicts with rewards and terminated (N,)."""
    paid = [((ep["rewards"] != 0) | ep["terminated"]).numpy() for ep in episodes]
    near = np.concatenate([np.convolve(m, np.ones(5))[2:len(m) + 2] > 0 for m in paid])  # within 2 steps
    steps = windows([len(ep["rewards"]) for ep in episodes], 1)  # every (episode, step)
    return steps[steps[:, 1] >= first], steps[(steps[:, 1] >= first) & near], int(sum(map(np.sum, paid)))


def outcome_loss(heads, data, transitions, events, g, n, event_share):
    """The heads' loss on n transitions, a share `event_share` of them drawn from `events`
    (Pong pays once in ~70 steps): cross-entropy of the reward's sign, and of the end. data:
    packed tokens (or latents), rewards and terminated (pack()); transitions and events: (m, 2)
    long on the device, as outcome_transitions gives them; g: a numpy Generator."""
    k = round(n * event_share) if len(events) else 0
    pick = lambda rows, m: rows[torch.from_numpy(g.integers(len(rows), size=m)).to(rows.device)]
    idx = torch.cat([pick(transitions, n - k), pick(events, k)])
    ep, j = idx[:, 0], idx[:, 1]
    codes = take(data[heads.key], ep, j + 3 - heads.frames - heads.stack, heads.frames)
    sign = take(data["rewards"], ep, j, 1)[:, 0].sign().long() + 1
    end = take(data["terminated"], ep, j, 1)[:, 0].float()
    logits = heads(codes)
    return F.cross_entropy(logits[:, :-1], sign) + F.binary_cross_entropy_with_logits(logits[:, -1], end)


# -----------------------------------------------------------------------------
# latent dynamics: the next latent from `context` latents and the action (and LatentOutcome,
# the reward and end heads of a latent world). Every net here reads
# standardized latents (training-set statistics, kept as buffers so they travel in the
# state dict) and predict the change of the last latent: consecutive frames differ in a few
# pixels, so their latents are close. forward(hist, action, h) -> (next latent, h); h is the
# GRU's hidden state (None for the MLP, and None to start from a fresh history).

class Standardized(nn.Module):
    """A net that reads latents standardized by the training set's statistics."""

    def __init__(self, latent_dim):
        super().__init__()
        self.register_buffer("shift", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    @torch.no_grad()
    def standardize_with(self, z):
        """Set shift and scale from training latents (N, latent_dim). A dim that hardly varies
        gets a floor on its scale, so that its noise is not blown up into a target."""
        std = z.std(0)
        self.shift.copy_(z.mean(0))
        self.scale.copy_(std.clamp_min(0.1 * std.mean().item() + 1e-8))


class LatentDynamics(Standardized):
    def __init__(self, latent_dim, n_actions, context):
        super().__init__(latent_dim)
        self.latent_dim, self.n_actions, self.context = latent_dim, n_actions, context

    def onehot(self, action):
        return F.one_hot(action, self.n_actions).to(self.shift.dtype)

    def warm(self, hist):
        """The state a fresh history leaves: None for a net that carries none."""
        return None


class LatentMLP(LatentDynamics):
    """Seed 000: an MLP on the last `context` latents, concatenated, and the one-hot action."""

    def __init__(self, latent_dim, n_actions, context=4, hidden=256):
        super().__init__(latent_dim, n_actions, context)
        self.net = nn.Sequential(nn.Linear(context * latent_dim + n_actions, hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, latent_dim))

    def forward(self, hist, action, h=None):
        x = (hist - self.shift) / self.scale
        d = self.net(torch.cat([x.flatten(1), self.onehot(action)], 1))
        return hist[:, -1] + d * self.scale, None


class LatentGRU(LatentDynamics):
    """Seed 004: a GRU over [latent, one-hot action]. A fresh history is run through it
    first with no action (reset() gets frames, not the actions between them; the token
    dynamics see no past actions either), then each step feeds the last latent and the action."""

    def __init__(self, latent_dim, n_actions, context=1, hidden=256):
        super().__init__(latent_dim, n_actions, context)
        self.hidden = hidden
        self.cell = nn.GRUCell(latent_dim + n_actions, hidden)
        self.out = nn.Linear(hidden, latent_dim)

    def warm(self, hist):
        """The hidden state after every latent of a fresh history but the newest, with no action."""
        x = (hist - self.shift) / self.scale
        h = x.new_zeros(len(x), self.hidden)
        for t in range(x.shape[1] - 1):
            h = self.cell(torch.cat([x[:, t], x.new_zeros(len(x), self.n_actions)], 1), h)
        return h

    def forward(self, hist, action, h=None):
        h = self.warm(hist) if h is None else h
        x = (hist[:, -1] - self.shift) / self.scale
        h = self.cell(torch.cat([x, self.onehot(action)], 1), h)
        return hist[:, -1] + self.out(h) * self.scale, h


class LatentOutcome(Standardized):
    """Outcome for a latent world (train_ae.py): (B, frames, latent_dim) standardized latents,
    each encoding `stack` frames, -> (B, 4) logits. An MLP over the frames' latents: a latent
    has no rows to pool over."""
    key = "latents"

    def __init__(self, latent_dim, stack=1, frames=3, hidden=256):
        super().__init__(latent_dim)
        self.stack, self.frames = stack, frames
        self.net = nn.Sequential(nn.Linear(frames * latent_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, len(REWARD_CLASSES) + 1))

    def forward(self, latents):
        return self.net(((latents - self.shift) / self.scale).flatten(1))


# -----------------------------------------------------------------------------
# latent actions (train_latent_action.py; seed 001, Genie): token dynamics conditioned on a
# latent action learned from video, and a map from the real action to that latent action.

class ActionMap(nn.Module):
    """Real action + the last `frames` frames of tokens -> logits over the latent actions. The
    frames are there because an action's effect depends on the state: LEFT against the wall
    does what NOOP does, FIRE only serves when no ball is in play. frames=0: the action alone."""

    def __init__(self, n_codes, n_actions, n_latent_actions, frames=4, dim=32, emb=8):
        super().__init__()
        self.frames = frames
        self.act = nn.Embedding(n_actions, dim)
        if frames:
            self.tok = nn.Embedding(n_codes, emb)
            self.conv = nn.Sequential(nn.Conv2d(frames * emb, dim, 3, stride=2, padding=1), nn.GELU(),
                                      nn.Conv2d(dim, dim, 3, stride=2, padding=1), nn.GELU())
        self.head = nn.Sequential(nn.Linear(dim * (3 if frames else 1), dim), nn.GELU(),
                                  nn.Linear(dim, n_latent_actions))

    def forward(self, hist, action):
        """hist (B, T, h, w) long, action (B,) long -> (B, n_latent_actions) logits"""
        x = self.act(action)
        if self.frames:
            f = self.conv(self.tok(hist[:, -self.frames:]).permute(0, 1, 4, 2, 3).flatten(1, 2))
            x = torch.cat([x, f.amax((2, 3)), f.mean((2, 3))], 1)  # max: where something is, not how much
        return self.head(x)


class LatentActionDynamics(nn.Module):
    """The world of train_latent_action.py: the real action picks a latent action through the
    map, and token dynamics conditioned on that latent action predict the next frame's tokens."""

    def __init__(self, n_codes, n_actions, n_latent_actions, grid, context=4, emb=16, dim=64, n_blocks=3,
                 map_frames=4, map_dim=32):
        super().__init__()
        self.n_actions, self.n_latent_actions, self.context = n_actions, n_latent_actions, context
        self.dynamics = TokenDynamics(n_codes, n_latent_actions, grid, context, emb, dim, n_blocks)
        self.map = ActionMap(n_codes, n_actions, n_latent_actions, map_frames, map_dim)

    def latent_action(self, hist, action):
        return self.map(hist, action).argmax(1)

    def forward(self, hist, action, age=None, partial=None):
        return self.dynamics(hist, self.latent_action(hist, action), age, partial)


def make_dynamics(arch, **kw):
    """A dynamics net from a checkpoint's model_args: conv | attn over tokens, mlp | gru over latents."""
    if arch == "conv":
        return TokenDynamics(**kw)
    if arch == "attn":
        return TokenAttention(**{k: v for k, v in kw.items() if k != "emb"})
    if arch in ("mlp", "gru"):
        return (LatentMLP if arch == "mlp" else LatentGRU)(**kw)
    if arch == "lam":
        return LatentActionDynamics(**kw)
    raise KitError(f"unknown dynamics architecture '{arch}' (conv, attn, mlp, gru, lam)")


# =============================================================================
# 7. the world contract. play.py, bench.py, the tests and every evaluation use only this:
#   wm = load_world(path); wm.context; f = wm.observe(obs); wm.reset(frames); f = wm.step(action)
# Under it, the batched core that evaluations and many-dream callers use:
#   wm.reset_batch(frames (B, context, C, H, W) uint8); wm.step_batch(actions (B,)) -> (B, C, H, W) uint8

TEMPERATURE = 1.0  # token worlds sample their next frame; 0 is the argmax
SURE = 0.9  # TokenWorld.decode: a token drawn with at least this probability is kept at once
TOP_P = 0.9  # TokenWorld draws each token from the most likely tokens that hold this probability


def observations(frames):
    """(B, C, H, W) uint8 torch -> numpy (B, H, W, C), or (B, H, W) in gray: the contract's layout."""
    x = frames.cpu().permute(0, 2, 3, 1).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def frames_tensor(frames):
    """The inverse of observations: numpy (B, H, W, C), or (B, H, W) in gray -> (B, C, H, W) uint8 torch."""
    x = torch.as_tensor(np.asarray(frames, np.uint8))
    return x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)


class World:
    """What every world shares: the frame space in and out, the checks, compile(), and the
    one-dream contract over the batched core (reset_batch, step_batch) that each kind of world
    implements. Contract frames are uint8 H x W x C (rgb) or H x W (gray) numpy arrays in the
    model's frame space."""
    temperature = 0.0  # a latent world is deterministic; a token world draws at its own

    def __init__(self, tok, dyn, space, game, action_meanings, device, context):
        self.device = torch.device(device)
        self.tok, self.dyn = tok.to(self.device).eval(), dyn.to(self.device).eval()
        self.space, self.game, self.action_meanings = space, game, list(action_meanings)
        self.context, self.n_actions = context, dyn.n_actions
        self.hist, self.generators = None, None
        self.heads, self.rewards, self.terminals = None, None, None  # Outcome heads; the last step's draws
        self.data = None  # the episodes the world was trained on (DreamEnv's start="data")
        self.seed(0)

    def seed(self, seed):
        """Make the dreams that follow reproducible: after seed(n), the same start and actions give
        the same dream, and another n another dream. Dream i of a batch draws from seed n + i."""
        self._seed, self.generators = int(seed), None

    def _streams(self, batch, seeds=None, rows=None):
        """One random stream per dream in flight: from `seeds`, from seed() anew, or going on.
        With `rows`, only those dreams start again (from `seeds`, else their streams go on)."""
        if rows is not None:
            for r, s in zip(rows, [] if seeds is None else seeds):
                self.generators[r] = torch.Generator().manual_seed(int(s))
        elif seeds is not None:
            self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        elif self.generators is None or len(self.generators) != batch:
            self.generators = [torch.Generator().manual_seed(self._seed + i) for i in range(batch)]

    def _set(self, rows, **state):
        """Set the dreams' state: all of it (rows None), or the rows of the dreams that start again."""
        for k, v in state.items():
            if rows is None or getattr(self, k) is None:
                setattr(self, k, v)
            elif v is not None:
                getattr(self, k)[torch.as_tensor(rows, device=getattr(self, k).device)] = v

    def _outcome(self, codes):
        """The reward and the end of the step just drawn, from the heads reading the codes (tokens
        or latents) of the frames around it: drawn at the temperature, with each dream's own
        noise, as its tokens are; the most likely at 0."""
        logits, rows = self.heads(codes).float(), torch.arange(len(codes))
        if self.temperature == 0:
            sign, end = logits[:, :-1].argmax(1), logits[:, -1] > 0
        else:
            sign = (logits[:, :-1] / self.temperature + self._gumbel((logits.shape[1] - 1,), rows)).argmax(1)
            end = torch.logit(self._uniform((), rows)) < logits[:, -1] / self.temperature  # u < sigmoid(l / T)
        self.rewards, self.terminals = torch.tensor(REWARD_CLASSES)[sign.cpu()], end.cpu()

    @property
    def reward(self):
        """The reward the heads drew for the last step of the dream (0.0 for a world without them)."""
        return 0.0 if self.rewards is None else float(self.rewards[0])

    @property
    def terminated(self):
        """Whether the heads drew the end of the episode at the last step (never without them)."""
        return False if self.terminals is None else bool(self.terminals[0])

    # On a CPU a batch is cut into pieces that stay in the cache: this many dreams at a time (a
    # 2-core EPYC at 256 dreams at once: the dynamics 1.8x slower a dream, the decoder 2.6x)
    DYNAMICS_CHUNK, DECODER_CHUNK = 64, 8

    def chunks(self, x, size):
        return x.split(size) if self.device.type == "cpu" else [x]

    def draw(self, x, **kw):
        """The decoder's uint8 frames of x (tokens or latents, a batch), DECODER_CHUNK at a time."""
        return torch.cat([to_uint8(self.tok.decode(c, **kw)) for c in self.chunks(x, self.DECODER_CHUNK)])

    def compile(self, mode=None):
        """torch.compile the dynamics (and a latent-action model's forward model, which
        step_latent_action calls directly) and the decoder, in place: ~10% faster token-world
        steps on a 2-core CPU after ~35 s of compiling (bench.py), so play.py leaves it off
        unless --compile. mode="reduce-overhead" (CUDA graphs) is the one for batch 1 on a GPU,
        where every step is a few small kernel launches."""
        for m in [self.dyn, getattr(self.dyn, "dynamics", None), self.tok.decoder]:
            if m is not None:
                compiled(m, self.device, in_place=True, mode=mode)
        return self

    def observe(self, obs):
        """A raw env frame (210, 160, 3) -> the model's frame space, as the training data was."""
        return self._frame(preprocess(obs, self.space))

    def reset(self, frames, before=None):
        """Start one dream from `context` frames of observe(), oldest first. `before`: real frames
        that came before them, oldest first, which a world with a memory reads into it (a token
        world's cell ages: how long the field has been empty, where the last ball went), as if
        it had dreamed them; other worlds ignore them."""
        if len(frames) != self.context:
            raise KitError(f"reset wants {self.context} frames of history, got {len(frames)}")
        before = None if before is None or not len(before) else frames_tensor(np.stack(before))[None]
        self.reset_batch(frames_tensor(np.stack(frames))[None], before=before)

    def step(self, action):
        """One step of the dream: the predicted next frame, in the space of observe()."""
        return self._frame(self.step_batch([action])[0].cpu())

    @staticmethod
    def _frame(f):
        """(C, H, W) uint8 torch -> H x W (x C) numpy"""
        return observations(f[None])[0]

    def _actions(self, actions):
        """Action indices for the dreams in flight -> a checked (B,) long tensor on the device."""
        if self.hist is None:
            raise KitError("call reset(frames) before step(action)")
        a = torch.as_tensor(actions).long().reshape(-1)
        if len(a) != len(self.hist):
            raise KitError(f"{len(a)} actions for {len(self.hist)} dreams")
        bad = a[(a < 0) | (a >= self.n_actions)]
        if len(bad):
            raise KitError(f"action {int(bad[0])} out of range 0..{self.n_actions - 1}")
        return a.to(self.device)


class TokenWorld(World):
    """VQ-VAE tokenizer + token dynamics: `context` frames of tokens in, the next frame's tokens
    out: the argmax at temperature 0; else drawn from the predicted distribution at
    `temperature`, and, with a masked model, drawn again where unsure given the sure cells, for
    up to `passes` passes (decode())."""

    def __init__(self, tok, dyn, space, game, action_meanings, device="cpu", temperature=0.0, passes=4, top_p=TOP_P,
                 games=None):
        super().__init__(tok, dyn, space, game, action_meanings, device, dyn.context)
        if not (math.isfinite(temperature) and temperature >= 0):
            raise KitError(f"temperature must be 0 or more (0: the argmax), got {temperature}")
        self.temperature, self.passes, self.top_p = float(temperature), passes, top_p
        # a model of several games (`games`, in the order of its game input): this world dreams one of
        # them, with that game's own actions at the contract, mapped inside to ALE's 18
        self.game_index, self.to_full = None, None
        if getattr(dyn, "games", 0):
            self.game_index = torch.tensor([list(games).index(game)], device=self.device)
            self.to_full = torch.tensor(full_actions(self.action_meanings), device=self.device)
            self.n_actions = len(self.action_meanings)
        self.memory, self.age = getattr(dyn, "memory", 0), None
        self.past = None  # the actions before this one that the dynamics also see

    @torch.inference_mode()
    def reset_batch(self, frames, seeds=None, rows=None, before=None):
        """Start dreams from frames (B, context, C, H, W) uint8: all of them, or only the dreams
        `rows` (a vector env restarting the ones that ended), the others going on. `before` (B,
        M, C, H, W) uint8: the real frames before them, read into the memory (World.reset)."""
        seen = frames if before is None or not self.memory else torch.cat([before, frames], 1)
        tokens = torch.cat([self.tok.encode(x.to(self.device)) for x in self.chunks(seen.flatten(0, 1), 256)])
        tokens = tokens.view(*seen.shape[:2], *tokens.shape[1:])  # (B, M + T, h, w)
        hist = tokens[:, -frames.shape[1]:]
        # what happened before the first frame seen is unknown: so are the ages of the cells that never change in them
        age = ages(tokens, self.memory, unknown=True)[:, -1] if self.memory else None
        past = torch.full((len(frames), getattr(self.dyn, "actions", 1) - 1), self.dyn.n_actions, device=self.device)
        self._set(rows, hist=hist, age=age, past=past, rewards=torch.zeros(len(frames)),
                  terminals=torch.zeros(len(frames), dtype=torch.bool))
        self._streams(len(frames), seeds, rows)

    @torch.inference_mode()
    def step_batch(self, actions, pixels=True):
        """One step of every dream in flight -> (B, C, H, W) uint8 frames, or with pixels=False
        the (B, h, w) tokens, skipping the decoder."""
        a = self._actions(actions)
        if self.to_full is not None:
            a = self.to_full[a]
        if self.past.shape[1]:  # the dynamics see the last actions, oldest first
            a = torch.cat([self.past, a[:, None]], 1)
            self.past = a[:, 1:]
        game = None if self.game_index is None else self.game_index.expand(len(a))

        def predict(rows, partial):
            kw = {} if game is None else {"game": game[rows]}  # only a model of several games takes it
            return self.dyn(self.hist[rows], a[rows], None if self.age is None else self.age[rows], partial, **kw)
        return self._advance(self.decode(predict), pixels)

    @torch.inference_mode()
    def reconstruct(self, frames):
        """The tokenizer's round trip of the newest frame of each window (B, T, C, H, W) uint8:
        the best any dream can do in this frame space."""
        return self.draw(self.tok.encode(frames[:, -1].to(self.device)))

    def decode(self, predict):
        """The next frame's tokens from predict(rows, partial) -> logits of those dreams, given
        the next frame decided so far (None: nothing). Each token is drawn by the Gumbel-max
        trick with its dream's own noise. Tokens drawn with probability under SURE are drawn
        again, given the others, half of them at a time, surest first: confidence-ordered
        decoding as MaskGIT's, which needs a model trained with partly hidden next frames."""
        all_rows = torch.arange(len(self.hist), device=self.device)
        logits = self._predict(predict, all_rows, None)
        if self.temperature == 0:
            return logits.argmax(1)
        nxt, conf = self._draw(logits, all_rows)
        unsure = conf < SURE
        for _ in range(self.passes - 1 if getattr(self.dyn, "masked", False) else 0):
            rows = unsure.flatten(1).any(1).nonzero()[:, 0]
            if not len(rows):
                break
            u = unsure[rows]
            keep = (u.flatten(1).sum(1) + 1) // 2  # of each dream's unsure cells, the surest half stays
            score = conf[rows].log() + self.temperature * self._gumbel(u.shape[1:], rows)  # MaskGIT's choice noise
            rank = torch.where(u, score, math.inf).flatten(1).argsort(1).argsort(1).view_as(u)  # least sure: 0
            redo = u & (rank < (u.flatten(1).sum(1) - keep)[:, None, None])
            if not redo.any():  # one unsure cell per dream: it stays as drawn
                break
            partial = torch.where(redo, self.dyn.n_codes, nxt[rows])
            again, conf2 = self._draw(self._predict(predict, rows, partial), rows)
            nxt[rows], conf[rows] = torch.where(redo, again, nxt[rows]), torch.where(redo, conf2, conf[rows])
            unsure[rows] = redo & (conf2 < SURE)
        return nxt

    def _predict(self, predict, rows, partial):
        """predict(rows, partial), DYNAMICS_CHUNK dreams at a time."""
        parts = [None] * len(rows) if partial is None else self.chunks(partial, self.DYNAMICS_CHUNK)
        return torch.cat([predict(r, p) for r, p in zip(self.chunks(rows, self.DYNAMICS_CHUNK), parts)])

    def _uniform(self, shape, rows, counts=None):
        """Noise from each dream's own stream: `shape` for each of the dreams `rows`, stacked; or,
        with `counts`, counts[i] x `shape` for dream rows[i], concatenated."""
        if counts is None:
            u = torch.stack([torch.rand(shape, generator=self.generators[r]) for r in rows.tolist()])
        else:
            u = torch.cat([torch.rand((n, *shape), generator=self.generators[r])
                           for r, n in zip(rows.tolist(), counts)])
        return u.clamp(1e-12, 1 - 1e-7).to(self.device)

    def _gumbel(self, shape, rows, counts=None):
        return -torch.log(-torch.log(self._uniform(shape, rows, counts)))

    def _draw(self, logits, rows):
        """Each cell of the dreams `rows`, drawn in two steps: does it change, and if so, into
        which token. Both at the temperature, the second from its nucleus (the fewest tokens
        with `top_p` of the probability, Holtzman et al. 2020). A ball the model is sure is
        there, but not sure which of its tokens (one pixel on, one off), is kept; and over
        hundreds of cells a frame, the unlikely tail of every cell adds no stray objects.
        -> (tokens, the probability of each drawn outcome)"""
        copy = self.hist[rows, -1]
        logp = logits.log_softmax(1)
        stay = logp.gather(1, copy[:, None])[:, 0]
        change = (torch.log1p(-stay.exp().clamp(max=1 - 1e-6)) - stay) / self.temperature  # logit of a change
        u = self._uniform(change.shape[1:], rows)
        changes = change + torch.log(u) - torch.log1p(-u) > 0
        b, y, x = changes.nonzero(as_tuple=True)  # the few cells that change: their new token
        counts = torch.bincount(b, minlength=len(rows)).tolist()  # noise for those cells only
        gumbel = self._gumbel((logits.shape[1],), rows, counts)
        p = (logp[b, :, y, x] / self.temperature).scatter(1, copy[b, y, x, None], -math.inf).softmax(1)
        top, order = p.sort(1, descending=True)
        inside = top.cumsum(1) - top < self.top_p
        p = torch.where(torch.zeros_like(inside).scatter(1, order, inside), p, 0.0)
        p = p / p.sum(1, keepdim=True)
        other = (p.log() + gumbel).argmax(1)
        nxt, sure = copy.clone(), torch.sigmoid(change)
        nxt[b, y, x] = other
        conf = 1 - sure
        conf[b, y, x] = sure[b, y, x] * p.gather(1, other[:, None])[:, 0]
        return nxt, conf

    def _advance(self, nxt, pixels=True):
        if self.heads is not None:
            self._outcome(torch.cat([self.hist[:, 1 - self.heads.frames:], nxt[:, None]], 1))
        if self.memory:
            self.age = next_age(self.age, self.hist[:, -1], nxt, self.memory)
        self.hist = torch.cat([self.hist[:, 1:], nxt[:, None]], 1)
        return self.draw(nxt) if pixels else nxt


class LatentActionWorld(TokenWorld):
    """A world from train_latent_action.py: step(action) goes through the map from real actions
    to latent actions; step_latent_action(i) fires latent action i directly (play.py
    --latent-actions)."""

    def __init__(self, tok, dyn, space, game, action_meanings, device="cpu", temperature=0.0, mapped=True):
        super().__init__(tok, dyn, space, game, action_meanings, device, temperature)
        self.n_latent_actions, self.mapped = dyn.n_latent_actions, mapped

    def step_batch(self, actions, pixels=True):
        if not self.mapped:
            raise KitError("this latent-action model has no map from real actions yet (--map-steps 0): fire latent "
                           "actions with play.py --latent-actions, or fit a map with train_latent_action.py --map-only")
        return super().step_batch(actions, pixels)

    @torch.inference_mode()
    def step_latent_action(self, latent_action):
        if self.hist is None:
            raise KitError("call reset(frames) before step_latent_action(i)")
        if not 0 <= int(latent_action) < self.n_latent_actions:
            raise KitError(f"latent action {latent_action} out of range 0..{self.n_latent_actions - 1}")
        a = torch.tensor([int(latent_action)], device=self.device)
        return self._frame(self._advance(self.decode(lambda rows, partial: self.dyn.dynamics(
            self.hist[rows], a[rows], None if self.age is None else self.age[rows], partial)))[0].cpu())


class LatentWorld(World):
    """Autoencoder + latent dynamics (MLP or GRU). A stacked autoencoder encodes `stack`
    frames into one latent, so `context` frames make context - stack + 1 latents of history;
    a step decodes all stacked frames of the predicted latent and shows the newest."""

    def __init__(self, tok, dyn, space, game, action_meanings, device="cpu"):
        super().__init__(tok, dyn, space, game, action_meanings, device, dyn.context + tok.stack - 1)
        self.h = None

    @torch.inference_mode()
    def reset_batch(self, frames, seeds=None, rows=None, before=None):  # no memory beyond the context: `before` unread
        stacks = torch.stack([stack_frames(f, self.tok.stack) for f in frames.to(self.device)])  # (B, L, S*C, H, W)
        hist = self.tok.encode(stacks.flatten(0, 1)).view(*stacks.shape[:2], -1)  # (B, L, D)
        self._set(rows, hist=hist, h=self.dyn.warm(hist))  # the GRU runs over the history but its newest latent
        self._streams(len(frames), seeds, rows)  # deterministic dynamics: nothing is drawn from them

    @torch.inference_mode()
    def reconstruct(self, frames):
        """The autoencoder's round trip of the newest frame of each window (B, T, C, H, W) uint8."""
        stacks = frames[:, -self.tok.stack:].flatten(1, 2).to(self.device)
        return self.draw(self.tok.encode(stacks), last=True)

    @torch.inference_mode()
    def step_batch(self, actions, pixels=True):
        """One step of every dream -> (B, C, H, W) uint8 frames, or with pixels=False the latents."""
        nxt, self.h = self.dyn(self.hist, self._actions(actions), self.h)
        if self.heads is not None:
            self._outcome(torch.cat([self.hist[:, 1 - self.heads.frames:], nxt[:, None]], 1))
        self.hist = torch.cat([self.hist[:, 1:], nxt[:, None]], 1)
        return self.draw(nxt, last=True) if pixels else nxt


def load_world(path, device="cpu", temperature=TEMPERATURE, game=None):
    """Any world checkpoint the kit writes -> an object keeping the contract above. A world over
    an autoencoder says so in tokenizer_kind; one without it is over a VQ-VAE. Token worlds draw
    their next frame at `temperature` (latent worlds are deterministic and ignore it), and, with
    heads, the reward and the end of each step (wm.reward, wm.terminated). A model of several
    games dreams `game` (default: the first it was trained on), with that game's own actions."""
    ck = load_checkpoint(path, ("world",))
    games = trained_games(ck)
    game = next(iter(games)) if game is None else resolve_game(game)
    if game not in games:
        raise KitError(f"{path} was trained on {', '.join(g[4:-3] for g in games)}, not {game[4:-3]}")
    latent = ck.get("tokenizer_kind", "vqvae") == "ae"
    try:
        tok = (ConvAE if latent else VQVAE)(**ck["tokenizer_args"])
        tok.load_state_dict(ck["tokenizer"])
        dyn = make_dynamics(**ck["model_args"])
        dyn.load_state_dict(ck["model"])
        heads = (LatentOutcome if latent else Outcome)(**ck["heads_args"]) if "heads" in ck else None
        if heads is not None:
            heads.load_state_dict(ck["heads"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise KitError(f"{path} does not fit this version of the kit ({first_line(e)})") from None
    args = (tok, dyn, ck["frame_space"], game, games[game], device)
    if latent:
        wm = LatentWorld(*args)
    elif ck["model_args"]["arch"] == "lam":
        wm = LatentActionWorld(*args, temperature, mapped=ck.get("map_step", 0) > 0)
    else:
        wm = TokenWorld(*args, temperature, games=list(games))
    wm.heads = None if heads is None else heads.to(wm.device).eval()  # the reward and the end: wm.reward, wm.terminated
    data = ck.get("args", {}).get("data")  # a folder, or (since --data takes several) one per game, in order
    wm.data = data[list(games).index(game)] if isinstance(data, (list, tuple)) else data
    return wm


# -----------------------------------------------------------------------------
# the dream as an environment: gymnasium's API over the contract, one dream (DreamEnv) or many
# stepped in one forward pass (DreamVecEnv), for programs that act in the world model.
# Reward and end come from the world's heads (train_world.py --heads); a world without them
# pays 0 and never ends, and says so once.

def _dream_world(world, device, temperature, game=None):
    """A world, or a checkpoint path (and, for a model of several games, the game) -> a world;
    ValueError for a checkpoint that is not one."""
    if not isinstance(world, str):
        return world
    try:
        return load_world(world, device, TEMPERATURE if temperature is None else temperature, game)
    except KitError as e:
        raise ValueError(str(e)) from None


class DreamStarts:
    """Where dreams start: `context` real frames (T, C, H, W) uint8 in the world's space, drawn
    with a numpy Generator. start="env": a real emulator reset (seeded from the generator) and
    NOOPs, so a checkpoint alone is enough; start="data": a window of the recorded episodes in
    `data` (default: the ones the world was trained on), from a pool of `pool` windows read once,
    a share `paying` of them windows after which the recording paid a reward within `within` steps."""

    def __init__(self, world, start="env", data=None, pool=256, paying=0.0, within=20):
        if start not in ("env", "data"):
            raise ValueError(f"start must be 'env' or 'data', got {start!r}")
        self.world, self.env, self.pool = world, None, None
        if start == "data":
            self.pool = self._read(data or world.data, pool, paying, within)

    def _read(self, folder, n, paying, within):
        try:
            files = episode_files(folder or "")
            T, rng, pool, per = self.world.context, np.random.default_rng(0), [], -(-n // len(files))
            for f in files[:n]:
                ep = load_episode(f, ["frames", "rewards", "game"])
                if str(ep["game"]) != self.world.game:
                    raise KitError(f"{f} is {ep['game']}, the world dreams {self.world.game}")
                last = len(ep["frames"]) - T  # the last window's first frame
                if last < 0:
                    continue
                starts, paid = rng.integers(0, last + 1, size=per), self.paying(ep["rewards"], T, within)
                k = rng.binomial(per, paying) if len(paid) else 0
                starts[:k] = rng.choice(paid, k) if k else starts[:k]
                pool += [preprocess(ep["frames"][s:s + T], self.world.space) for s in starts]
        except KitError as e:
            raise ValueError(f"start='data': {e}") from None
        if not pool:
            raise ValueError(f"start='data': no episode in {folder} has {self.world.context} frames")
        return pool

    @staticmethod
    def paying(rewards, context, within):
        """The first frames s of the windows (s .. s + context - 1) from which a dream meets one of
        the recorded `rewards` (N,) within `within` steps: reward j comes at step j - s - context + 2."""
        s = [np.arange(j - context + 2 - within, j - context + 2) for j in np.nonzero(rewards)[0]]
        s = np.unique(np.concatenate(s + [np.zeros(0, int)]))
        return s[(s >= 0) & (s <= len(rewards) + 1 - context)]

    def __call__(self, rng):
        if self.pool is not None:
            return self.pool[int(rng.integers(len(self.pool)))]
        if self.env is None:
            self.env = make_env(self.world.game)
        obs, _ = self.env.reset(seed=int(rng.integers(2 ** 31)))
        frames = [obs] + [self.env.step(0)[0] for _ in range(self.world.context - 1)]  # 0: NOOP in every ALE game
        return preprocess(np.stack(frames), self.world.space)


def _no_heads(world):
    if world.heads is None:
        warnings.warn("this world has no reward/end heads (train_world.py --heads): its dreams pay 0 and never end",
                      stacklevel=3)


def _frame_space_box(world):
    H, W, C = frame_shape(world.space)
    return gym.spaces.Box(0, 255, (H, W, C) if C == 3 else (H, W), np.uint8)


class DreamEnv(gym.Env):
    """One dream as a gymnasium environment: observations are the model's frames, actions the
    game's (get_action_meanings() as ALE has it), reward and end drawn by the world's heads,
    truncation after `max_episode_steps`. reset(seed=...) starts from real frames (DreamStarts),
    or from options={"frames": context frames as observe() gives them}.
    gymnasium.make("AtariDream-v0", world="checkpoints/pong/world.pt") builds one (game="Breakout": that
    game of a model of several)."""

    metadata = {"render_modes": ["rgb_array", "human"], "render_fps": 15}

    def __init__(self, world, start="env", data=None, max_episode_steps=1000, temperature=None, device="cpu",
                 render_mode=None, pool=256, game=None):
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.world = _dream_world(world, device, temperature, game)
        self.starts, self.max_episode_steps = DreamStarts(self.world, start, data, pool), max_episode_steps
        self.observation_space = _frame_space_box(self.world)
        self.action_space, self.render_mode = gym.spaces.Discrete(self.world.n_actions), render_mode
        self.obs, self.t, self.window = None, 0, None
        _no_heads(self.world)

    def get_action_meanings(self):
        return list(self.world.action_meanings)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if options and "frames" in options:
            frames = np.asarray(options["frames"], np.uint8)
            if frames.shape != (self.world.context, *self.observation_space.shape):
                raise ValueError(f"options['frames'] must be {self.world.context} frames of shape "
                                 f"{self.observation_space.shape}, got {frames.shape}")
            frames = frames_tensor(frames)
        else:
            frames = self.starts(self.np_random)
        self.world.reset_batch(frames[None], seeds=[int(self.np_random.integers(2 ** 62))])
        self.obs, self.t = self.world._frame(frames[-1]).copy(), 0  # not a view of the start pool: users keep it
        return self.obs, {}

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not in {self.action_space}")
        self.obs, self.t = self.world.step(int(action)), self.t + 1
        return self.obs, self.world.reward, self.world.terminated, self.t >= self.max_episode_steps, {}

    def render(self):
        rgb = to_image(self.obs)
        if self.render_mode == "rgb_array":
            return rgb
        if self.render_mode == "human":
            import pygame
            if self.window is None:
                pygame.init()
                self.window = pygame.display.set_mode((rgb.shape[1] * 4, rgb.shape[0] * 4))
            pygame.event.pump()
            surf = pygame.surfarray.make_surface(rgb.repeat(4, 0).repeat(4, 1).swapaxes(0, 1))
            self.window.blit(surf, (0, 0))
            pygame.display.flip()

    def close(self):
        if self.window is not None:
            import pygame
            pygame.display.quit()
            self.window = None


class DreamVecEnv(gym.vector.VectorEnv):
    """`num_envs` dreams stepped in one forward pass of the world, each with its own seed, start
    and end: gymnasium's VectorEnv API and its default autoreset (NEXT_STEP: the step after an
    end returns the new episode's first observation, with reward 0, and ignores the action).
    Dream i does what a DreamEnv reset with seed + i does (the same draws where the arithmetic is
    the same, as on one thread; on some CPUs the batched decoder still rounds a pixel one level
    otherwise than a single frame's). obs="tokens" gives a token
    world's (h, w) tokens instead of frames, skipping the decoder."""

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, world, num_envs=8, start="env", data=None, obs="frames", max_episode_steps=1000,
                 temperature=None, device="cpu", pool=256, paying=0.0, game=None):
        self.world = _dream_world(world, device, temperature, game)
        if obs not in ("frames", "tokens") or (obs == "tokens" and not isinstance(self.world, TokenWorld)):
            raise ValueError(f"obs must be 'frames' or, for a token world, 'tokens'; got {obs!r}")
        self.num_envs, self.obs, self.max_episode_steps = int(num_envs), obs, max_episode_steps
        self.starts = DreamStarts(self.world, start, data, pool, paying, within=max_episode_steps)
        if obs == "tokens":
            H, W, C = frame_shape(self.world.space)
            grid = self.world.tok.encode(torch.zeros(1, C, H, W, dtype=torch.uint8, device=self.world.device)).shape[1:]
            self.single_observation_space = gym.spaces.Box(0, self.world.tok.n_codes - 1, tuple(grid), np.int64)
        else:
            self.single_observation_space = _frame_space_box(self.world)
        self.single_action_space = gym.spaces.Discrete(self.world.n_actions)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, self.num_envs)
        self.rngs, self.t, self.ended = None, np.zeros(self.num_envs, int), np.zeros(self.num_envs, bool)
        _no_heads(self.world)

    def get_action_meanings(self):
        return list(self.world.action_meanings)

    def _start(self, rows):
        """Start the dreams `rows` again from their own generators -> their first observations."""
        frames = torch.stack([self.starts(self.rngs[i]) for i in rows])
        seeds = [int(self.rngs[i].integers(2 ** 62)) for i in rows]
        self.world.reset_batch(frames, seeds=seeds, rows=None if len(rows) == self.num_envs else rows)
        self.t[rows], self.ended[rows] = 0, False
        return self.world.hist[torch.as_tensor(rows), -1].cpu().numpy() if self.obs == "tokens" else \
            observations(frames[:, -1])

    def reset(self, *, seed=None, options=None):
        seeds = [None] * self.num_envs if seed is None else \
            [seed + i for i in range(self.num_envs)] if isinstance(seed, int) else list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(f"{len(seeds)} seeds for {self.num_envs} dreams")
        self.rngs = [gym.utils.seeding.np_random(s)[0] for s in seeds]
        return self._start(np.arange(self.num_envs)), {}

    def step(self, actions):
        a = np.asarray(actions).reshape(-1)
        if len(a) != self.num_envs or not all(self.single_action_space.contains(int(x)) for x in a):
            raise ValueError(f"want {self.num_envs} actions in 0..{self.world.n_actions - 1}, got {actions!r}")
        out = self.world.step_batch(torch.as_tensor(a), pixels=self.obs == "frames")
        obs, n = out.cpu().numpy() if self.obs == "tokens" else observations(out), self.num_envs
        reward = np.zeros(n) if self.world.rewards is None else self.world.rewards.numpy().astype(np.float64)
        terminated = np.zeros(n, bool) if self.world.terminals is None else self.world.terminals.numpy().copy()
        self.t += 1
        truncated = self.t >= self.max_episode_steps
        redo = np.nonzero(self.ended)[0]
        if len(redo):  # the dreams that ended at the last step start again; this step's action is not theirs
            obs[redo] = self._start(redo)
            reward[redo], terminated[redo], truncated[redo] = 0.0, False, False
        self.ended = terminated | truncated
        return obs, reward, terminated, truncated, {}


if "AtariDream-v0" not in gym.registry:
    gym.register("AtariDream-v0", entry_point=f"{__name__}:DreamEnv", vector_entry_point=f"{__name__}:DreamVecEnv")


# =============================================================================
# 8. scoring: one copy of each rule. Dreams are scored against the real frames by PSNR and,
# on Pong, by where the paddle and the ball are, measured on the frames themselves in raw
# 210x160 pixels: ~99.5% of a Pong frame is static, so copying the last frame already scores
# ~33 dB, and average pixels say little about the objects that make the game.

HORIZONS = (1, 5, 10, 30)  # steps after the last real frame at which open-loop dreams are scored


def psnr(mse):
    """dB of a mean squared error on [0, 255] pixels (a number, an array or a tensor), floored at
    1e-3 so that identical frames score 78 dB rather than infinity."""
    if torch.is_tensor(mse):
        return 10 * torch.log10(255 ** 2 / mse.clamp_min(1e-3))
    return 10 * np.log10(255 ** 2 / np.maximum(mse, 1e-3))


def frame_mse(a, b):
    """Mean squared error of each frame: a, b (B, ...) uint8 tensors -> (B,) float."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def blobs(mask, weight):
    """The 8-connected blobs of a small boolean mask -> [(row, col, pixels, peak)], brightest
    first; centroids weighted by `weight` (a float array of the mask's shape)."""
    seen, out = np.zeros_like(mask), []
    for r, c in zip(*np.nonzero(mask)):
        if seen[r, c]:
            continue
        todo, pix, seen[r, c] = [(r, c)], [], True
        while todo:
            y, x = todo.pop()
            pix.append((y, x))
            for yy in range(max(y - 1, 0), min(y + 2, mask.shape[0])):
                for xx in range(max(x - 1, 0), min(x + 2, mask.shape[1])):
                    if mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        todo.append((yy, xx))
        ys, xs = np.array(pix).T
        w = weight[ys, xs]
        out.append(((ys + 0.5) @ w / w.sum(), (xs + 0.5) @ w / w.sum(), len(pix), float(w.max())))
    return sorted(out, key=lambda b: -b[3])


def _gray(frame, space):
    """frame H x W (x C) uint8 in `space` -> (luminance, raw pixels per row, per column)"""
    H, W, _ = frame_shape(space)
    f = np.asarray(frame, np.float32)
    return (f if f.ndim == 2 else f @ np.array([0.299, 0.587, 0.114], np.float32)), 210 / H, 160 / W


PONG_FIELD = (34, 194)      # raw rows of the play field (between the white walls)
PONG_PLAYER = (140, 144)    # raw columns of the player's (right, green) paddle
PONG_OPPONENT = (16, 20)    # raw columns of the opponent's paddle
PONG_SCORE = 21             # raw rows of the score's digits, above the top wall


def pong_objects(frame, space):
    """A Pong frame in `space` -> {"paddle": the player's paddle row or None, "opponent": the
    opponent's, "balls": [(row, col, area)], "score": the luminance of the rows of the score's
    digits} in raw 210x160 pixels (area in raw pixels), brightest ball first. Balls are blobs of
    the field outside the paddles' columns that stand out of the background by 40."""
    g, sy, sx = _gray(frame, space)
    r0, r1 = int(np.ceil(PONG_FIELD[0] / sy)), int(PONG_FIELD[1] / sy)
    fg = np.abs(g[r0:r1] - 87.0)  # Pong's background is luminance 87; paddles ~147, ball 236
    fg[fg < 25] = 0
    out = {"score": g[:int(PONG_SCORE / sy)].copy()}
    for key, band in (("paddle", PONG_PLAYER), ("opponent", PONG_OPPONENT)):
        cols = slice(int(band[0] / sx), int(np.ceil(band[1] / sx)))
        pad = fg[:, cols].sum(1)
        out[key] = (pad @ (np.arange(len(pad)) + 0.5) / pad.sum() + r0) * sy if pad.sum() > 60 else None
        fg[:, cols] = 0
    out["balls"] = [((r + r0) * sy, c * sx, n * sy * sx) for r, c, n, peak in blobs(fg > 0, fg) if peak > 40]
    return out


BREAKOUT_FIELD = (32, 152, 8, 152)  # raw rows from the top wall down to the paddle, columns between the walls
BREAKOUT_BRICKS = (57, 93)          # raw rows of the six brick rows
BREAKOUT_PADDLE = (189, 193)        # raw rows of the paddle


def breakout_objects(frame, space):
    """A Breakout frame in `space` -> {"paddle": its column or None, "balls": [(row, col,
    area)], "bricks": raw pixels of brick left} in raw 210x160 pixels. Balls are searched from
    wall to wall, above the paddle and off every pixel that touches a brick row (a ball in a
    brick gap is not seen), against each column's darkest pixel: black, or the share of a wall
    in the pixels that straddle one, the same all the way down."""
    g, sy, sx = _gray(frame, space)
    rows = lambda a, b: slice(int(np.ceil(a / sy)), int(b / sy))
    c0, c1 = int(np.ceil(BREAKOUT_FIELD[2] / sx)), int(BREAKOUT_FIELD[3] / sx)
    pad = np.clip(g[rows(*BREAKOUT_PADDLE), c0:c1] - 20, 0, None).sum(0)
    paddle = (pad @ (np.arange(len(pad)) + 0.5) / pad.sum() + c0) * sx if pad.sum() > 60 else None
    bricks = float((g[rows(*BREAKOUT_BRICKS), c0:c1] > 20).sum()) * sy * sx
    fg = np.zeros_like(g)
    r0, r1 = int(np.ceil(BREAKOUT_FIELD[0] / sy)), int(BREAKOUT_PADDLE[0] / sy) - 1
    w0, w1 = int(BREAKOUT_FIELD[2] / sx), int(np.ceil(BREAKOUT_FIELD[3] / sx))  # the wall pixels too
    field = g[r0:r1, w0:w1]
    fg[r0:r1, w0:w1] = np.clip(field - field.min(0) - 10, 0, None)
    if space.endswith("max"):  # max pooling blends the red ball and a gray wall channel by channel, one
        # luminance step from the wall: its red stands out (R - G: the ball 128, the blend 58, gray 0)
        f = np.asarray(frame, np.float32)[r0:r1, w0:w1]
        red = np.clip(f[..., 0] - f[..., 1], 0, None)  # gray and the teal corners: none
        fg[r0:r1, w0:w1] = np.maximum(fg[r0:r1, w0:w1], np.clip(red - red.min(0) - 10, 0, None))
    fg[int(BREAKOUT_BRICKS[0] / sy):int(np.ceil(BREAKOUT_BRICKS[1] / sy))] = 0
    balls = [(r * sy, c * sx, n * sy * sx) for r, c, n, peak in blobs(fg > 10, fg) if peak > 25]
    return {"paddle": paddle, "balls": balls, "bricks": bricks}


def spaceinvaders_objects(frame, space):
    """A SpaceInvaders frame in `space` -> {"cannon": its column or None, "invaders": [(row,
    col, area)], "shots": [(row, col, area)]} in raw 210x160 pixels, searched where the
    invaders march (above the bunkers); the background is black. Shots are grey, invaders
    yellow: in an rgb space the blue channel tells them apart (area resampling keeps the hue);
    in gray, a blob under 30 raw pixels (a shot is 1x8, an invader 8x10) is a shot."""
    g, sy, sx = _gray(frame, space)
    c = np.clip(g[int(np.ceil(SPACE_INVADERS_CANNON[0] / sy)):int(SPACE_INVADERS_CANNON[1] / sy)] - 20, 0, None).sum(0)
    cannon = (c @ (np.arange(len(c)) + 0.5) / c.sum()) * sx if c.sum() > 60 else None
    r0, r1 = int(np.ceil(SPACE_INVADERS_FIELD[0] / sy)), int(SPACE_INVADERS_FIELD[1] / sy)
    fg = np.clip(g[r0:r1] - 20, 0, None)
    f = np.asarray(frame, np.float32)[r0:r1]
    grey = f[..., 2] > 0.6 * f[..., 0] if f.ndim == 3 else None
    found = lambda mask: [((r + r0) * sy, c * sx, n * sy * sx) for r, c, n, peak in blobs(mask, fg) if peak > 25]
    if grey is None:
        every = found(fg > 10)
        return {"cannon": cannon, "invaders": [b for b in every if b[2] >= 30],
                "shots": [b for b in every if b[2] < 30]}
    return {"cannon": cannon, "invaders": found((fg > 10) & ~grey), "shots": found((fg > 10) & grey)}


SPACE_INVADERS_NEAR = {"invaders": 4, "shots": 8}  # raw pixels: invaders march 16 apart, shots fly 4-8 a step


def spaceinvaders_scores(dream, real, space, k):
    """At horizon k: the share of the real invaders that the dream draws within 4 raw pixels
    (a formation marched a step too far or too short misses), and of the real shots within 8;
    and the share of the dream's invaders and shots that stand where the real frame has none."""
    hit, extra = {"invaders": [], "shots": []}, []
    near = lambda b, others, kind: any(np.hypot(b[0] - o[0], b[1] - o[1]) <= SPACE_INVADERS_NEAR[kind]
                                       for o in others)
    for d, r in zip(dream, real):
        want, got = spaceinvaders_objects(to_image(r), space), spaceinvaders_objects(to_image(d), space)
        for kind in hit:
            hit[kind] += [near(b, got[kind], kind) for b in want[kind]]
            extra += [not near(b, want[kind], kind) for b in got[kind]]
    stat = lambda x: float(np.mean(x)) if len(x) else float("nan")  # plain floats: checkpoints load with weights_only
    return {f"invaders_4px@{k}": stat(hit["invaders"]), f"shots_8px@{k}": stat(hit["shots"]),
            f"invented@{k}": stat(extra)}


def pong_scores(dream, real, space, k):
    """The paddle/ball rule, at horizon k: the player's paddle error (raw pixels) over frames
    where the real paddle is visible, a dream that lost it counting as 210 pixels off; and the
    share of frames with a real ball whose dream has a ball within 8 raw pixels of it."""
    pad, ball = [], []
    for d, r in zip(dream, real):
        want, got = pong_objects(to_image(r), space), pong_objects(to_image(d), space)
        if want["paddle"] is not None:
            pad.append(abs(got["paddle"] - want["paddle"]) if got["paddle"] is not None else 210.0)
        if want["balls"]:
            (rb, rc, _), seen = want["balls"][0], got["balls"][:1]
            ball.append(bool(seen) and np.hypot(seen[0][0] - rb, seen[0][1] - rc) <= 8)
    pad, ball = np.array(pad), np.array(ball, float)
    stat = lambda x, f: float(f(x)) if len(x) else float("nan")  # plain floats: checkpoints load with weights_only
    return {f"paddle_px@{k}": stat(pad, np.mean), f"paddle_median@{k}": stat(pad, np.median),
            f"paddle_2px@{k}": stat(pad <= 2, np.mean), f"ball_8px@{k}": stat(ball, np.mean)}


@torch.no_grad()
def open_loop(wm, frames, actions, horizons=HORIZONS, before=0):
    """Dream from the first `wm.context` real frames with the true actions and score the dream
    against the real frames: frames (B, context + max(horizons), C, H, W) uint8 in wm's frame
    space, actions (B, max(horizons)); with `before` > 0, frames has that many more real frames
    first, which go into the world's memory (World.reset). -> psnr@h and copy_psnr@h (the last
    real frame as the prediction) at each horizon; on Pong, pong_scores (the ball at every
    horizon, the paddle at 10 and 30 steps); on SpaceInvaders, spaceinvaders_scores at every horizon."""
    T, pong, invaders = wm.context, wm.game == "ALE/Pong-v5", wm.game == "ALE/SpaceInvaders-v5"
    wm.reset_batch(frames[:, before:before + T], before=frames[:, :before] if before else None)
    frames = frames[:, before:]
    m = {}
    for k in range(1, max(horizons) + 1):
        dream = wm.step_batch(actions[:, k - 1]).cpu()
        if k in horizons:
            real = frames[:, T - 1 + k]
            m[f"psnr@{k}"] = psnr(frame_mse(dream, real)).mean().item()
            m[f"copy_psnr@{k}"] = psnr(frame_mse(frames[:, T - 1], real)).mean().item()
            if pong:  # the ball at every horizon: where it is lost; the paddle at 10 and 30
                m.update({key: v for key, v in pong_scores(dream, real, wm.space, k).items()
                          if k in (10, 30) or key.startswith("ball")})
            if invaders:
                m.update(spaceinvaders_scores(dream, real, wm.space, k))
    return m


def _events(pred, true, tolerance):
    """Matched events, one to one: (true positives, predicted, real). pred, true: lists of (time,
    value) of the non-zero outcomes; a prediction matches a real event of the same value at
    most `tolerance` steps away."""
    left, hits = list(true), 0
    for t, v in pred:
        m = next((e for e in left if e[1] == v and abs(e[0] - t) <= tolerance), None)
        if m is not None:
            left.remove(m)
            hits += 1
    return np.array([hits, len(pred), len(true)])


@torch.no_grad()
def outcome_scores(wm, episodes, horizon=10, batch=256):
    """Precision and recall of the heads' reward events (the sign must match) and episode ends:
    at one step from real history, exactly at that step; and in open-loop rollouts of `horizon`
    steps with the true actions, started every `horizon` steps, within one step. episodes:
    dicts with frames (N+1, C, H, W) uint8 in wm's space, actions, rewards, terminated (N,).
    NaN where there is nothing to count (Pong's default data never ends: it is cut at 1000 steps)."""
    T, tally = wm.context, {}
    for k in (1, horizon):
        count = {"reward": np.zeros(3), "end": np.zeros(3)}
        for ep in episodes:
            real = {"reward": np.sign(ep["rewards"].numpy()), "end": ep["terminated"].numpy().astype(float)}
            starts = list(range(T - 1, len(ep["actions"]) - k + 1, k))
            for chunk in [starts[i:i + batch] for i in range(0, len(starts), batch)]:
                wm.seed(0)
                wm.reset_batch(torch.stack([ep["frames"][s - T + 1:s + 1] for s in chunk]))
                got = {"reward": [], "end": []}
                for j in range(k):
                    wm.step_batch(ep["actions"][[s + j for s in chunk]], pixels=False)
                    got["reward"].append(np.zeros(len(chunk)) if wm.rewards is None else wm.rewards.numpy())
                    got["end"].append(np.zeros(len(chunk)) if wm.terminals is None else wm.terminals.numpy())
                for name in count:
                    for i, s in enumerate(chunk):
                        true = [(s + j, real[name][s + j]) for j in range(k) if real[name][s + j]]
                        pred = [(s + j, got[name][j][i]) for j in range(k) if got[name][j][i]]
                        count[name] += _events(pred, true, 0 if k == 1 else 1)
        for name, (hits, npred, ntrue) in count.items():
            # plain floats: checkpoints load with weights_only
            tally[f"{name}_precision@{k}"] = float(hits / npred) if npred else float("nan")
            tally[f"{name}_recall@{k}"] = float(hits / ntrue) if ntrue else float("nan")
    return tally


def busiest(episodes, length):
    """(episode index, start) of the window of `length` frames in which the most pixels change:
    a rally, not a pause between points. episodes: a list of (N, C, H, W) uint8 frame tensors."""
    best = (-1.0, 0, 0)
    for i, f in enumerate(episodes):
        if len(f) >= length:
            moving = (f[1:] != f[:-1]).flatten(1).sum(1).float()
            busy = F.conv1d(moving[None, None], torch.ones(1, 1, length - 1))[0, 0]
            best = max(best, (busy.max().item(), i, int(busy.argmax())))
    return best[1], best[2]


@torch.no_grad()
def dream_gif(wm, frames, actions, path, fps=15):
    """real | dream | |difference| of one open-loop dream, 3x upscaled, into a GIF: frames
    (context + n, C, H, W) uint8 in wm's frame space, actions (n,) taken after the context."""
    T, out = wm.context, []
    wm.reset_batch(frames[None, :T])
    for k in range(len(actions)):
        dream, real = to_image(wm.step_batch(actions[k:k + 1])[0]), to_image(frames[T + k])
        diff = np.abs(real.astype(int) - dream.astype(int)).astype(np.uint8)
        sep = np.full((real.shape[0], 2, 3), 255, np.uint8)
        out.append(np.concatenate([real, sep, dream, sep, diff], 1).repeat(3, 0).repeat(3, 1))
    imageio.mimsave(path, out, duration=1000 / fps, loop=0)  # milliseconds since imageio 2.28
