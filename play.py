"""play.py -- play the game inside the world model: keyboard in, dreamed frames out, in real time.

The dream runs beside a shadow, the real emulator fed the same actions from the same start, so
you see how long the dream stays with the game. The window shows real | dream | overlay (real
in green, dream in red, both in yellow) and the dream's error against the real frame, both in
the model's frame space (the real frame goes through wm.observe, as the training data did).

Examples:
  python play.py                                          # checkpoints/pong/world.pt at 15 FPS
  python play.py --world checkpoints/breakout/world.pt --scale 8 --record play.gif
  python play.py --world checkpoints/pong+breakout+spaceinvaders/world.pt --game Breakout   # one game of a joint model
  python play.py --policy tracker                         # watch the RAM tracker play in the dream
  python play.py --gif assets/dream.gif --steps 200 --policy tracker      # headless real | dream GIF
  python play.py --gif assets/dream.gif --steps 200 --actions 2,2,3,3,0   # the list repeats
  python play.py --benchmark 300                          # FPS of the play loop, no window
  python play.py --world checkpoints/breakout/lam.pt --latent-actions     # keys 0-9 fire latent actions
  python play.py --world checkpoints/breakout/lam.pt --latent-actions --gif latent.gif --actions 1,1,2,2

Keys: arrows and space, mapped through the game's action meanings (the window lists them; no
key is NOOP). P pauses, R restarts from a fresh env reset, S syncs the dream to the real game,
Q or Esc quits. With --latent-actions (a model from train_latent_action.py) the number keys 0-9
fire latent actions directly, with no shadow: see what each one learned. Uses only the
world-model contract of common.py (load_world: context, observe, reset, step), so it plays
every world model the kit trains.
"""
import argparse
import collections
import itertools
import os
import tempfile
import time

import imageio.v2 as imageio
import numpy as np
import torch

import common

# -----------------------------------------------------------------------------
# flags

p = common.flags(__doc__)
p.add_argument("--world", default="checkpoints/pong/world.pt", help="world-model checkpoint from train_world.py")
p.add_argument("--game", default=None,
               help="a model of several games (train_world.py --data A B ...): the one to dream; None: its first")
p.add_argument("--seed", type=int, default=0,
               help="seed of the start (env reset) and of the dream's draws; R restarts with seed+1, seed+2, ...")
p.add_argument("--temperature", type=common.nonneg_float, default=common.TEMPERATURE,
               help="how the dream draws its next frame: 0 the most likely one, higher more varied")
p.add_argument("--warmup", type=common.nonneg_int, default=None,
               help="NOOP steps before the dream starts, at least context - 1 (for context real frames); "
                    "None: that minimum")
p.add_argument("--shadow", action=argparse.BooleanOptionalAction, default=True,
               help="run the real emulator beside the dream with the same actions")
p.add_argument("--fps", type=common.positive_float, default=15,
               help="frames per second of the window and of GIFs (the data's rate)")
p.add_argument("--scale", type=common.positive_int, default=None,
               help="screen pixels per model pixel; None: 6 in the window, 3 in GIFs")
p.add_argument("--record", default=None,
               help="window: also save what is shown, at scale 3 (.gif; .mp4 needs imageio[ffmpeg])")
who = p.add_mutually_exclusive_group()
who.add_argument("--actions", default=None,
                 help="play these action indices instead of the keyboard, repeated: 2,2,3,3,0")
who.add_argument("--policy", default=None, type=common.policy_flag("random", "sticky", "tracker"),
                 help="random | sticky | tracker | agent:PATH plays instead of the keyboard (the tracker reads the "
                      "shadow's RAM; a train_agent.py agent watches the dream); None: tracker when headless")
mode = p.add_mutually_exclusive_group()
mode.add_argument("--gif", default=None, help="headless: write a real | dream GIF of --steps frames here, no window")
mode.add_argument("--benchmark", type=common.positive_int, default=None, metavar="N",
                  help="headless: run the play loop N frames with no FPS cap and print the time per part")
p.add_argument("--steps", type=common.positive_int, default=200,
               help="--gif: frames, one per dream step (the start frame is not included)")
