"""bench.py -- the kit's speed and quality numbers, as reported in the README.

  python bench.py collect                     # collection rate per policy vs the raw emulator
  python bench.py world                       # open-loop fidelity + wm.step speed of checkpoints/pong/world.pt
  python bench.py dream                       # closed loop: a player inside the dream and in the real game
  python bench.py dream --world checkpoints/breakout/world.pt --steps 1000 --seeds 3
  python bench.py envs                        # DreamEnv and DreamVecEnv steps per second
  python bench.py train --data data/pong_1m   # train_vqvae.py streaming a dataset: speed, memory, torchrun
  python bench.py all

world: open loop from 4 real frames with the true actions on validation episodes. Decoded
PSNR next to the copy-last-frame baseline at 1/5/10/30 steps; on Pong, where the ball is lost
(the tokenizer's round trip, then 1, 5, 10 and 30 dream steps: the share of frames whose
dreamed ball is within 8 raw pixels of the real one) and the player's paddle error (raw
pixels of the 210x160 frame) at 10 and 30 steps. With reward/end heads: precision and recall
of the reward events (and game overs) at 1 step from real history and in 10-step rollouts.

train: train_vqvae.py as a user runs it on --data (default flags, --steps, 800 unless given):
steps per second, the peak resident memory of the process and its data workers (the token
cache written at the end included), and the validation PSNR at every evaluation; then the
same run as `torchrun --nproc_per_node 2` with the same global batch, whose PSNR curve should
match within noise. It runs over links to the episodes, so --data's own caches stay as they are.

envs: the dream as an environment: DreamEnv steps per second on one thread, and DreamVecEnv
frames per second over N dreams (pixels, and tokens, which skip the decoder) on every core.

dream: closed loop. A player that reads only the frames it is shown (never the RAM) plays
--steps steps in the real game, and --steps steps inside the dream started from the same
real frames, from a fresh reset and from mid-rally, over --seeds seeds; nothing real reaches
the dream after its start. It prints how often a ball is on screen, serves, balls vanishing
in mid-field (and of them, those gone within 2 frames of appearing and those back within 2
frames, the blinks), frames with two balls or a smear, impossible jumps, points (Breakout:
bricks), how well the paddle follows the keys,
and (Pong) the steps from a point to the next serve, how the opponent follows the ball and how
often the score changes; then, one step from the real game's frames wherever its ball is in
mid-field, how often the dream's next frame keeps a ball (what the vanish rate comes from), and
whether the lost draws pile up on a few states; and writes assets/<game>_long_dream.gif.
"""
import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import common

p = common.flags(__doc__)
p.add_argument("what", nargs="?", default="all", choices=["collect", "world", "dream", "envs", "train", "all"],
               help="which benchmark")
p.add_argument("--game", default="Pong", help="collect: game")
p.add_argument("--steps", type=common.positive_int, default=None,
               help="collect: transitions per policy (10000); dream: steps of each run (600); "
                    "train: optimizer steps (800)")
p.add_argument("--temperature", type=common.nonneg_float, default=common.TEMPERATURE,
               help="world, dream: the dream's sampling temperature (0: argmax)")
p.add_argument("--seeds", type=common.positive_int, default=2,
               help="dream: runs per start (env and player seeds 0..N-1)")
p.add_argument("--gif", default=None,
               help="dream: where the long-dream GIF goes (default: assets/<game>_long_dream.gif)")
p.add_argument("--world", default="checkpoints/pong/world.pt", help="world: checkpoint")
p.add_argument("--data", default="data/pong", help="world: dataset (its validation episodes are used); train: dataset")
p.add_argument("--windows", type=common.positive_int, default=64, help="world: open-loop windows of 30 steps")
p.add_argument("--before", type=common.nonneg_int, default=32,
               help="world: also dream each window with the N real frames before it in the world's memory, as a "
                    "dream that had run through them would have them (0: not; worlds without a memory: not)")
p.add_argument("--device", default="cpu", help="world, dream, envs: the device the world model runs on (cuda|mps|cpu)")
p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="world: also time torch.compile")
p.add_argument("--threads", type=common.positive_int, default=1,
               help="world: torch threads (play.py's default: a batch-1 step barely splits)")
p.add_argument("--envs", type=lambda t: [common.positive_int(x) for x in t.split(",")], default=[1, 4, 16, 64, 256],
               help="envs: numbers of dreams DreamVecEnv is timed at, comma-separated")
p.add_argument("--speed-steps", type=common.positive_int, default=300,
               help="world, envs: steps timed for the speed tests (DreamVecEnv: 8x as many frames for each N)")


