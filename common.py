"""The one shared module: errors, device, env factory, policies, frame preprocessing,
episode and checkpoint I/O, the models, and the world-model contract (`load_world`).

Everything here is used by two or more scripts. Read it top to bottom once; the scripts
are thin on purpose.
"""
import difflib
import glob
import hashlib
import io
import os
import random
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# errors: one clear line and a non-zero exit, never a traceback, for bad input

class KitError(Exception):
    """A user-facing error: printed as one line by `run`, exit code 2."""


def run(main):
    """Call `main()`; turn a KitError into `error: ...` on stderr and exit 2."""
    try:
        main()
    except KitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# device and seeding

def pick_device(name=None):
    """cuda, then mps, then cpu; `name` (the --device flag) overrides."""
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise KitError(f"--device {name}: CUDA is not available on this machine")
        if name == "mps" and not torch.backends.mps.is_available():
            raise KitError("--device mps: MPS is not available on this machine")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# environment: every script and every evaluation gets its env from make_env

def _ale_games():
    import gymnasium as gym
    import ale_py
    gym.register_envs(ale_py)
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


class MaxPoolSkip:
    """Repeat each action `skip` frames and return the max of the last two frames.

    Atari sprites flicker (drawn on alternate frames), so the DQN-style max over the
    last two emulator frames keeps them visible (seed 003, "max-pool last 2 frames").
    Steps the ALE directly: the emulator is the cost, not Python wrappers.
    """

    def __init__(self, env, skip):
        self.env, self.skip = env, skip
        self.ale = env.unwrapped.ale
        self.action_set = env.unwrapped._action_set
        self._a = np.zeros((210, 160, 3), np.uint8)
        self._b = np.zeros((210, 160, 3), np.uint8)

    def __getattr__(self, name):  # action_space, unwrapped, close, ...
        return getattr(self.env, name)

    def reset(self, seed=None):
        obs, info = self.env.reset(seed=seed)
        return obs, info

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
    import gymnasium as gym
    env_id = resolve_game(game)
    env = MaxPoolSkip(gym.make(env_id, frameskip=1, repeat_action_probability=sticky), frameskip)
    env.game = env_id
    env.action_meanings = env.unwrapped.get_action_meanings()
    if seed is not None:
        env.reset(seed=int(seed))
    return env


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


class TrackerPolicy:
    """A scripted player that follows the ball using the emulator RAM (Pong, Breakout).

    It plays the role the seeds give a trained DQN agent: it reaches rallies and broken
    bricks that random play never sees. RAM offsets were checked against the pixels
    (tests/test_collect.py). `eps` random actions keep it from being perfectly predictable."""

    GAMES = ("ALE/Pong-v5", "ALE/Breakout-v5")

    def __init__(self, game, meanings, rng, eps=0.05):
        self.game, self.rng, self.eps = game, rng, eps
        self.idx = {m: i for i, m in enumerate(meanings)}

    def __call__(self, env, obs=None):
        ram = env.ale.getRAM()
        if self.rng.random() < self.eps:
            return int(self.rng.integers(len(self.idx)))
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
        self.left -= 1
        return self.cur(env, obs)


def make_policy(name, env, rng, mix_weights=(0.5, 0.3, 0.2), warn=True):
    """random | sticky | tracker | mix. A tracker asked for a game without one falls back to
    sticky, with a warning; mix then drops its tracker share."""
    n = env.action_space.n
    has_tracker = env.game in TrackerPolicy.GAMES
    if name == "random":
        return RandomPolicy(n, rng)
    if name == "sticky":
        return StickyPolicy(n, rng)
    if name == "tracker":
        if has_tracker:
            return TrackerPolicy(env.game, env.action_meanings, rng)
        if warn:
            print(f"warning: no tracker for {env.game} (only Pong, Breakout); using sticky", file=sys.stderr)
        return StickyPolicy(n, rng)
    if name == "mix":
        w_track, w_sticky, w_rand = mix_weights
        if not has_tracker:
            if warn and w_track > 0:
                print(f"warning: no tracker for {env.game}; mix uses sticky and random only", file=sys.stderr)
            w_track = 0.0
        parts = [TrackerPolicy(env.game, env.action_meanings, rng) if has_tracker else None,
                 StickyPolicy(n, rng), RandomPolicy(n, rng)]
        keep = [(p, w) for p, w in zip(parts, (w_track, w_sticky, w_rand)) if w > 0 and p is not None]
        if not keep:
            raise KitError("--mix weights must have at least one positive entry")
        return MixPolicy([p for p, _ in keep], [w for _, w in keep], rng)
    raise KitError(f"unknown policy '{name}' (random, sticky, tracker, mix)")