p.add_argument("--threads", type=common.positive_int, default=1,
               help="torch threads; a batch-1 step barely splits, and a 2nd thread stalls when the other core is busy")
p.add_argument("--device", default=None, help="cuda | mps | cpu; None: the best available")
p.add_argument("--latent-actions", action="store_true",
               help="latent-action model: number keys (or --actions) fire latent actions, no key is NOOP "
                    "through the map; no shadow")
p.add_argument("--compile", action="store_true",
               help="torch.compile the model: ~10%% faster steps on a CPU after ~35 s of compiling (bench.py)")

common.renamed(p, "--latent", "--latent-actions", nargs=0, const=True)

NOOP = 0  # every ALE minimal action set starts with NOOP
GIF_SCALE = 3

# -----------------------------------------------------------------------------
# the session: a dream and its shadow, advanced one frame at a time

class Session:
    """The dream and its shadow (the real emulator: same start, same actions). `update(events)`
    is one frame of the window, so the tests drive it with posted pygame events and a stub world."""

    def __init__(self, wm, env, args, policy=None):
        self.wm, self.env, self.args, self.policy = wm, env, args, policy
        self.warmup = wm.context - 1 if args.warmup is None else args.warmup
        self.held, self.paused, self.running, self.restarts = set(), False, True, 0
        self.latent_action = None  # --latent-actions: the one whose number key is held
        self.ms = dict(model=0.0, env=0.0, draw=0.0)     # smoothed, for the HUD
        self.total = dict(model=0.0, env=0.0, draw=0.0)  # seconds, for --benchmark
        self.fps, self.err, self.mse = 0.0, 0.0, 0.0
        self.restart()

    def restart(self):
        """Fresh real frames: env reset, `warmup` NOOPs, and the dream starts from the last `context`."""
        obs, _ = self.env.reset(seed=self.args.seed + self.restarts)
        self.restarts += 1
        self.paused = self.paused and not getattr(self, "over", False)  # R after a game over plays on
        getattr(self.policy, "reset", lambda: None)()  # an agent's frame stack starts afresh
        self.score = {"dream": [0, 0], "real": [0, 0]}  # points for the player, for the other side
        self.over = False  # the heads drew a game over: the dream waits for R
        frames = [self.wm.observe(obs)]
        for _ in range(self.warmup):
            obs = self.env.step(NOOP)[0]
            frames.append(self.wm.observe(obs))
        self.obs, self.t = obs, 0
        self.history = collections.deque(frames[-self.wm.context:], maxlen=self.wm.context)
        self.sync()

    def sync(self):
        """Re-start the dream from the last `context` real frames: the drift so far is forgiven."""
        if hasattr(self.wm, "seed"):  # a world beyond the contract's four: its draws are reproducible too
            self.wm.seed(self.args.seed + self.restarts)
        self.wm.reset(list(self.history))
        self.real = self.dream = self.history[-1]
        self.err = self.mse = 0.0

    def act(self):
        if isinstance(self.policy, common.AgentPolicy):  # it plays what it sees: the dream
            return self.policy.act(self.dream)
        if self.policy is not None:
            return self.policy(self.env, self.obs)
        if self.args.latent_actions:
            return self.latent_action
        return common.action_for_keys(self.held, self.wm.action_meanings)

    def step(self, action):
        t0 = time.perf_counter()
        if self.args.latent_actions:  # None: the real NOOP through the map (latent action 0 without a map)
            mapped = action is None and self.wm.mapped
            self.dream = self.wm.step(NOOP) if mapped else self.wm.step_latent_action(action or 0)
        else:
            self.dream = self.wm.step(action)
        t1 = time.perf_counter()
        self.count("dream", getattr(self.wm, "reward", 0.0))  # a world beyond the contract's four draws the reward
        self.over = getattr(self.wm, "terminated", False)
        self.paused = self.paused or self.over
        over = False
        if self.args.shadow:
            self.obs, reward, terminated, truncated, _ = self.env.step(action)
            self.count("real", reward)
            self.real = self.wm.observe(self.obs)
            self.history.append(self.real)
            d = self.dream.astype(np.float32) - self.real
            self.err, self.mse = float(np.abs(d).mean()), float((d * d).mean())
            over = terminated or truncated
        self.t += 1
        self.tick("model", t1 - t0)
        self.tick("env", time.perf_counter() - t1)
        if over:
            self.restart()  # the real game ended: start both again rather than dream past it

    def count(self, who, reward):
        if reward:
            self.score[who][reward < 0] += 1

    def tick(self, part, seconds):
        self.ms[part] += 0.1 * (1000 * seconds - self.ms[part])
        self.total[part] += seconds

    def update(self, events):
        """One frame of the window: apply the pygame events, then step unless paused. Held keys are
        tracked from KEYDOWN/KEYUP (as collect.HumanPolicy), so posted events drive it like a keyboard."""
        import pygame as pg
        keys = common.pygame_keys()
        for e in events:
            if e.type == pg.QUIT or (e.type == pg.KEYDOWN and e.key in (pg.K_q, pg.K_ESCAPE)):
                self.running = False
                return
            if e.type == pg.KEYDOWN and e.key == pg.K_p:
                self.paused = not self.paused
            elif e.type == pg.KEYDOWN and e.key == pg.K_r:
                self.restart()
            elif e.type == pg.KEYDOWN and e.key == pg.K_s:
                self.sync()
            elif self.args.latent_actions and e.type in (pg.KEYDOWN, pg.KEYUP) and pg.K_0 <= e.key <= pg.K_9:
                i = e.key - pg.K_0
                if e.type == pg.KEYDOWN and i < self.wm.n_latent_actions:
                    self.latent_action = i
                elif e.type == pg.KEYUP and i == self.latent_action:
                    self.latent_action = None
            elif e.type in (pg.KEYDOWN, pg.KEYUP) and e.key in keys:
                (self.held.add if e.type == pg.KEYDOWN else self.held.discard)(keys[e.key])
        if not self.paused:
            self.step(self.act())