# -----------------------------------------------------------------------------

def bench_collect(args):
    import gymnasium as gym  # common has registered the ALE games
    env = gym.make(common.resolve_game(args.game), repeat_action_probability=0.0)
    env.reset(seed=0)
    env.action_space.seed(0)
    t = time.perf_counter()
    steps = args.steps or 10000
    for _ in range(steps):
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            env.reset()
    raw = steps / (time.perf_counter() - t)
    print(f"raw emulator (gym.make, random actions, no recording): {raw:.0f} steps/s")
    env = common.make_env(args.game, seed=0)  # + the max of the last two frames (a second screen grab)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for _ in range(steps):
        _, _, term, trunc, _ = env.step(int(rng.integers(env.action_space.n)))
        if term or trunc:
            env.reset()
    kit = steps / (time.perf_counter() - t)
    print(f"kit env (common.make_env: max-pooled frames, no recording): {kit:.0f} steps/s, {kit / raw:.0%} of raw")
    # ale-py's own vector env (C++ threads), the alternative to collect.py's processes, on the same frames
    from ale_py.vector_env import AtariVectorEnv
    n, rom = os.cpu_count(), re.sub(r"(?<!^)(?=[A-Z])", "_", common.resolve_game(args.game)[4:-3]).lower()
    env = AtariVectorEnv(rom, n, img_height=210, img_width=160, grayscale=False, stack_num=1, frameskip=4,
                         maxpool=True, noop_max=0, reward_clipping=False, use_fire_reset=False)
    env.reset(seed=0)
    t = time.perf_counter()
    for _ in range(steps // n):
        env.step(rng.integers(env.single_action_space.n, size=n))
    print(f"ale_py AtariVectorEnv, {n} emulators (210x160 RGB, max-pooled, no recording): "
          f"{steps // n * n / (time.perf_counter() - t):.0f} steps/s")
    env.close()
    print("| policy | steps/s (recorded to disk) | share of raw |\n|---|---|---|")
    for policy, envs in (("random", 1), ("sticky", 1), ("tracker", 1), ("mix", 1), ("mix", os.cpu_count())):
        out = tempfile.mkdtemp()
        try:
            r = subprocess.run([sys.executable, "collect.py", "--game", args.game, "--policy", policy, "--steps",
                                str(steps), "--out", out, "--envs", str(envs)], capture_output=True, text=True,
                               check=True)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        rate = float(r.stdout.strip().split()[-2].lstrip("("))
        print(f"| {policy}{f', --envs {envs}' if envs > 1 else ''} | {rate:.0f} | {rate / raw:.0%} |")


# -----------------------------------------------------------------------------

def bench_world(args):
    torch.set_num_threads(args.threads)
    ck = common.load_checkpoint(args.world, ("world",))
    files = common.episode_files(args.data)
    _, val = common.split_episodes(files, ck["args"].get("val_frac", 0.1), ck["args"].get("seed", 0))
    eps = [common.load_episode(f, keys=["frames", "actions", "rewards", "terminated", "game"]) for f in val]
    # the data's game: a model of several games dreams that one; a one-game model of another game refuses
    wm = common.load_world(args.world, args.device, args.temperature, str(eps[0]["game"]) if eps else None)
    T, H, lengths = wm.context, max(common.HORIZONS), [len(ep["frames"]) for ep in eps]
    B = max(0, min(args.before if getattr(wm, "memory", 0) else 0, max(lengths, default=0) - T - H))
    pool = common.windows(lengths, B + T + H)  # the same windows with the frames before and without
    rng = np.random.default_rng(0)
    picks = pool[np.sort(rng.choice(len(pool), min(args.windows, len(pool)), replace=False))]
    seen = torch.stack([common.preprocess(eps[i]["frames"][s:s + B + T + H], wm.space) for i, s in picks])
    frames = seen[:, B:]
    actions = torch.stack([torch.as_tensor(eps[i]["actions"][s + B + T - 1:s + B + T - 1 + H]) for i, s in picks])
    m = common.open_loop(wm, frames, actions)
    print(f"world {args.world} ({ck['step']} steps), {len(picks)} validation windows from {len(val)} episodes "
          f"of {args.data}")
    print("| horizon | dream PSNR (dB) | copy-last PSNR (dB) |\n|---|---|---|")
    for h in common.HORIZONS:
        print(f"| {h} | {m[f'psnr@{h}']:.2f} | {m[f'copy_psnr@{h}']:.2f} |")
    if wm.game == "ALE/Pong-v5":
        recon = common.pong_scores(wm.reconstruct(frames[:, :T]).cpu(), frames[:, T - 1], wm.space, 0)["ball_8px@0"]
        print(f"ball within 8 px: tokenizer round trip {recon:.0%}, dream " + ", ".join(
            f"@{k} {m[f'ball_8px@{k}']:.0%}" for k in common.HORIZONS))
        for k in (10, 30):
            print(f"paddle error @{k}: mean {m[f'paddle_px@{k}']:.2f} px, median {m[f'paddle_median@{k}']:.2f} px, "
                  f"within 2 px {m[f'paddle_2px@{k}']:.0%}")
    if B:  # the memory a dream carries: how long the field has been empty, where the last ball went
        mb = common.open_loop(wm, seen, actions, before=B)
        pong = ", ball within 8 px " + ", ".join(f"@{k} {mb[f'ball_8px@{k}']:.0%}" for k in common.HORIZONS) + \
            f", paddle error @10 {mb['paddle_px@10']:.2f} px" if wm.game == "ALE/Pong-v5" else ""
        print(f"with the {B} real frames before each window in the memory: PSNR " + ", ".join(
            f"@{k} {mb[f'psnr@{k}']:.2f}" for k in common.HORIZONS) + pong)
    if wm.game == "ALE/SpaceInvaders-v5":
        recon = common.spaceinvaders_scores(wm.reconstruct(frames[:, :T]).cpu(), frames[:, T - 1], wm.space, 0)
        for what, px in common.SPACE_INVADERS_NEAR.items():
            print(f"{what} within {px} px: tokenizer round trip {recon[f'{what}_{px}px@0']:.0%}, dream " + ", ".join(
                f"@{k} {m[f'{what}_{px}px@{k}']:.0%}" for k in common.HORIZONS))
        print(f"dreamed objects where the real frame has none: tokenizer round trip {recon['invented@0']:.0%}, "
              f"dream " + ", ".join(f"@{k} {m[f'invented@{k}']:.0%}" for k in common.HORIZONS))

    if wm.heads is not None:
        o = common.outcome_scores(wm, [dict(frames=common.preprocess(ep["frames"], wm.space), **{
            k: torch.as_tensor(ep[k]) for k in ("actions", "rewards", "terminated")}) for ep in eps])
        for what in ("reward", "end"):
            print(f"{what} events, precision / recall: @1 step {o[f'{what}_precision@1']:.2f} / "
                  f"{o[f'{what}_recall@1']:.2f}, in 10-step rollouts (within 1 step) {o[f'{what}_precision@10']:.2f}"
                  f" / {o[f'{what}_recall@10']:.2f}")

    # speed: wm.step at batch 1, eager and (where it measures faster) compiled
    start = [wm.observe(f) for f in eps[0]["frames"][:T]]

    def rate(n=args.speed_steps):
        wm.reset(start)
        for a in range(20):
            wm.step(a % wm.n_actions)
        t = time.perf_counter()
        for a in range(n):
            wm.step(a % wm.n_actions)
        return n / (time.perf_counter() - t)

    eager = rate()
    print(f"wm.step batch 1 on {args.device} ({torch.get_num_threads()} threads): {eager:.0f} steps/s eager")
    if not args.compile:
        return
    try:
        wm.compile(mode="reduce-overhead" if wm.device.type == "cuda" else None)  # CUDA graphs: batch 1 is launch-bound
        t = time.perf_counter()
        wm.reset(start)
        wm.step(0)
        compiled = rate()
        print(f"  torch.compile: {compiled:.0f} steps/s (compile took {time.perf_counter() - t:.0f} s)")
    except common.KitError as e:
        print(f"  torch.compile unavailable here: {e}")
    except Exception as e:  # no C++ compiler, unsupported platform
        print(f"  torch.compile unavailable here: {type(e).__name__}")


# -----------------------------------------------------------------------------
# dream: closed loop. The player reads only the frames it is shown; the dream starts from the
# same real frames as the real game and then sees nothing real.

GONE = 4  # frames without a ball that mean it is gone (a serve follows), not hidden a frame at a paddle
KEYS = {"ALE/Pong-v5": {2: 1, 4: 1, 3: -1, 5: -1}, "ALE/Breakout-v5": {2: 1, 3: -1}}  # action -> paddle direction


def scene(game, frame, space):
    """The objects of a game with a ball and a paddle that keeps it (Pong, Breakout)."""
    return (common.pong_objects if game == "ALE/Pong-v5" else common.breakout_objects)(frame, space)


# the player's paddle: the axis the ball comes at it along, and the line (raw px) past which the
# ball is at it (Pong's paddle is at columns 140-144, Breakout's at rows 189-193)
PADDLE_LINE = {"ALE/Pong-v5": (1, 126), "ALE/Breakout-v5": (0, 177)}


def player(game, s, rng, eps=0.05):
    """Follow the ball with the paddle (Pong: rows, RIGHT moves up; Breakout: columns, FIRE
    serves); with no ball, Pong goes to mid-field. `eps` random actions keep it from repeating."""
    if rng.random() < eps:
        return int(rng.integers(6 if game == "ALE/Pong-v5" else 4))
    if game == "ALE/Pong-v5":
        d = (s["balls"][0][0] if s["balls"] else 114.0) - s["paddle"] if s["paddle"] is not None else 0.0
        return 2 if d < -4 else 3 if d > 4 else 0
    if not s["balls"]:
        return 1
    d = s["balls"][0][1] - s["paddle"] if s["paddle"] is not None else 0.0
    return 2 if d > 4 else 3 if d < -4 else 0


def play(wm, env, start, n, seed, dream):
    """n steps of the player from the `context` frames `start`: in the dream, or in env (which
    is at the state `start` ends in). -> (frames, scenes, actions)"""
    rng, frames = np.random.default_rng(seed), list(start)
    if dream:
        wm.seed(seed)
        wm.reset(start)
    scenes, actions = [scene(wm.game, frames[-1], wm.space)], []
    for _ in range(n):
        a = player(wm.game, scenes[-1], rng)
        if dream:
            frames.append(wm.step(a))
        else:
            obs, _, terminated, truncated, _ = env.step(a)
            if terminated or truncated:
                break
            frames.append(wm.observe(obs))
        scenes.append(scene(wm.game, frames[-1], wm.space))
        actions.append(a)
    return frames, scenes, actions


def starts(wm, seed, warmup=70):
    """(fresh reset, mid-rally): the first `context` frames of a seeded reset, and `context`
    frames after the player has played `warmup` + 13 * seed steps and a ball is in play; each
    with the env at that point."""
    out = []
    for rally in (False, True):
        env = common.make_env(wm.game, seed=seed)
        frames, rng = [wm.observe(env.reset(seed=seed)[0])], np.random.default_rng(seed)
        while len(frames) < wm.context or rally and (len(frames) < warmup + 13 * seed or
                                                      not scene(wm.game, frames[-1], wm.space)["balls"]):
            frames.append(wm.observe(env.step(player(wm.game, scene(wm.game, frames[-1], wm.space), rng))[0]))
        out.append((env, frames[-wm.context:]))
    return out


def midfield(game, ball):
    """Where a real ball neither leaves nor hides (raw pixels): Pong, a step or more from the
    paddles it leaves by, out of the wall rows it can hide in; Breakout, below the bricks and
    above the paddle. A ball that vanishes there is the dream's doing."""
    row, col, line = *ball[:2], PADDLE_LINE[game][1]
    return 34 <= col <= line and 44 < row < 184 if game == "ALE/Pong-v5" else 105 < row < line


def closed_loop_stats(scenes, actions, game, jump, smear):
    """Per run: the share of frames with a ball, and with the player's paddle; per 1000 steps:
    serves (a ball after 4 or more frames without one), balls vanishing in mid-field (a real
    ball leaves by an edge or hides at a paddle or in the bricks; and of those, the balls gone
    within 2 frames of appearing, drawn from nothing and taken back, and the blinks, balls back
    within 2 frames: a ball the dream still knows, drawn without it), jumps farther than
    `jump` raw pixels, points each way (Pong) or balls lost at the bottom (Breakout: a ball that
    leaves there and stays gone 4 frames; one back sooner was hidden at a paddle), brick pixels
    broken; frames with two balls or a blob bigger than `smear`; and how the paddle follows the
    keys: the correlation of the key's direction at step t with the paddle's move one step later
    (the emulator answers a key a step late); Pong: how the opponent chases the ball, the
    correlation of the side the ball is on with the opponent's next move, the median steps from
    a point to the next serve (the serve's timer), and how often the score's digits change (the
    real game: once a point; a dream may draw them over several steps, or flicker)."""
    pong, n = game == "ALE/Pong-v5", len(actions)
    m = dict(ball=0.0, paddle=0.0, serves=0, vanish=0, young=0, blinks=0, multi=0, jumps=0, player=0, opponent=0,
             bricks=0.0, scored=0)
    gap, shown, point, waits, pending = 0, 0, None, [], None
    for t, (prev, s) in enumerate(zip(scenes, scenes[1:])):
        m["ball"] += bool(s["balls"]) / n
        m["paddle"] += (s["paddle"] is not None) / n  # a paddle that moves can fade out of a dream
        if s["balls"] and gap >= GONE:
            m["serves"] += 1
            waits += [] if point is None else [t - point]
            point = None
        gap = 0 if s["balls"] else gap + 1
        if gap == 0:  # back sooner: it was hidden at a paddle, not lost
            pending = None
        elif gap == GONE and pending:  # gone for good: a point (Pong) or a ball lost (Breakout)
            m[pending[0]] += 1
            point, pending = pending[1], None
        shown = shown + 1 if prev["balls"] else 0  # frames the ball of prev has been on screen
        m["multi"] += len(s["balls"]) > 1 or any(b[2] > smear for b in s["balls"])
        if len(prev["balls"]) == len(s["balls"]) == 1:
            m["jumps"] += np.hypot(*np.subtract(prev["balls"][0][:2], s["balls"][0][:2])) > jump
        if prev["balls"] and not s["balls"]:
            row, col, _ = prev["balls"][0]
            if midfield(game, prev["balls"][0]):
                m["vanish"] += 1
                m["young"] += shown <= 2  # a ball drawn from nothing that does not go on
                m["blinks"] += any(later["balls"] for later in scenes[t + 2:t + 4])
            elif pong and (col < 34 or col > PADDLE_LINE[game][1]):
                pending = ("player" if col < 34 else "opponent", t)
            elif not pong and row >= PADDLE_LINE[game][1]:  # the bottom
                pending = ("opponent", t)
        if not pong:
            m["bricks"] += max(0.0, prev["bricks"] - s["bricks"])
        elif "score" in s:
            m["scored"] += score_changed(prev, s)
    axis = -1 if pong else 1  # Pong's paddle moves up (smaller rows) on its "up" key
    pad = [s["paddle"] for s in scenes]
    pairs = [(KEYS[game].get(a, 0), axis * (pad[t + 2] - pad[t + 1])) for t, a in enumerate(actions[:-1])
             if pad[t + 1] is not None and pad[t + 2] is not None]
    m["follow"] = correlation(pairs)
    if pong:  # the opponent is the game's own player: it moves toward the ball's row
        opp = [s["opponent"] for s in scenes]
        m["chase"] = correlation([(np.sign(s["balls"][0][0] - opp[t]), opp[t + 1] - opp[t])
                                  for t, s in enumerate(scenes[:-1])
                                  if s["balls"] and opp[t] is not None and opp[t + 1] is not None])
    m["wait"] = float(np.median(waits)) if waits else float("nan")  # Pong serves 16 steps after a point
    for key in ("serves", "vanish", "young", "blinks", "jumps", "player", "opponent", "bricks", "scored"):
        m[key] *= 1000 / max(n, 1)
    m["multi"] /= max(n, 1)
    return m


def score_changed(prev, s):
    """Whether Pong's digits changed between two scenes: the real game redraws them once a point,
    in one step, or in two where a frame (the max of two emulator frames) shows both digits."""
    return int((np.abs(s["score"] - prev["score"]) > 40).sum() > 2)


def correlation(pairs):
    k, v = np.array(pairs, float).T if pairs else (np.zeros(0), np.zeros(0))
    return float(np.corrcoef(k, v)[0, 1]) if len(k) > 2 and k.std() > 0 and v.std() > 0 else float("nan")


def redraws(wm, picks, steps, back, draws=16, chunk=256):
    """Dreams from real frames: for each pick (the `context` frames up to a state, then the real
    actions from it), `draws` dreams of `steps` steps with those actions, each with its own seed.
    -> (picks, draws) bool: back(scene) held in a frame of that dream"""
    T = wm.context
    frames = torch.stack([common.frames_tensor(np.stack(f[:T])) for f, _ in picks]).repeat_interleave(draws, 0)
    actions = torch.tensor([a[:steps] for _, a in picks]).repeat_interleave(draws, 0)
    seen = []
    for i, start in zip(range(0, len(frames), chunk), frames.split(chunk)):
        wm.reset_batch(start, seeds=range(i, i + len(start)))
        hit = np.zeros(len(start), bool)
        for k in range(steps):
            drawn = wm.step_batch(actions[i:i + chunk, k])
            hit |= [back(scene(wm.game, common.to_image(f), wm.space)) for f in drawn]
        seen += hit.tolist()
    return np.reshape(seen, (len(picks), draws))


def kept_ball(wm, runs, draws=16, most=256, chunk=256):
    """One step from real frames: at up to `most` steps of the real runs (frames, scenes,
    actions) whose ball is in mid-field and still there a step later, a dream started on the
    `context` frames up to it (as every dream starts) draws the next frame `draws` times; the
    share of the draws with a ball. 1 minus it is the chance of losing the ball in one step,
    which sets how soon a dreamed rally ends: the vanish target, 2 per 1000 steps with a ball on
    screen 78% of them, asks for under 0.26% a step (0.997 kept). Beside it, the share of the
    true next frames whose tokenizer round trip keeps the ball: the most the dream can keep.
    And where the losses are: the states that lose the ball in half their draws or more, and
    their share of all lost draws. Spread thinly over every state, the loss would be the
    sampling's (a ball split over candidate cells); piled on a few, it is the model's belief.
    -> (dream, tokenizer, states, stuck states, their share of the lost draws)"""
    T, has_ball = wm.context, lambda f: bool(scene(wm.game, common.to_image(f), wm.space)["balls"])
    picks = [(frames[i:i + T + 1], actions[i:i + 1]) for frames, scenes, actions in runs for i in range(len(actions))
             if scenes[i]["balls"] and midfield(wm.game, scenes[i]["balls"][0]) and scenes[i + 1]["balls"]]
    if not picks:
        return float("nan"), float("nan"), 0, 0, float("nan")
    picks = [picks[i] for i in np.linspace(0, len(picks) - 1, min(most, len(picks))).astype(int)]
    kept = redraws(wm, picks, 1, lambda s: bool(s["balls"]), draws, chunk)
    windows = torch.stack([common.frames_tensor(np.stack(f)) for f, _ in picks])  # T frames, then the next
    drawable = [has_ball(f) for w in windows.split(chunk) for f in wm.reconstruct(w)]
    lost = 1 - kept.mean(1)  # per state
    stuck = lost >= 0.5
    share = lost[stuck].sum() / lost.sum() if lost.sum() else float("nan")
    return float(kept.mean()), float(np.mean(drawable)), len(picks), int(stuck.sum()), float(share)


def kept_bounce(wm, runs, steps=6, draws=16, most=256, chunk=256):
    """Bounces off the player's paddle, from real frames: at the real runs' states where the ball
    has come past PADDLE_LINE toward the paddle for the last time and is back on the field's side
    within `steps` steps, dreams from the `context` frames up to it, with the real actions, `draws`
    times; the share of them that send the ball back too. A bounce the dream loses is a point
    the real game never gives (a rally it ends). -> (share, states)"""
    axis, line = PADDLE_LINE[wm.game]
    at = lambda s: s["balls"][0][axis] if s["balls"] else -np.inf  # how far toward the paddle
    back = lambda s: -np.inf < at(s) < line
    picks = [(frames[i:i + wm.context], actions[i:i + steps]) for frames, scenes, actions in runs
             for i in range(1, len(actions) - steps + 1)
             if line < at(scenes[i]) and at(scenes[i - 1]) < at(scenes[i]) and at(scenes[i + 1]) <= at(scenes[i])
             and any(map(back, scenes[i + 1:i + steps + 1]))]
    if not picks:
        return float("nan"), 0
    picks = [picks[i] for i in np.linspace(0, len(picks) - 1, min(most, len(picks))).astype(int)]
    return float(redraws(wm, picks, steps, back, draws, chunk).mean()), len(picks)


def drawn_ball(wm, runs, every=5):
    """The largest ball blob (raw pixels) in the tokenizer's round trip of real frames: how big
    the dream can draw a ball that is not smeared."""
    chw = lambda f: torch.as_tensor(f)[None] if f.ndim == 2 else torch.as_tensor(f).permute(2, 0, 1)
    windows = torch.stack([torch.stack([chw(f) for f in frames[t - wm.context + 1:t + 1]])
                           for frames in runs for t in range(wm.context - 1, len(frames), every)])
    drawn = torch.cat([wm.reconstruct(w).cpu() for w in windows.split(256)])
    balls = (b for f in drawn for b in scene(wm.game, common.to_image(f), wm.space)["balls"])
    return max((b[2] for b in balls), default=60.0)


def long_dream_gif(real, dream, path):
    """real | dream, side by side, one frame per step at the model's size (the README shows it
    enlarged): the README's headline picture. One palette for all frames, so that the GIF
    stores only what changes from frame to frame (600 steps: under 1 MB, not 6). Pillow, which
    imageio writes GIFs with, folds a frame identical to the one before into its duration."""
    from PIL import Image
    real, dream = [common.to_image(f) for f in real], [common.to_image(f) for f in dream]
    line = np.full((real[0].shape[0], 2, 3), 255, np.uint8)
    frames = [np.concatenate([r, line, d], 1) for r, d in zip(real, dream)]
    palette = Image.fromarray(np.concatenate(frames[::max(1, len(frames) // 16)])).quantize(64)
    gif = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
    gif[0].save(path, save_all=True, append_images=gif[1:], duration=round(1000 / 15), loop=0)


def bench_dream(args):
    torch.set_num_threads(args.threads)
    wm = common.load_world(args.world, device=args.device, temperature=args.temperature)
    if wm.game not in KEYS:
        raise common.KitError(f"bench.py dream has a frame-reading player for Pong and Breakout only, not {wm.game}")
    n, runs = args.steps or 600, {}
    for seed in range(args.seeds):
        for start, (env, frames) in zip(("reset", "rally"), starts(wm, seed)):
            for dream in (False, True):
                runs[start, seed, dream] = play(wm, env, frames, n, seed, dream)
            env.close()
    # the real ball's largest step, and its largest blob as the tokenizer draws it, are what "impossible" means
    real = [runs[k][1] for k in runs if not k[2]]
    steps = [np.hypot(*np.subtract(a["balls"][0][:2], b["balls"][0][:2])) for sc in real for a, b in zip(sc, sc[1:])
             if len(a["balls"]) == len(b["balls"]) == 1]
    jump, smear = max(steps, default=12.0) + 4, 1.25 * drawn_ball(wm, [runs[k][0] for k in runs if not k[2]])
    stats = {k: closed_loop_stats(v[1], v[2], wm.game, jump, smear) for k, v in runs.items()}
    mean = lambda key, start, dream: np.nanmean([stats[start, s, dream][key] for s in range(args.seeds)])
    print(f"closed loop, {args.world} at temperature {wm.temperature:g}: {n} steps from each of {args.seeds} "
          f"fresh resets and {args.seeds} rallies (jump: over {jump:.0f} raw px; smear: over {smear:.0f} raw px^2)")
    print("| | start | real game | dream |\n|---|---|---|---|")
    rows = [("share of frames with a ball", "ball", "{:.2f}"),
            ("share of frames with the player's paddle", "paddle", "{:.2f}"),
            ("serves per 1000 steps", "serves", "{:.1f}"),
            ("ball vanishing in mid-field per 1000 steps", "vanish", "{:.1f}"),
            ("of them, within 2 frames of appearing", "young", "{:.1f}"),
            ("of them, back within 2 frames (a blink)", "blinks", "{:.1f}"),
            ("frames with two balls or a smear", "multi", "{:.1%}"),
            ("impossible jumps per 1000 steps", "jumps", "{:.1f}"),
            ("paddle follows the keys (correlation)", "follow", "{:.2f}")]
    if wm.game == "ALE/Pong-v5":
        rows += [("steps from a point to the next serve (median)", "wait", "{:.1f}"),
                 ("the opponent follows the ball (correlation)", "chase", "{:.2f}"),
                 ("points per 1000 steps: player", "player", "{:.1f}"),
                 ("points per 1000 steps: opponent", "opponent", "{:.1f}"),
                 ("the score changes per 1000 steps", "scored", "{:.1f}")]
    else:
        rows += [("balls lost per 1000 steps", "opponent", "{:.1f}"),
                 ("brick pixels broken per 1000 steps", "bricks", "{:.0f}")]
    for label, key, fmt in rows:
        for start in ("reset", "rally"):
            print(f"| {label} | {start} | {fmt.format(mean(key, start, False))} | "
                  f"{fmt.format(mean(key, start, True))} |")
    kept, drawable, n_states, stuck, share = kept_ball(wm, [runs[k] for k in runs if not k[2]])
    print(f"one step from real frames with a ball in mid-field ({n_states} of them, 16 draws each): "
          f"draws that keep the ball {kept:.3f}; the tokenizer's round trip of the true next frame {drawable:.3f}; "
          f"{stuck} of the states lose it in half their draws or more, {share:.0%} of the lost draws")
    bounced, n_states = kept_bounce(wm, [runs[k] for k in runs if not k[2]])
    print(f"bounces off the player's paddle from real frames ({n_states} of them, 16 draws each): "
          f"dreams that send the ball back within 6 steps too {bounced:.3f}")
    name = wm.game[4:-3].lower()
    gif = args.gif or os.path.join("assets", f"{name}_long_dream.gif")
    long_dream_gif(runs["reset", 0, False][0][wm.context:], runs["reset", 0, True][0][wm.context:], gif)
    print(f"wrote {gif}: real | dream, {n} steps from a fresh reset (seed 0)")


# -----------------------------------------------------------------------------
# the dream as an environment: how fast a program can act in it

def bench_envs(args):
    torch.set_num_threads(1)  # one dream at a time: one thread (a batch-1 step barely splits)
    env = common.DreamEnv(args.world, temperature=args.temperature, device=args.device)
    env.reset(seed=0)
    rate = fastest(lambda i: env.step(i % env.action_space.n), args.speed_steps)
    print(f"DreamEnv {args.world} on {args.device}: {rate:.0f} steps/s (1 thread, temperature {args.temperature:g})")
    torch.set_num_threads(os.cpu_count())
    print(f"DreamVecEnv on {args.device}, frames per second over all dreams ({os.cpu_count()} threads):")
    print("| N | pixels | tokens |\n|---|---|---|")
    for N in args.envs:
        rates = []
        for obs in ("frames", "tokens"):
            vec = common.DreamVecEnv(env.world, num_envs=N, obs=obs)
            vec.reset(seed=0)
            rates.append(N * fastest(lambda i: vec.step(np.full(N, i % vec.single_action_space.n)),
                                     max(3, 8 * args.speed_steps // N)))
        print(f"| {N} | {rates[0]:.0f} | {rates[1]:.0f} |")


def fastest(step, n):
    """Calls per second of step(i), n calls timed in 3 parts: the fastest part's rate, which a
    machine shared with other work (a cloud VM, a busy laptop) still reproduces."""
    rates = []
    for part in np.array_split(np.arange(n), 3):
        t = time.perf_counter()
        for i in part:
            step(int(i))
        rates.append(len(part) / max(time.perf_counter() - t, 1e-9))
    return max(rates)


# -----------------------------------------------------------------------------

def tree_memory(pid):
    """Proportional set size (bytes) of a process and all its descendants: resident memory with
    the pages forked workers share counted once (Linux /proc; 0 elsewhere)."""
    parent = {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{d}/stat") as f:
                parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, grew = {pid}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in tree} - tree
        tree, grew = tree | more, bool(more)
    total = 0
    for p in tree:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total


def bench_train(args):
    steps = args.steps or 800
    links = tempfile.mkdtemp()
    try:
        for f in common.episode_files(args.data):
            os.symlink(os.path.abspath(f), os.path.join(links, os.path.basename(f)))
        print(f"train_vqvae.py on {args.data} ({len(os.listdir(links))} episodes), {steps} steps, default flags")
        print("| run | steps/s | peak memory | val PSNR at each evaluation |\n|---|---|---|---|")
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        for name, launch, cache in (("one process", [sys.executable], "--cache"),
                                    ("torchrun, 2 processes", torchrun, "--no-cache")):
            proc = subprocess.Popen(launch + ["train_vqvae.py", "--data", links, "--steps", str(steps), cache,
                                              "--out", os.path.join(links, "vq.pt"), "--assets", links],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            peak = 0
            while proc.poll() is None:
                peak = max(peak, tree_memory(proc.pid))
                time.sleep(0.2)
            out = proc.stdout.read()
            if proc.returncode:
                raise common.KitError(f"train_vqvae.py ({name}) failed with exit code {proc.returncode}")
            psnr = [line.split("val PSNR ")[1].split()[0] for line in out.splitlines() if line.startswith("step ")]
            rate = out.rsplit(" steps/s)", 1)[0].rsplit("(", 1)[1]
            print(f"| {name} | {rate} | {peak / 2 ** 30:.2f} GB | {' '.join(psnr)} |")
    finally:
        shutil.rmtree(links, ignore_errors=True)


def main():
    args = p.parse_args()
    args.device = str(common.pick_device(args.device))  # one line, not a traceback, for a device this machine lacks
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    if args.what in ("collect", "all"):
        bench_collect(args)
    if args.what in ("world", "all"):
        bench_world(args)
    if args.what in ("dream", "all"):
        bench_dream(args)
    if args.what in ("envs", "all"):
        bench_envs(args)
    if args.what in ("train", "all"):
        bench_train(args)


if __name__ == "__main__":
    common.run(main)