def pygame_keys():
    """pygame key code -> name in KEYS (arrows, space for FIRE). Imported lazily: headless
    scripts never load pygame."""
    import pygame
    return {pygame.K_UP: "UP", pygame.K_DOWN: "DOWN", pygame.K_LEFT: "LEFT",
            pygame.K_RIGHT: "RIGHT", pygame.K_SPACE: "FIRE"}


# -----------------------------------------------------------------------------
# frame spaces: data is stored raw (210x160x3); each model preprocesses at training time

FRAME_SPACES = {  # name -> (H, W, C)
    "rgb84x64": (84, 64, 3),   # aspect-true RGB (seed 003)
    "gray84x84": (84, 84, 1),  # seed 000
    "gray64x64": (64, 64, 1),  # seed 004
}


def frame_shape(space):
    if space not in FRAME_SPACES:
        raise KitError(f"unknown frame space '{space}' ({', '.join(FRAME_SPACES)})")
    return FRAME_SPACES[space]


@torch.no_grad()
def preprocess(frames, space, chunk=512):
    """(N, 210, 160, 3) uint8 (numpy or torch) -> (N, C, H, W) uint8 torch, on the CPU.

    Area resampling: the average over each output pixel's footprint. Pong's ball is 2 raw
    pixels wide; nearest sampling at 64 columns (every 2.5 px) can drop it and an
    antialiased bilinear resize smears it, while area keeps it as a 40-80% blob."""
    H, W, C = frame_shape(space)
    frames = torch.as_tensor(np.asarray(frames))
    single = frames.dim() == 3
    if single:
        frames = frames[None]
    out = torch.empty((len(frames), C, H, W), dtype=torch.uint8)
    lum = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    for i in range(0, len(frames), chunk):
        x = frames[i:i + chunk].permute(0, 3, 1, 2).float()
        if C == 1:
            x = (x * lum).sum(1, keepdim=True)
        x = F.interpolate(x, size=(H, W), mode="area")
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


# -----------------------------------------------------------------------------
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
    _atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


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
    name and the seed, so adding episodes never moves an existing one across."""
    key = lambda f: hashlib.sha1(f"{seed}:{os.path.basename(f)}".encode()).hexdigest()
    ranked = sorted(files, key=key)
    n_val = 0 if len(files) < 2 else max(1, round(val_frac * len(files)))
    val = set(ranked[:n_val])
    return [f for f in files if f not in val], [f for f in files if f in val]


def load_dataset(folder, space, val_frac=0.1, seed=0, skip_bad=False, game=None, progress=True):
    """Episodes of `folder`, preprocessed to `space`: (train, val), each a list of dicts with
    frames (N+1, C, H, W) uint8 torch, actions (N,) int64 torch, and the file name.
    A corrupt file stops with its name unless skip_bad; a game other than `game` stops."""
    from tqdm import tqdm
    files = episode_files(folder)
    train_f, val_f = split_episodes(files, val_frac, seed)
    eps, meta = {}, None
    for f in tqdm(files, desc=f"load {folder}", unit="ep", disable=not progress, leave=False):
        try:
            ep = load_episode(f)
            if game is not None and str(ep.get("game", game)) != game:
                raise KitError(f"{f} is {ep['game']}, the model was trained on {game}")
        except KitError as e:
            if not skip_bad:
                raise KitError(f"{e} (use --skip-bad to go on without it)") from None
            print(f"warning: skipping {e}", file=sys.stderr)
            continue
        if len(ep["actions"]) == 0:
            continue
        meta = meta or {"game": str(ep["game"]), "action_meanings": [str(m) for m in ep["action_meanings"]]}
        if str(ep["game"]) != meta["game"]:
            raise KitError(f"{f} is {ep['game']} but {folder} also holds {meta['game']}: one game per folder")
        eps[f] = {"frames": preprocess(ep["frames"], space), "actions": torch.as_tensor(ep["actions"]),
                  "rewards": torch.as_tensor(ep["rewards"]), "file": os.path.basename(f)}
    if not eps:
        raise KitError(f"no usable episodes in {folder}")
    train, val = [eps[f] for f in train_f if f in eps], [eps[f] for f in val_f if f in eps]
    if not train:
        train, val = val, []
    return train, val, meta


# -----------------------------------------------------------------------------
# checkpoints: self-describing dicts (kind, model args, frame space, game, actions, step,
# flags, weights); written atomically, read with weights_only=True

def save_checkpoint(path, ckpt):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path, kinds=None):
    """Load a kit checkpoint; `kinds` is the tuple of kinds the caller accepts."""
    if not os.path.isfile(path):
        raise KitError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KitError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise KitError(f"{path} is not a checkpoint written by this kit")
    if kinds and ckpt["kind"] not in kinds:
        raise KitError(f"{path} is a '{ckpt['kind']}' checkpoint; expected {' or '.join(kinds)}")
    return ckpt