# -----------------------------------------------------------------------------
# drawing: one numpy image at the model's resolution, scaled up once; text from a 3x5 bitmap
# font, so that the headless GIF never touches pygame

FONT = {  # 15 bits per glyph: 5 rows of 3, top row first, left pixel highest
    "0": 0x7B6F, "1": 0x2C97, "2": 0x73E7, "3": 0x72CF, "4": 0x5BC9, "5": 0x79CF, "6": 0x79EF,
    "7": 0x7252, "8": 0x7BEF, "9": 0x7BCF, "A": 0x2BED, "B": 0x6BAE, "C": 0x3923, "D": 0x6B6E,
    "E": 0x79A7, "F": 0x79A4, "G": 0x396B, "H": 0x5BED, "I": 0x7497, "J": 0x126A, "K": 0x5BAD,
    "L": 0x4927, "M": 0x5FED, "N": 0x6B6D, "O": 0x2B6A, "P": 0x6BA4, "Q": 0x2B73, "R": 0x6BAD,
    "S": 0x388E, "T": 0x7492, "U": 0x5B6F, "V": 0x5B6A, "W": 0x5BFD, "X": 0x5AAD, "Y": 0x5A92,
    "Z": 0x72A7, " ": 0x0000, ":": 0x0410, ".": 0x0002, "/": 0x12A4, "-": 0x01C0, "=": 0x0E38,
}
GLYPHS = {c: np.array([[b >> (14 - 3 * r - k) & 1 for k in range(3)] + [0] for r in range(5)], bool)
          for c, b in FONT.items()}  # 5x4: the 4th column is the space between letters


def text(img, s, y, x, size):
    """Write `s` into img (H, W, 3) uint8 at (y, x) in white, `size` pixels per font pixel."""
    mask = np.concatenate([GLYPHS.get(c, GLYPHS[" "]) for c in s.upper()], 1).repeat(size, 0).repeat(size, 1)
    region = img[y:y + mask.shape[0], x:x + mask.shape[1]]
    region[mask[:region.shape[0], :region.shape[1]]] = 255


