"""The discrete path end to end: collect -> train_vqvae -> train_world -> load_world -> step,
with tiny budgets, plus checkpoint round trip, resume, the token cache and bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
from conftest import ROOT, describe, first_frames, run_script

VQ = ("--steps", "6", "--eval-every", "6", "--batch", "8")
WORLD = ("--steps", "4", "--eval-every", "4", "--eval-windows", "4", "--gif-steps", "5", "--batch", "4")


@pytest.fixture(scope="module")
def models(pong_data, tmp_path_factory):
    """A private copy of the dataset (the token cache is written beside it) and tiny models."""
    tmp = tmp_path_factory.mktemp("world")
    data = tmp / "pong"
    shutil.copytree(pong_data, data)
    vq, world = tmp / "vq.pt", tmp / "world.pt"
    r = run_script("train_vqvae.py", "--data", data, "--out", vq, "--assets", tmp, *VQ)
    assert r.returncode == 0, describe(r)
    assert "val PSNR" in r.stdout and "codes used" in r.stdout and "stability" in r.stdout
    r = run_script("train_world.py", "--data", data, "--tokenizer", vq, "--out", world, "--assets", tmp, *WORLD)
    assert r.returncode == 0, describe(r)
    assert "acc_changed" in r.stdout and "psnr@30" in r.stdout and "paddle_px@10" in r.stdout
    return dict(tmp=tmp, data=data, vq=vq, world=world)


def test_pipeline_outputs(models):
    tmp = models["tmp"]
    assert (tmp / "pong_vqvae_recon.png").stat().st_size > 0
    assert (tmp / "pong_dream.gif").stat().st_size > 0
    assert (models["data"] / "tokens.npy").exists() and (models["data"] / "tokens.json").exists()
    ck = common.load_checkpoint(models["world"], ("world",))
    for key in ("model_args", "model", "tokenizer_args", "tokenizer", "frame_space", "game", "action_meanings", "step", "args"):
        assert key in ck, key
    assert ck["step"] == 4 and ck["game"] == "ALE/Pong-v5"


def test_contract(models):
    wm = common.load_world(models["world"])
    assert isinstance(wm.context, int) and wm.context == 4
    frames = first_frames(wm, wm.context)
    assert frames[0].shape == (84, 64, 3) and frames[0].dtype == np.uint8
    wm.reset(frames)
    out = [wm.step(a) for a in (0, 2, 3, 1)]
    assert all(f.shape == (84, 64, 3) and f.dtype == np.uint8 for f in out)
    with pytest.raises(common.KitError):
        wm.step(wm.n_actions)
    with pytest.raises(common.KitError):
        wm.reset(frames[:2])


def test_round_trip_rebuilds_identical_model(models, tmp_path):
    # the world checkpoint carries its tokenizer: it loads with the tokenizer file gone
    solo = tmp_path / "world.pt"
    shutil.copy(models["world"], solo)
    a, b = common.load_world(models["world"]), common.load_world(solo)
    for m1, m2 in ((a.dyn, b.dyn), (a.tok, b.tok)):
        s1, s2 = m1.state_dict(), m2.state_dict()
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    frames = first_frames(a, a.context)
    a.reset(frames)
    b.reset(frames)
    for act in (2, 2, 3, 0, 1):
        assert np.array_equal(a.step(act), b.step(act))


def test_resume_continues_step_count(models, tmp_path):
    world = tmp_path / "world.pt"
    shutil.copy(models["world"], world)
    r = run_script("train_world.py", "--data", models["data"], "--tokenizer", models["vq"], "--out", world,
                   "--assets", tmp_path, "--resume", *WORLD, "--steps", "6")
    assert r.returncode == 0, describe(r)
    assert "resumed" in r.stdout and "at step 4" in r.stdout
    assert common.load_checkpoint(world)["step"] == 6


def test_token_cache_rebuilt_for_another_tokenizer(models, tmp_path):
    data = tmp_path / "pong"
    shutil.copytree(models["data"], data)
    vq2 = tmp_path / "vq2.pt"
    r = run_script("train_vqvae.py", "--data", data, "--out", vq2, "--assets", tmp_path, "--seed", "1", *VQ)
    assert r.returncode == 0, describe(r)
    key = lambda: json.loads((data / "tokens.json").read_text())["key"]
    assert key() == common.file_key(vq2)  # train_vqvae rebuilt it for its own checkpoint
    r = run_script("train_world.py", "--data", data, "--tokenizer", models["vq"], "--out", tmp_path / "w.pt",
                   "--assets", tmp_path, *WORLD)
    assert r.returncode == 0, describe(r)
    assert "built by another tokenizer: rebuilding" in r.stderr
    assert key() == common.file_key(models["vq"])


def one_line_error(r, *words):
    assert r.returncode != 0 and "Traceback" not in r.stderr, describe(r)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and all(w in last for w in words), describe(r)


def test_world_given_as_tokenizer(models, tmp_path):
    r = run_script("train_world.py", "--data", models["data"], "--tokenizer", models["world"], "--out", tmp_path / "w.pt")
    one_line_error(r, "world", "vqvae")


def test_tokenizer_of_another_game(models, tmp_path):
    data = tmp_path / "breakout"
    r = run_script("collect.py", "--game", "Breakout", "--steps", "40", "--max-episode-steps", "20", "--out", data)
    assert r.returncode == 0, describe(r)
    r = run_script("train_world.py", "--data", data, "--tokenizer", models["vq"], "--out", tmp_path / "w.pt")
    one_line_error(r, "Pong", "Breakout")


def test_empty_and_corrupt_datasets(models, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(run_script("train_vqvae.py", "--data", empty, "--out", tmp_path / "x.pt"), "no episodes")
    one_line_error(run_script("train_world.py", "--data", empty, "--tokenizer", models["vq"], "--out", tmp_path / "x.pt"),
                   "no episodes")
    bad = tmp_path / "bad"
    shutil.copytree(models["data"], bad)
    os.remove(bad / "tokens.json")
    victim = sorted(bad.glob("ep_*.npz"))[0]
    victim.write_bytes(victim.read_bytes()[:5000])
    r = run_script("train_vqvae.py", "--data", bad, "--out", tmp_path / "x.pt", "--assets", tmp_path, *VQ)
    one_line_error(r, victim.name, "--skip-bad")
    r = run_script("train_world.py", "--data", bad, "--tokenizer", models["vq"], "--out", tmp_path / "x.pt")
    one_line_error(r, victim.name, "--skip-bad")


def test_nan_loss_stops_with_step(models, tmp_path):
    r = run_script("train_vqvae.py", "--data", models["data"], "--out", tmp_path / "x.pt", "--assets", tmp_path,
                   "--lr", "1e30", *VQ)
    one_line_error(r, "loss became", "at step")


def test_token_cache_reencodes_a_rerecorded_episode(models, tmp_path):
    data = tmp_path / "pong"
    shutil.copytree(models["data"], data)
    (data / "tokens.json").unlink(missing_ok=True)
    _, ck = common.load_tokenizer(models["vq"])
    torch.manual_seed(0)  # a 6-step patch tokenizer draws every cell with one code; a random conv one does not
    tok = common.VQVAE(**{**ck["model_args"], "patch": False}).eval()
    args = (str(data), str(models["vq"]), tok, ck["frame_space"], "cpu", ck["game"])
    first = common.token_cache(*args)
    a, b = sorted(first)[:2]
    assert not torch.equal(first[a], first[b])
    shutil.copy(data / b, data / a)  # episode a re-recorded: same name, other content
    again = common.token_cache(*args)
    assert torch.equal(again[a], first[b]) and torch.equal(again[b], first[b])


def test_token_cache_is_read_in_place(models, tmp_path):
    """The cache is memory-mapped and the trainers gather from it without a copy: memory stays
    flat as the dataset grows. A torn cache (data and index from two builds) is rebuilt."""
    import train_world
    data = tmp_path / "pong"
    shutil.copytree(models["data"], data)
    tok, ck = common.load_tokenizer(models["vq"])
    args = (str(data), str(models["vq"]), tok, ck["frame_space"], "cpu", ck["game"])
    codes = common.token_cache(*args)
    eps = [dict(tokens=c, actions=torch.zeros(len(c) - 1, dtype=torch.long)) for c in codes.values()]
    flat, starts = train_world.pack(eps[::-1], "cpu")["tokens"]
    assert isinstance(flat.numpy(), np.ndarray) and flat.untyped_storage().data_ptr() == \
        next(iter(codes.values()))._base.untyped_storage().data_ptr()
    for ep, s in zip(eps[::-1], starts.tolist()):
        assert torch.equal(flat[s:s + len(ep["tokens"])], ep["tokens"])
    with open(data / "tokens.npy", "ab") as f:  # the data of another build: its size no longer matches
        f.write(b"\0" * 672)
    again = common.token_cache(*args)
    assert sorted(again) == sorted(codes) and all(torch.equal(again[k], codes[k]) for k in codes)


def test_dead_codes_reseeded_where_the_weight_is():
    torch.manual_seed(0)
    vq = common.VectorQuantizer(8, 4)
    vq.cluster_size[:] = torch.tensor([100.0] * 4 + [0.0] * 4)  # codes 4..7 are dead
    z = torch.zeros(1, 4, 3, 3)
    z[0, :, 1, 2] = torch.tensor([5.0, -5.0, 5.0, -5.0])  # the one cell where something is
    weight = torch.zeros(1, 3, 3)
    weight[0, 1, 2] = 1.0
    assert vq.reset_dead(z, weight) == 4
    assert torch.allclose(vq.embed[4:], z[0, :, 1, 2].expand(4, 4))
    assert (vq.cluster_size[4:] == 1).all()


def test_a_codebook_cut_per_game_draws_a_frame_from_one_slice():
    """games=2: codes 0-3 are the first game's, 4-7 the second's. A frame's tokens all come from
    one slice: the given game's, or else the slice nearest to the whole frame, even where one of
    its cells is nearer to a code of the other slice."""
    vq = common.VectorQuantizer(8, 2, games=2)
    vq.embed.copy_(torch.tensor([[0.0, 0], [1, 0], [2, 0], [3, 0], [0, 5], [1, 5], [2, 5], [3, 0.1]]))
    z = torch.tensor([[0.0, 0], [1, 0], [3, 0.1]]).t().reshape(1, 2, 1, 3)  # the last cell is code 7 exactly
    idx, _ = vq.codes(z)
    assert idx.tolist() == [[[0, 1, 3]]]  # slice 0 is nearest to the frame: its cell 3 too
    idx, _ = vq.codes(z, game=torch.tensor([1]))
    assert idx.tolist() == [[[7, 7, 7]]]  # within the slice: the nearest of its codes
    with pytest.raises(common.KitError, match="equal slices"):
        common.VectorQuantizer(9, 2, games=2)


def test_dead_codes_of_a_game_are_reseeded_from_its_own_frames():
    torch.manual_seed(0)
    vq = common.VectorQuantizer(8, 4, games=2)
    vq.cluster_size[:] = torch.tensor([100.0] * 6 + [0.0] * 2)  # codes 6, 7 (the second game's) are dead
    z = torch.randn(2, 4, 3, 3)  # frame 0 is the first game's, frame 1 the second's
    assert vq.reset_dead(z, torch.ones(2, 3, 3), game=torch.tensor([0, 1])) == 2
    second = z[1].flatten(1).t()
    assert all((second == row).all(1).any() for row in vq.embed[6:])
    assert torch.equal(vq.cluster_size[:6], torch.full((6,), 100.0))


def test_each_game_reads_its_own_action_embeddings():
    """game_actions: ALE's 18 actions (and "unknown", at each of 2 lags) are 38 rows per game: a
    step of the second game learns from rows 38-75 only."""
    torch.manual_seed(0)
    dyn = common.TokenDynamics(16, 18, (5, 4), context=2, emb=4, dim=8, n_blocks=1, actions=2, games=2,
                               game_actions=True)
    assert dyn.act.num_embeddings == 76 and dyn.act_bias.shape[0] == 76
    hist = torch.randint(16, (3, 2, 5, 4))
    dyn(hist, torch.tensor([[0, 3], [18, 17], [5, 5]]), game=torch.tensor([1, 1, 1])).sum().backward()
    touched = dyn.act.weight.grad.abs().sum(1).nonzero()[:, 0]
    assert touched.min() >= 38 and set(touched.tolist()) == {38 + 0, 38 + 19 + 3, 38 + 18, 38 + 19 + 17,
                                                             38 + 5, 38 + 19 + 5}


@pytest.mark.parametrize("memory,masked", [(0, False), (8, True), (0, True)])
def test_the_dynamics_input_looked_up_is_the_input_conv(memory, masked):
    """Without gradients the input conv is read from tables; the same logits as the conv, and the
    tables follow the weights when they change."""
    torch.manual_seed(0)
    dyn = common.TokenDynamics(16, 3, (5, 4), context=3, emb=8, dim=16, n_blocks=1, memory=memory, masked=masked)
    hist, action = torch.randint(16, (2, 3, 5, 4)), torch.randint(3, (2,))
    age, partial = torch.randint(memory + 2, (2, 5, 4)), torch.randint(17, (2, 5, 4))
    args = (hist, action, age if memory else None, partial if masked else None)

    def looked_up_and_conv():
        with torch.no_grad():
            looked_up = dyn(*args)
        conv = dyn(*args)  # with gradients: the conv
        assert torch.allclose(looked_up, conv, atol=1e-5)
        return conv
    before = looked_up_and_conv()
    before.square().mean().backward()
    torch.optim.SGD(dyn.parameters(), lr=0.5).step()
    assert not torch.allclose(looked_up_and_conv(), before, atol=1e-3)
    with torch.no_grad():
        dyn.tok.weight.mul_(2)  # in place, outside an optimizer
    looked_up_and_conv()


def test_bench_runs(models, tmp_path):
    r = run_script("bench.py", "world", "--world", models["world"], "--data", models["data"], "--windows", "3", "--no-compile",
                   "--speed-steps", "20")
    assert r.returncode == 0, describe(r)
    assert "| 30 |" in r.stdout and "paddle error @10" in r.stdout and "steps/s eager" in r.stdout
    r = run_script("bench.py", "collect", "--steps", "100", timeout=300)
    assert r.returncode == 0, describe(r)
    assert "raw emulator" in r.stdout and "AtariVectorEnv" in r.stdout and "| tracker |" in r.stdout


def test_ctrl_c_keeps_a_resumable_checkpoint(models, tmp_path):
    out = tmp_path / "vq.pt"
    cmd = [sys.executable, str(ROOT / "train_vqvae.py"), "--data", str(models["data"]), "--out", str(out),
           "--assets", str(tmp_path), "--steps", "100000", "--eval-every", "2", "--batch", "4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 90
    while not out.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert "continue with --resume" in stderr
    step = common.load_checkpoint(out, ("vqvae",))["step"]
    assert step >= 2
    r = run_script("train_vqvae.py", "--data", models["data"], "--out", out, "--assets", tmp_path, "--resume",
                   "--steps", step + 2, "--eval-every", "2", "--batch", "4")
    assert r.returncode == 0 and f"resumed {out} at step {step}" in r.stdout, describe(r)
    assert common.load_checkpoint(out)["step"] == step + 2


def test_bad_flags_are_one_error_line(models, tmp_path):
    for flags, words in ((("--lr", "nan"), ("--lr", "finite")), (("--steps", "0"), ("--steps", "positive")),
                         (("--val-frac", "2"), ("--val-frac", "between 0 and 1"))):
        r = run_script("train_vqvae.py", "--data", models["data"], "--out", tmp_path / "x.pt", *flags)
        one_line_error(r, *words)


def test_checkpoints_with_old_argument_names_still_load(models, tmp_path):
    ck = common.load_checkpoint(models["world"])
    ck["tokenizer_args"]["latent"] = ck["tokenizer_args"].pop("code_dim")  # as written before the rename
    common.save_checkpoint(tmp_path / "old.pt", ck)
    old, new = common.load_world(tmp_path / "old.pt"), common.load_world(models["world"])
    frames = first_frames(new)
    old.reset(frames)
    new.reset(frames)
    assert np.array_equal(old.step(2), new.step(2))
    r = run_script("train_vqvae.py", "--data", models["data"], "--out", tmp_path / "vq.pt", "--assets", tmp_path,
                   "--latent", "8", *VQ)  # the old flag name works, with a warning
    assert r.returncode == 0 and "--latent is now --code-dim" in r.stderr, describe(r)
    assert common.load_checkpoint(tmp_path / "vq.pt")["model_args"]["code_dim"] == 8


def test_ctrl_c_during_a_checkpoint_write_waits_for_it(tmp_path, monkeypatch):
    """A Ctrl-C that lands while a checkpoint is written comes after the write: the script's
    handler then saves and stops as usual, and no checkpoint is ever cut short."""
    save = torch.save

    def interrupted(obj, f):  # Ctrl-C half way through the write
        signal.raise_signal(signal.SIGINT)
        save(obj, f)

    monkeypatch.setattr(torch, "save", interrupted)
    # Python's own handler, as a script has it (pytest started in the background inherits an ignored SIGINT)
    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            common.save_checkpoint(tmp_path / "ck.pt", {"w": torch.arange(10)})
    finally:
        signal.signal(signal.SIGINT, old_handler)
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["w"].tolist() == list(range(10))
