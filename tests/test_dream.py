"""Dreams that stay a game: sampling (temperature 0 is the argmax, a seed fixes a dream, a batch
of dreams is the dreams one by one), the memory for hidden timers (a synthetic serve: an event
a fixed number of steps after the screen goes still), `bench.py dream` end to end, the ball
detectors it counts with against the emulator's own frames, bad input."""
import shutil

import numpy as np
import pytest
import torch

import bench
import common
import train_world
from conftest import describe, first_frames, run_script

VQ = ("--steps", "6", "--eval-every", "6", "--batch", "8")
WORLD = ("--steps", "4", "--eval-every", "4", "--eval-windows", "4", "--gif-steps", "5", "--batch", "4",
         "--memory", "8", "--corrupt", "0.2", "--dash", "0.2", "--hard-share", "0.5", "--attend", "--sides")


@pytest.fixture(scope="module")
def tiny(pong_data, tmp_path_factory):
    """A tiny world of the default kind (memory, masked decoding, two actions), trained a few steps, with
    the playable recipe's damaged pasts (--corrupt), hard windows (--hard-share) and attention-pooled
    context (--attend), also over the rows above and below (--sides)."""
    tmp = tmp_path_factory.mktemp("dream")
    data = tmp / "pong"
    shutil.copytree(pong_data, data)
    vq, world = tmp / "vq.pt", tmp / "world.pt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        r = run_script("train_vqvae.py", "--data", data, "--out", vq, "--assets", tmp, *VQ)
        assert r.returncode == 0, describe(r)
        r = run_script("train_world.py", "--data", data, "--tokenizer", vq, "--out", world, "--assets", tmp, *WORLD)
        assert r.returncode == 0, describe(r)
    return dict(tmp=tmp, data=data, vq=vq, world=world)


def dream(wm, frames, actions, seed=None):
    if seed is not None:
        wm.seed(seed)
    wm.reset(frames)
    return np.stack([wm.step(a) for a in actions])


ACTIONS = [0, 2, 2, 3, 1, 0, 3, 3, 2, 0] * 3


# -----------------------------------------------------------------------------
# sampling

def test_temperature_zero_is_the_argmax(tiny):
    wm = common.load_world(tiny["world"], temperature=0)
    frames = first_frames(wm)
    got = dream(wm, frames, ACTIONS, seed=1)
    assert np.array_equal(got, dream(wm, frames, ACTIONS, seed=2))  # no randomness at all
    wm.reset(frames)  # the same steps by hand: the argmax of the logits, the memory following the tokens
    hist, age, past = wm.hist.clone(), wm.age.clone(), wm.n_actions  # no action before the first frame
    with torch.inference_mode():
        for k, a in enumerate(ACTIONS):
            nxt = wm.dyn(hist, torch.tensor([[past, a]]), age).argmax(1)
            past = a
            age = common.next_age(age, hist[:, -1], nxt, wm.memory)
            hist = torch.cat([hist[:, 1:], nxt[:, None]], 1)
            assert np.array_equal(got[k], wm._frame(common.to_uint8(wm.tok.decode(nxt))[0])), k