def strip(width, rows):
    """A black strip of text rows, each a list of (x, text); large letters where they fit."""
    size = 2 if all(x + 8 * len(s) <= width for row in rows for x, s in row) else 1
    line = 7 * size
    img = np.zeros((len(rows) * line + size, width, 3), np.uint8)
    for i, row in enumerate(rows):
        for x, s in row:
            text(img, s, size + i * line, x, size)
    return img


def foreground(frame):
    """Distance of each pixel from the background, taken as the frame's median grey level:
    an Atari screen is mostly one flat background with sprites on it."""
    g = frame.mean(2)
    return np.clip(np.abs(g - np.median(g)) * 4, 0, 255).astype(np.uint8)


def canvas(s, overlay=True):
    """real | dream | overlay (the dream alone without a shadow): (H, W, 3) uint8, model space."""
    dream = common.to_image(s.dream)
    if not s.args.shadow:
        return np.ascontiguousarray(dream)
    real = common.to_image(s.real)
    panels = [real, dream]
    if overlay:
        panels.append(np.stack([foreground(dream), foreground(real), np.zeros(real.shape[:2], np.uint8)], 2))
    gap = np.full((real.shape[0], 1, 3), 255, np.uint8)
    return np.concatenate([panels[0]] + [q for panel in panels[1:] for q in (gap, panel)], 1)


def labels(s, scale, overlay=True):
    """Panel names above each panel (panels are W model pixels plus a 1-pixel gap apart)."""
    names = ["REAL", "DREAM"] + ["REAL GREEN  DREAM RED  BOTH YELLOW"] * overlay if s.args.shadow else ["DREAM"]
    w = (common.to_image(s.dream).shape[1] + 1) * scale
    return [(k * w + 2, name) for k, name in enumerate(names)]


def legend(meanings):
    """What each key does in this game, e.g. Pong: 'UP=RIGHT DOWN=LEFT ... SPACE=FIRE'."""
    keys = [f"{'SPACE' if k == 'FIRE' else k}={meanings[a]}" for k in common.KEYS
            if (a := common.action_for_keys({k}, meanings)) != NOOP]
    return "  ".join(keys + ["P PAUSE  R RESTART  S SYNC  Q QUIT"])


def latent_legend(wm):
    top = min(wm.n_latent_actions, 10) - 1
    return (f"KEYS 0-{top} FIRE LATENT ACTIONS 0-{top}  NO KEY: {'NOOP' if wm.mapped else 'LATENT 0'}  "
            "P PAUSE  R RESTART  Q QUIT")


def status(s):
    """The shadow's error, and the dreamed score (the real one beside it): the window's and the GIF's."""
    if not s.args.shadow:
        return "", "SCORE {}:{}".format(*s.score["dream"])
    return (f"  ERROR {s.err:.1f}  PSNR {common.psnr(s.mse):.1f} DB",
            "SCORE {}:{}  REAL {}:{}".format(*s.score["dream"], *s.score["real"]))


def hud(s, scale):
    stats = f"STEP {s.t}  FPS {s.fps:.0f}  MODEL {s.ms['model']:.1f} MS"
    if s.args.latent_actions:
        stats += f"  LATENT {'-' if s.latent_action is None else s.latent_action}"
        return [labels(s, scale), [(2, stats + ("  PAUSED" if s.paused else ""))], [(2, latent_legend(s.wm))]]
    error, score = status(s)
    state = "  GAME OVER: R RESTARTS" if s.over else "  PAUSED" if s.paused else ""
    return [labels(s, scale), [(2, stats + error)], [(2, score + state)], [(2, legend(s.wm.action_meanings))]]


def picture(s, scale, rows, overlay=True):
    """The whole frame as one numpy image: text strip on top of the upscaled panels (GIFs)."""
    big = canvas(s, overlay).repeat(scale, 0).repeat(scale, 1)
    return np.concatenate([strip(big.shape[1], rows), big], 0)


def draw(screen, s, scale):
    """Blit the frame: the panels at model resolution, scaled by SDL (cheaper than numpy)."""
    import pygame as pg
    c = canvas(s)
    bar = strip(c.shape[1] * scale, hud(s, scale))
    screen.blit(pg.image.frombuffer(bar, bar.shape[1::-1], "RGB"), (0, 0))
    panels = pg.image.frombuffer(c, c.shape[1::-1], "RGB")
    screen.blit(pg.transform.scale(panels, (c.shape[1] * scale, c.shape[0] * scale)), (0, bar.shape[0]))


# -----------------------------------------------------------------------------
# the window (and --benchmark: the same loop without the FPS cap, on SDL's dummy driver)

def check_writable(path):
    """Fail before dreaming, not after, when the output cannot be written."""
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise common.KitError(f"cannot write {path}: {e.strerror}") from None


def open_writer(path, fps):
    """--record: frames are appended as they are shown."""
    try:
        if path.lower().endswith(".gif"):
            return imageio.get_writer(path, duration=1000 / fps, loop=0)
        return imageio.get_writer(path, fps=fps)
    except (ValueError, OSError, RuntimeError) as e:
        raise common.KitError(f"cannot record to {path}: {str(e).splitlines()[0]} "
                              "(.gif always works; .mp4 needs pip install imageio[ffmpeg])") from None


def window(wm, env, args, policy):
    """Play in a window until Q; with --benchmark, N frames as fast as possible, then the timings."""
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    if args.benchmark:
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    import pygame as pg
    s = Session(wm, env, args, policy)
    scale = args.scale or 6
    c = canvas(s)
    pg.display.init()  # the display only: no audio device, no fonts
    try:
        height = c.shape[0] * scale + strip(c.shape[1] * scale, hud(s, scale)).shape[0]
        screen = pg.display.set_mode((c.shape[1] * scale, height))
    except pg.error as e:
        pg.quit()
        raise common.KitError(f"cannot open a window ({e}); use --gif out.gif for a headless dream") from None
    pg.display.set_caption(f"play.py: {wm.game} in {args.world}")
    clock, writer, n, limit, t0 = pg.time.Clock(), None, 0, args.benchmark or float("inf"), time.perf_counter()
    try:
        writer = open_writer(args.record, args.fps) if args.record else None
        while n < limit:
            s.update(pg.event.get())
            if not s.running:
                break
            t = time.perf_counter()
            draw(screen, s, scale)
            pg.display.flip()
            s.tick("draw", time.perf_counter() - t)
            if writer:
                writer.append_data(picture(s, GIF_SCALE, hud(s, GIF_SCALE)))
            clock.tick(0 if args.benchmark else args.fps)
            s.fps, n = clock.get_fps(), n + 1
    except KeyboardInterrupt:  # Ctrl-C in the terminal quits like Q
        pass
    finally:
        pg.quit()
        if writer:
            writer.close()
            print(f"wrote {n} frames to {args.record}")
    if args.benchmark:
        dt = time.perf_counter() - t0
        part = {k: 1000 * v / max(n, 1) for k, v in s.total.items()}
        print(f"benchmark: {n} frames in {dt:.2f} s: {n / dt:.1f} FPS (real time is {args.fps:g}); shadow "
              f"{'on' if args.shadow else 'off'}, {torch.get_num_threads()} torch thread(s), {wm.game}, {args.world}")
        print(f"per frame: model step {part['model']:.2f} ms, env step + observe {part['env']:.2f} ms, drawing "
              f"{part['draw']:.2f} ms, other {1000 * dt / n - sum(part.values()):.2f} ms")


# -----------------------------------------------------------------------------
# headless dreaming: real | dream GIF, no pygame at all