def test_a_seed_fixes_a_dream(tiny):
    wm = common.load_world(tiny["world"], temperature=1.0)
    frames = first_frames(wm)
    a, b, c = dream(wm, frames, ACTIONS, 3), dream(wm, frames, ACTIONS, 3), dream(wm, frames, ACTIONS, 4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(dream(wm, frames, ACTIONS), a)  # no new seed: the stream goes on


def test_a_batch_of_dreams_is_the_dreams_one_by_one(tiny):
    # at temperature 0: with draws, a batched conv rounds differently (1e-6) and a near tie can go either way
    wm = common.load_world(tiny["world"], temperature=0)
    frames = first_frames(wm)
    x = torch.as_tensor(np.stack(frames)).permute(0, 3, 1, 2)[None].repeat(3, 1, 1, 1, 1)
    wm.reset_batch(x, seeds=[7, 8, 9])
    batch = torch.stack([wm.step_batch([a] * 3) for a in ACTIONS], 1)  # (3, steps, C, H, W)
    for i, seed in enumerate([7, 8, 9]):
        alone = dream(wm, frames, ACTIONS, seed)
        # the same tokens; the batched decoder's rounding may move a pixel by one level
        assert np.abs(batch[i].permute(0, 2, 3, 1).numpy().astype(int) - alone).max() <= 1, seed


# -----------------------------------------------------------------------------
# memory: a synthetic serve

def serve_episode(rng, n=160, delay=8):
    """4x4 token frames, Pong in miniature: a ball (token 1) crosses the bottom row and leaves,
    the score cell (0, 3) turns over (tokens 2, 3) as it leaves, the screen stays still for
    `delay` steps, then the serve (token 1 again) appears at (1, 0); repeat. Four still frames
    look alike `delay` - 3 times in a row, so a 4-frame context cannot know when the serve comes."""
    frames, score = [], 2
    f = np.zeros((4, 4), np.int64)
    while len(frames) < n:
        for c in range(int(rng.integers(0, 2)), 4):  # the rally
            f = f.copy()
            f[1, 0], f[3] = 0, 0
            f[3, c] = 1
            frames.append(f)
        f = f.copy()
        f[3], score = 0, 5 - score  # the point
        f[0, 3] = score
        frames += [f] * (delay + 1)
        f = f.copy()
        f[1, 0] = 1  # the serve
        frames.append(f)
    return torch.as_tensor(np.stack(frames[:n]))


def train_serve(memory, steps=200, T=4, K=2):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    eps = [{"tokens": serve_episode(rng), "actions": torch.zeros(159, dtype=torch.long)} for _ in range(6)]
    args = train_world.p.parse_args(["--memory", str(memory)])
    dyn = common.TokenDynamics(4, 1, (4, 4), T, emb=8, dim=32, n_blocks=2, memory=memory)
    opt = torch.optim.AdamW(dyn.parameters(), lr=3e-3)
    pool = torch.tensor(common.windows([len(ep["tokens"]) for ep in eps], T + K))
    data, emb, disc = train_world.pack(eps, "cpu"), torch.eye(4), torch.tensor([0.6, 0.4])
    for _ in range(steps):
        hist, act, tgt, age, game = train_world.batch(data, pool[rng.integers(len(pool), size=32)], T, K, memory=memory)
        loss, _ = train_world.token_loss(dyn, hist, act, tgt, age if memory else None, game, 1.0, emb, disc, args)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dyn.eval()


def serves_on_time(dyn, delay=8, T=4):
    """From a window that ends on the point, dream on with the argmax (the memory starting at
    the window, as after a reset) and say whether the serve comes exactly `delay` + 1 steps
    later, and not before, over the points of a test sequence."""
    seq, right = serve_episode(np.random.default_rng(1), n=400), []
    points = [t for t in range(T, len(seq) - delay - 2) if (seq[t, 0, 3] != seq[t - 1, 0, 3]).item()]
    with torch.no_grad():
        for t in points:
            hist = seq[t - T + 1:t + 1][None]
            age = common.ages(hist, dyn.memory)[:, -1] if dyn.memory else None
            seen = []
            for _ in range(delay + 1):
                nxt = dyn(hist, torch.zeros(1, dtype=torch.long), age).argmax(1)
                age = common.next_age(age, hist[:, -1], nxt, dyn.memory) if dyn.memory else None
                hist = torch.cat([hist[:, 1:], nxt[:, None]], 1)
                seen.append(bool(nxt[0, 1, 0] == 1))
            right.append(seen == [False] * delay + [True])
    return np.mean(right)


def test_memory_learns_the_timer_that_four_frames_cannot_count():
    assert serves_on_time(train_serve(memory=16)) >= 0.9
    assert serves_on_time(train_serve(memory=0)) == 0.0


def test_sides_tell_each_row_what_is_above_it_and_what_is_below():
    """--sides: a row's context from above pools the rows above it only (so a paddle can tell on
    which side the ball is however far it is), and the one from below the rows below."""
    blk = common.FiLMBlock(8, 4, attend=True, sides=True)
    h = torch.zeros(1, 8, 10, 6)
    h[0, :, 5, 2] = 1.0  # one object, in row 5
    with torch.no_grad():
        for lin in (blk.above, blk.below):
            lin.bias.zero_()
        blk.below.weight.zero_()
        above = blk.sides(h, blk.where(h))[0, :, :, 0].abs().sum(0)
        blk.below.weight.normal_()
        blk.above.weight.zero_()
        below = blk.sides(h, blk.where(h))[0, :, :, 0].abs().sum(0)
    assert (above[:6] == 0).all() and (above[6:] > 0).all()  # rows 6-9 have it above them
    assert (below[:5] > 0).all() and (below[5:] == 0).all()  # rows 0-4 have it below them


def test_batches_count_ages_as_the_whole_episode_does():
    """train_world.batch computes the memory from the frames up to the window, not a stored copy
    (which would grow with the dataset): the same ages as counted from the episode's start."""
    torch.manual_seed(0)
    tokens = (torch.rand(40, 3, 3) < 0.15).long().cumsum(0) % 3  # cells that change now and then
    eps = [dict(tokens=tokens, actions=torch.zeros(39, dtype=torch.long))]
    data, memory, T = train_world.pack(eps, "cpu"), 5, 4
    idx = torch.tensor([[0, s] for s in range(0, 40 - T - 1)])
    age = train_world.batch(data, idx, T, 1, memory=memory)[3]
    assert torch.equal(age, common.ages(tokens, memory)[idx[:, 1] + T - 1])


def test_ages_count_from_the_first_frame_and_end_in_the_unknown_past():
    tok = torch.tensor([[[0]], [[0]], [[1]], [[1]], [[1]], [[1]], [[1]], [[1]]])  # (8, 1, 1)
    assert common.ages(tok, 3)[:, 0, 0].tolist() == [0, 1, 0, 1, 2, 3, 4, 4]  # 4: still for longer than 3
    assert common.ages(tok, 3, unknown=True)[:, 0, 0].tolist() == [4, 4, 0, 1, 2, 3, 4, 4]  # as the unknown past


def test_corrupt_context_erases_at_one_frame_stays_wrong_and_says_when():
    """train_world.corrupt (--corrupt): a damaged cell turns into the background (the newest
    frame's most common token), is wrong from one frame of the history to the newest, and its
    age counts from that frame; nothing is planted in an empty cell."""
    torch.manual_seed(0)
    T = 4
    hist = torch.randint(5, (256, 1, 6, 7)).expand(-1, T, -1, -1)  # still windows: a wrong cell is visible
    hist = torch.where(torch.rand(256, 1, 6, 7) < 0.5, 0, hist)  # token 0 is the background
    age = torch.full((256, 6, 7), 9)
    got, got_age = train_world.corrupt(hist, age, 0.5)
    wrong = got != hist
    assert 0.05 < wrong[:, -1].float().mean() < 0.5
    assert (wrong[:, 1:] >= wrong[:, :-1]).all()  # once wrong, wrong to the newest frame
    assert set(got[wrong].tolist()) == {0}
    since = T - wrong.sum(1)
    assert torch.equal(got_age, torch.where(wrong[:, -1], T - 1 - since, age))
    assert (since[wrong[:, -1]] == 0).any() and (since[wrong[:, -1]] == T - 1).any()
    assert torch.equal(train_world.corrupt(hist, age, 0.0)[0], hist)


def test_dash_draws_what_moved_again_beside_it_where_the_field_is_empty():
    """train_world.dash (--dash): the cells an object entered in the newest frame (in half as many
    windows, the frame before) are drawn again one cell beside them, only on the background, with
    their age restarted; still things and older frames stay as they were."""
    torch.manual_seed(0)
    hist = torch.zeros(256, 4, 6, 7, dtype=torch.long)  # token 0 is the background
    hist[:, :, 0] = 7  # a wall: never entered, never drawn over
    hist[:, 2, 3, 2], hist[:, 3, 3, 3] = 5, 6  # a ball moving right
    age = torch.full((256, 6, 7), 9)
    got, got_age = train_world.dash(hist, age, 1.0)
    new = got != hist
    assert not new[:, :2].any() and new[:, 3].flatten(1).sum(1).eq(1).all()
    assert 0.3 < new[:, 2].flatten(1).any(1).float().mean() < 0.7  # half the windows, the frame before
    y, x = new[:, 3].nonzero()[:, 1:].T
    assert set(got[:, 3][new[:, 3]].tolist()) == {6} and ((y - 3).abs() <= 1).all() and ((x - 3).abs() <= 1).all()
    assert torch.equal(got_age, torch.where(new[:, 2:].any(1), 0, age))
    assert torch.equal(train_world.dash(hist, age, 0.0)[0], hist)
    assert torch.equal(train_world.dash(hist[:, -1:], age, 1.0)[0], hist[:, -1:])  # one frame: nothing moved
    edge = torch.zeros(256, 4, 6, 7, dtype=torch.long)
    edge[:, 2, 3, 5], edge[:, 3, 3, 6] = 5, 6  # a ball entering the last column
    new = train_world.dash(edge, None, 1.0)[0] != edge
    assert new[:, 3, :, 5].any() and not new[:, 3, :, 0].any()  # beside it, never round the edge


# -----------------------------------------------------------------------------
# bench.py dream, and bad input

def test_bench_dream_runs(tiny, tmp_path):
    gif = tmp_path / "long.gif"
    r = run_script("bench.py", "dream", "--world", tiny["world"], "--steps", "25", "--seeds", "1", "--gif", gif)
    assert r.returncode == 0, describe(r)
    for words in ("share of frames with a ball", "with the player's paddle", "serves per 1000 steps",
                  "ball vanishing in mid-field", "two balls or a smear", "impossible jumps", "paddle follows the keys",
                  "points per 1000 steps", "draws that keep the ball", "send the ball back within 6 steps"):
        assert words in r.stdout, words
    from PIL import Image, ImageSequence
    with Image.open(gif) as im:  # 25 steps of 67 ms, which GIF stores in centiseconds (60 ms); identical
        # neighbours are folded into one frame's duration
        assert sum(f.info["duration"] for f in ImageSequence.Iterator(im)) == 25 * 60


def test_reset_reads_the_frames_before_into_the_memory(tiny):
    """World.reset(frames, before=...): the real frames before the context set the cell ages (how
    long the field has been still, where the last ball went) as counting over all of them does,
    and nothing else; without them the dream starts with its past unknown."""
    wm = common.load_world(tiny["world"], temperature=0)
    # the tiny tokenizer draws every frame alike: one whose codes mark what stands out of the field instead
    wm.tok.encode = lambda f: (f[:, 1, ::4, ::4] > 100).long()  # green: the paddles and the ball; 84x64 -> 21x16
    frames = first_frames(wm, 24)  # the serve comes at step 15 of a reset: the ball moves in `before`
    before, start = frames[:-wm.context], frames[-wm.context:]
    wm.reset(start)
    hist, unknown, dream = wm.hist.clone(), wm.age.clone(), wm.step(0)
    wm.reset(start, before=before)
    seen = wm.tok.encode(common.frames_tensor(np.stack(frames)))[None]
    assert torch.equal(wm.hist, hist)
    assert torch.equal(wm.age, common.ages(seen, wm.memory, unknown=True)[:, -1])
    assert not torch.equal(wm.age, unknown)
    assert wm.step(0).shape == dream.shape
    wm.reset(start, before=[])
    assert torch.equal(wm.age, unknown)


def test_bench_world_dreams_with_and_without_the_memory_of_the_frames_before(tiny):
    r = run_script("bench.py", "world", "--world", tiny["world"], "--data", tiny["data"], "--windows", "3",
                   "--before", "8", "--no-compile", "--speed-steps", "5")
    assert r.returncode == 0, describe(r)
    assert "ball within 8 px: tokenizer round trip" in r.stdout
    assert "with the 8 real frames before each window in the memory: PSNR @1" in r.stdout, r.stdout


def random_play(game, steps=400):
    """The emulator's raw frames and rewards under random keys (seed 0), from a reset."""
    env, rng = common.make_env(game, seed=0), np.random.default_rng(0)
    raws, rewards = [], []
    for _ in range(steps):
        obs, reward, term, trunc, _ = env.step(int(rng.integers(env.action_space.n)))
        raws.append(obs)
        rewards.append(reward)
        if term or trunc:
            env.reset()
    env.close()
    return raws, rewards


@pytest.mark.parametrize("game,color,blind", [
    ("ALE/Pong-v5", (236, 236, 236), [(0, 34), (194, 210)]),
    # Breakout's bricks and paddle are drawn in the ball's colours: the detector does not look there
    ("ALE/Breakout-v5", (200, 72, 72), [(0, 32), (57, 93), (185, 210)]),
])
def test_ball_detectors_see_every_real_ball(game, color, blind):
    """Every ball the emulator draws in mid-field (a wall next to it included) is seen once, near
    where it is, in every frame space, and none where there is none: a miss would count as the
    real game's ball vanishing in mid-field, the number the dream's is held against."""
    raws, _ = random_play(game)
    seen = empty = 0
    for space in common.FRAME_SPACES:
        for raw, frame in zip(raws, common.preprocess(np.stack(raws), space)):
            ball = np.all(raw == color, axis=-1)
            for a, b in blind:
                ball[a:b] = False
            found = bench.scene(game, common.to_image(frame), space)["balls"]
            if not ball.any():
                assert not found, (space, found)
                empty += 1
                continue
            where = [r.mean() for r in np.nonzero(ball)]  # raw row, column
            if bench.midfield(game, where):
                assert len(found) == 1, (space, where, found)
                assert abs(found[0][0] - where[0]) < 5 and abs(found[0][1] - where[1]) < 5, (space, where, found)
                seen += 1
    assert seen >= 150 and empty >= 30, (seen, empty)


def test_the_score_changes_at_every_point_and_nowhere_else_in_every_frame_space():
    """The score's rows of pong_objects change at each point, in its step or the next (a frame is
    the max of two emulator frames), and never otherwise, in every frame space: what the dream's
    "score changes per 1000 steps" is held against."""
    raws, rewards = random_play("ALE/Pong-v5")
    points = np.nonzero(rewards[:-1])[0]  # the digits change in the frame of the point or the next
    assert len(points) >= 4
    for space in common.FRAME_SPACES:
        frames = common.preprocess(np.stack(raws), space)
        scenes = [bench.scene("ALE/Pong-v5", common.to_image(f), space) for f in frames]
        changes = [t for t in range(1, len(scenes)) if bench.score_changed(scenes[t - 1], scenes[t])]
        assert all(any(0 <= t - p <= 1 for p in points) for t in changes), (space, changes, points)
        assert all(p in changes or p + 1 in changes for p in points), (space, changes, points)
        m = bench.closed_loop_stats(scenes, [0] * (len(scenes) - 1), "ALE/Pong-v5", jump=500.0, smear=1e9)
        assert m["scored"] == pytest.approx(len(changes) * 1000 / (len(scenes) - 1))


def pong_scene(*balls):
    """What bench.scene gives for a Pong frame with the player's paddle at raw row 100 and these
    balls (raw row, col, area)."""
    return dict(paddle=100.0, opponent=None, balls=list(balls))


def test_closed_loop_stats_count_the_paddle_and_a_ball_gone_in_mid_field():
    ball, gone = [(100.0, 80.0, 4.0)], []  # raw (row, col, area): mid-field
    scenes = [dict(paddle=p, opponent=None, balls=b) for p, b in ((100.0, ball), (100.0, ball), (None, gone),
                                                                  (100.0, gone), (None, gone))]
    m = bench.closed_loop_stats(scenes, [0] * 4, "ALE/Pong-v5", jump=20.0, smear=50.0)
    assert m["paddle"] == pytest.approx(0.5) and m["ball"] == pytest.approx(0.25)
    assert m["vanish"] == pytest.approx(1000 / 4) and m["serves"] == 0
    assert m["young"] == pytest.approx(1000 / 4)  # on screen 2 frames: drawn from nothing, gone
    assert m["blinks"] == 0  # and not back


@pytest.mark.parametrize("gap, blinks", [(1, 1), (2, 1), (3, 0)])
def test_a_ball_back_within_2_frames_is_a_blink(gap, blinks):
    """A ball gone in mid-field and drawn again 1 or 2 frames later is still a vanishing, and a
    blink: the dream kept the ball in its memory and drew a frame without it."""
    flight = [pong_scene((100.0, 80.0 + 4 * t, 4.0)) for t in range(3)]
    scenes = flight + [pong_scene()] * gap + [pong_scene((100.0, 100.0, 4.0))]
    m = bench.closed_loop_stats(scenes, [0] * (len(scenes) - 1), "ALE/Pong-v5", jump=500.0, smear=50.0)
    per = 1000 / (len(scenes) - 1)
    assert m["vanish"] == pytest.approx(per) and m["blinks"] == pytest.approx(blinks * per) and m["young"] == 0


def test_closed_loop_stats_time_the_serve_after_a_point():
    # a point, then the serve 15 frames later
    scenes = [pong_scene((100.0, 20.0, 4.0))] + [pong_scene()] * 15 + [pong_scene((115.0, 80.0, 4.0))] * 4
    m = bench.closed_loop_stats(scenes, [0] * (len(scenes) - 1), "ALE/Pong-v5", jump=20.0, smear=50.0)
    assert m["player"] > 0 and m["serves"] > 0 and m["wait"] == 15 and m["young"] == 0


def test_a_ball_hidden_a_frame_at_the_paddle_is_no_point():
    """The detector cannot see a ball inside a paddle's columns: gone for a frame there and back
    is a bounce; gone for 4 frames is a point."""
    at, back = (100.0, 130.0, 4.0), (100.0, 120.0, 4.0)  # raw (row, col, area): at the player's paddle
    bounce = [pong_scene(at), pong_scene(), pong_scene(back)] + [pong_scene(back)] * 5
    lost = [pong_scene(at)] + [pong_scene()] * 6 + [pong_scene(back)]
    for scenes, points in ((bounce, 0), (lost, 1)):
        m = bench.closed_loop_stats(scenes, [0] * (len(scenes) - 1), "ALE/Pong-v5", jump=500.0, smear=50.0)
        assert m["opponent"] == pytest.approx(points * 1000 / (len(scenes) - 1)) and m["player"] == 0


@pytest.mark.parametrize("sign", [1, -1])
def test_the_opponent_chases_the_ball_when_it_moves_toward_its_row(sign):
    rows = [60.0, 150.0, 90.0, 170.0, 50.0, 120.0]  # the ball's row, raw pixels: it jumps above and below
    scenes, opp = [], 110.0
    for r in rows:
        scenes.append(dict(paddle=100.0, opponent=opp, balls=[(r, 80.0, 4.0)]))
        opp += sign * 4 * np.sign(r - opp)  # toward the ball (sign 1), or away from it
    m = bench.closed_loop_stats(scenes, [0] * (len(rows) - 1), "ALE/Pong-v5", jump=500.0, smear=50.0)
    assert m["chase"] == pytest.approx(sign)


class LastFrame:
    """A stand-in world whose next frame is the last one it was shown (a ball in mid-field stays),
    or, in the draws `lose(i)` picks (i: the draw's row), that frame with the field blanked (the
    ball is lost)."""

    def __init__(self, wm, lose):
        self.context, self.game, self.space, self.lose = wm.context, wm.game, wm.space, lose

    def reset_batch(self, frames, seeds=None):
        self.last = frames[:, -1].clone()

    def reconstruct(self, frames):  # a perfect tokenizer
        return frames[:, -1]

    def step_batch(self, actions):
        for i in filter(self.lose, range(len(self.last))):
            bg = self.last[i, :, 40:41].median(2, keepdim=True).values  # a mid-field row's most common colour
            self.last[i, :, 14:78] = bg  # the whole field, between the walls
        return self.last


def test_kept_ball_counts_the_draws_with_a_ball_and_where_they_are_lost(tiny):
    wm = common.load_world(tiny["world"])
    env, start = bench.starts(wm, 0)[1]  # mid-rally: the ball is in play
    run = bench.play(wm, env, start, 30, 0, dream=False)
    env.close()
    kept, drawable, n, stuck, share = bench.kept_ball(LastFrame(wm, lambda i: False), [run], draws=2)
    assert (kept, drawable, stuck) == (1.0, 1.0, 0) and n > 0 and np.isnan(share)  # nothing lost, nowhere
    kept, drawable, n, stuck, share = bench.kept_ball(LastFrame(wm, lambda i: True), [run], draws=2)
    assert kept == 0.0 and drawable == 1.0 and n > 0 and (stuck, share) == (n, 1.0)  # every state loses it
    # 4 draws a state: even states lose one draw (under half: not stuck), every third state loses 3
    lose = lambda i: i // 4 % 2 == 0 and i % 4 == 0 or i // 4 % 3 == 0 and i % 4 < 3
    kept, _, n, stuck, share = bench.kept_ball(LastFrame(wm, lose), [run], draws=4)
    lost = [sum(map(lose, range(4 * s, 4 * s + 4))) for s in range(n)]
    assert kept == pytest.approx(1 - sum(lost) / (4 * n)) and stuck == sum(k >= 2 for k in lost)
    assert share == pytest.approx(sum(k for k in lost if k >= 2) / sum(lost)) and 0 < share < 1


class Replay:
    """A stand-in world that dreams what the real run did: started on a window of the run's frames,
    it goes on as the run's frames went on."""

    def __init__(self, wm, frames):
        self.context, self.game, self.space = wm.context, wm.game, wm.space
        self.frames = common.frames_tensor(np.stack(frames))

    def reset_batch(self, frames, seeds=None):
        T = self.context
        self.at = [next(i + T - 1 for i in range(len(self.frames) - T + 1) if torch.equal(self.frames[i:i + T], w))
                   for w in frames]

    def step_batch(self, actions):
        self.at = [i + 1 for i in self.at]
        return self.frames[self.at]


def test_kept_bounce_counts_the_dreams_that_send_the_ball_back(tiny):
    wm = common.load_world(tiny["world"])
    env, start = bench.starts(wm, 0)[1]
    run = bench.play(wm, env, start, 600, 0, dream=False)
    env.close()
    kept, n = bench.kept_bounce(Replay(wm, run[0]), [run], draws=2)
    assert n > 0 and kept == 1.0  # the real game's own frames bounce every time
    kept, n_again = bench.kept_bounce(LastFrame(wm, lambda i: False), [run], draws=2)
    assert n_again == n and kept == 0.0  # a ball that stays at the paddle never comes back


@pytest.mark.parametrize("flags, words", [
    (("--temperature", "-1"), ("--temperature", "0 or more")),
    (("--temperature", "nan"), ("--temperature", "0 or more")),
    (("--seed", "1.5"), ("--seed", "invalid int")),
])
def test_bad_sampling_flags_are_one_error_line(tiny, tmp_path, flags, words):
    r = run_script("play.py", "--world", tiny["world"], "--gif", tmp_path / "x.gif", "--steps", "2", *flags)
    assert r.returncode == 2 and "Traceback" not in r.stderr, describe(r)
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and all(w in errors[0] for w in words), describe(r)
    with pytest.raises(common.KitError):
        common.load_world(tiny["world"], temperature=float("nan"))