def dream_gif(wm, env, args, policy):
    """--steps dream steps from real start frames, the real game beside them, into one GIF."""
    s = Session(wm, env, args, policy)
    scale, frames, err, mse = args.scale or GIF_SCALE, [], [], []
    for k in range(1, args.steps + 1):
        s.step(s.act())
        # the counter also keeps every frame distinct: Pillow merges identical neighbours, and the GIF
        # must have exactly --steps frames
        error, score = status(s)
        rows = [labels(s, scale, overlay=False), [(2, f"STEP {k}/{args.steps}" + error)], [(2, score)]]
        frames.append(picture(s, scale, rows, overlay=False))
        err.append(s.err)
        mse.append(s.mse)
    try:  # GIF frame durations are in milliseconds since imageio 2.28 (1/fps would mean "no delay")
        imageio.mimsave(args.gif, frames, duration=1000 / args.fps, loop=0)
    except OSError as e:
        raise common.KitError(f"cannot write {args.gif}: {e.strerror}") from None
    print(f"wrote {args.gif}: {'real | dream' if args.shadow else 'dream'}, {len(frames)} frames (after dream steps "
          f"1..{args.steps}; the start frame is not included), {frames[0].shape[1]}x{frames[0].shape[0]} "
          f"at {args.fps:g} FPS")
    if args.shadow:
        print(f"dream vs real: mean abs error {np.mean(err):.2f}, PSNR {common.psnr(np.mean(mse)):.2f} dB over the "
              f"{args.steps} steps")


# -----------------------------------------------------------------------------

def parse_actions(spec):
    try:
        actions = [int(a) for a in spec.split(",") if a.strip()]
    except ValueError:
        actions = []
    if not actions:
        raise common.KitError(f"--actions wants comma-separated action indices like 2,2,3,3,0, got '{spec}'")
    return actions


def main():
    args = p.parse_args()
    if args.gif and not args.gif.lower().endswith(".gif"):
        raise common.KitError(f"--gif {args.gif}: the file name must end in .gif")
    actions = parse_actions(args.actions) if args.actions is not None else None
    for path in (args.gif, args.record):
        if path:
            check_writable(path)
    headless = args.gif is not None or args.benchmark is not None
    if not headless:
        common.check_display("use --gif out.gif for a headless dream (or --benchmark N)")
    torch.set_num_threads(args.threads)
    wm = common.load_world(args.world, common.pick_device(args.device), args.temperature, args.game)
    if args.compile:  # on CUDA, CUDA graphs: one step at a time is a few small kernel launches
        wm.compile(mode="reduce-overhead" if wm.device.type == "cuda" else None)
    if args.latent_actions:
        if not hasattr(wm, "step_latent_action"):
            raise common.KitError(f"--latent-actions needs a latent-action model from train_latent_action.py; "
                                  f"{args.world} is not one")
        if args.policy:
            raise common.KitError("--latent-actions fires latent actions: use --actions with their numbers, "
                                  "not --policy")
        args.shadow = False  # the real game cannot take a latent action
        bad = [a for a in actions or [] if not 0 <= a < wm.n_latent_actions]
        if bad:
            raise common.KitError(f"--actions: {bad[0]} is not a latent action of {args.world} "
                                  f"(0..{wm.n_latent_actions - 1})")
        if headless and actions is None:
            actions = [None]  # no keyboard: NOOP through the map
    bad = [] if args.latent_actions else [a for a in actions or [] if not 0 <= a < wm.n_actions]
    if bad:
        names = ", ".join(f"{i} {m}" for i, m in enumerate(wm.action_meanings))
        raise common.KitError(f"--actions: {bad[0]} is not an action of {wm.game} ({names})")
    if args.warmup is not None and args.warmup < wm.context - 1:
        raise common.KitError(f"--warmup {args.warmup}: the dream starts from {wm.context} real frames, "
                              f"so it needs at least {wm.context - 1} steps")
    env = common.make_env(wm.game, seed=args.seed)
    if actions is not None:
        script = itertools.cycle(actions)
        policy = lambda env, obs: next(script)  # noqa: E731
    elif args.policy or headless:
        policy = common.make_policy(args.policy or "tracker", env, np.random.default_rng(args.seed))
    else:
        policy = None  # the keyboard
        print(f"{wm.game} in {args.world}: {latent_legend(wm) if args.latent_actions else legend(wm.action_meanings)}")
    try:
        (dream_gif if args.gif else window)(wm, env, args, policy)
    finally:
        env.close()


if __name__ == "__main__":
    common.run(main)
