"""The GPU path, checked without a GPU: every model and loss on the meta device (which, like
CUDA, refuses a CPU tensor mixed into device math), worlds stepping on it, one line for a device
this machine lacks, torch.compile graphs that are built once and never again, and the guard
for --compile on a Mac whose torch has no Inductor backend for MPS."""
import pytest
import torch
import torch.nn as nn

import common
from conftest import describe

META = torch.device("meta")
GRID, CODES, ACTIONS = (21, 16), 16, 6


def tokens(*shape):
    return torch.randint(CODES, (*shape, *GRID)).to(META)


def backward(out):
    """Sum every float tensor of a model's output and run backward: all of it stays on meta."""
    outs = out if isinstance(out, tuple) else (out,)
    total = sum(o.float().sum() for o in outs if torch.is_tensor(o) and o.is_floating_point() and o.requires_grad)
    assert total.device == META
    total.backward()


# -----------------------------------------------------------------------------
# every model, every loss, on meta

@pytest.mark.parametrize("patch", [True, False], ids=["patch", "conv"])
def test_vqvae_on_meta(patch):
    model = common.VQVAE(hidden=8, code_dim=16, n_codes=CODES, patch=patch).to(META)
    backward(model(torch.zeros(2, 3, 84, 64, dtype=torch.uint8, device=META)))
    assert model.encode(torch.zeros(2, 3, 84, 64, dtype=torch.uint8, device=META)).device == META


@pytest.mark.parametrize("vae", [False, True], ids=["ae", "vae"])
def test_conv_ae_on_meta(vae):
    model = common.ConvAE(in_ch=1, size=(64, 64), stack=4, latent_dim=8, hidden=8, fc=16, vae=vae).to(META)
    backward(model(torch.zeros(2, 4, 64, 64, dtype=torch.uint8, device=META)))


@pytest.mark.parametrize("kw", [dict(arch="conv", memory=8, masked=True, actions=2, attend=True, sides=True),
                                dict(arch="conv"),
                                dict(arch="attn", dim=32), dict(arch="lam", n_latent_actions=4)],
                         ids=["conv-memory-masked-attend-sides", "conv", "attn", "lam"])
def test_token_dynamics_on_meta(kw):
    dyn = common.make_dynamics(**dict(n_codes=CODES, n_actions=ACTIONS, grid=GRID, context=4), **kw).to(META)
    act = torch.randint(ACTIONS, (2, kw["actions"]) if "actions" in kw else (2,)).to(META)
    age = torch.randint(9, (2, *GRID)).to(META) if kw.get("memory") else None
    backward(dyn(tokens(2, 4), act, age))


def test_heads_agent_and_latent_dynamics_on_meta():
    backward(common.Outcome(n_codes=CODES, grid=GRID).to(META)(tokens(2, 3)))
    backward(common.LatentOutcome(8, stack=4, frames=2).to(META)(torch.zeros(2, 2, 8, device=META)))
    backward(common.Agent(n_codes=CODES, grid=GRID, n_actions=ACTIONS).to(META)(tokens(2, 4)))
    for model in (common.LatentMLP(8, ACTIONS, context=4), common.LatentGRU(8, ACTIONS)):
        model = model.to(META)
        hist = torch.zeros(2, model.context, 8, device=META)
        backward(model(hist, torch.zeros(2, dtype=torch.long, device=META)))


def test_training_losses_on_meta():
    """train_world.py's token and heads losses over batches gathered on the device (pack/take),
    and train_latent_action.py's stage-one loss."""
    import train_latent_action
    import train_world
    args = train_world.p.parse_args(["--memory", "8"])
    eps = [dict(tokens=torch.randint(CODES, (12, *GRID)), actions=torch.randint(ACTIONS, (11,)),
                rewards=torch.zeros(11), terminated=torch.zeros(11, dtype=torch.bool)) for _ in range(2)]
    data = train_world.pack(eps, META)
    idx = torch.tensor([[0, 0], [1, 3]], device=META)
    hist, act, tgt, age, game = train_world.batch(data, idx, 4, args.rollout, args.actions - 1, ACTIONS, args.memory)
    assert hist.device == act.device == tgt.device == age.device == META
    dyn = common.make_dynamics("conv", n_codes=CODES, n_actions=ACTIONS, grid=GRID, memory=8, masked=True,
                               actions=2).to(META)
    emb = torch.randn(CODES, 4, device=META)
    disc = torch.full((args.rollout,), 1 / args.rollout)
    loss, _ = train_world.token_loss(dyn, hist, act, tgt, age, game, 0.5, emb, disc, args)
    heads = common.Outcome(n_codes=CODES, grid=GRID).to(META)
    import numpy as np
    rows = torch.tensor([[0, 1], [1, 2], [1, 5]], device=META)
    loss = loss + common.outcome_loss(heads, data, rows, rows[:1], np.random.default_rng(0), 2 * args.batch,
                                   args.event_share)
    backward(loss)

    largs = train_latent_action.p.parse_args([])
    lam = common.make_dynamics("lam", n_codes=CODES, n_actions=ACTIONS, n_latent_actions=4, grid=GRID).to(META)
    enc = train_latent_action.ActionEncoder(n_codes=CODES, n_latent_actions=4, context=4).to(META)
    tok_w = train_latent_action.gather(train_latent_action.pack(eps, META), idx, 4 + 2)
    backward(train_latent_action.stage_one_loss(lam, enc, tok_w, 4, 2, 0.5, torch.tensor([0.5, 0.5]), largs))


def test_take_gathers_windows_and_pads_before_the_start():
    packed = common.pack([torch.arange(5), torch.arange(10, 13)], "cpu")
    out = common.take(packed, torch.tensor([0, 1]), torch.tensor([-2, 0]), 3, fill=-1)
    assert out.tolist() == [[-1, -1, 0], [10, 11, 12]]
    assert common.take(packed, torch.tensor([0]), torch.tensor([2]), 3).tolist() == [[2, 3, 4]]


@pytest.mark.parametrize("kind", ["token", "latent"])
def test_worlds_step_on_meta(kind):
    """reset and step (at the argmax: a drawn frame asks the host which cells changed) on meta."""
    if kind == "token":
        tok = common.VQVAE(hidden=8, code_dim=16, n_codes=CODES, patch=True)
        dyn = common.make_dynamics("conv", n_codes=CODES, n_actions=ACTIONS, grid=GRID, memory=8, actions=2)
        wm = common.TokenWorld(tok, dyn, "rgb84x64", "ALE/Pong-v5", ["NOOP"] * ACTIONS, META, temperature=0.0)
        frames = torch.zeros(2, 4, 3, 84, 64, dtype=torch.uint8)
    else:
        tok = common.ConvAE(in_ch=1, size=(64, 64), stack=1, latent_dim=8, hidden=8, fc=16)
        wm = common.LatentWorld(tok, common.LatentMLP(8, ACTIONS, context=4), "gray64x64", "ALE/Pong-v5",
                                ["NOOP"] * ACTIONS, META)
        frames = torch.zeros(2, 4, 1, 64, 64, dtype=torch.uint8)
    wm.reset_batch(frames)
    for a in range(3):
        out = wm.step_batch([a, a])
    assert out.device == META and out.dtype == torch.uint8


# -----------------------------------------------------------------------------
# a device this machine lacks: one line, for every script

SCRIPTS = [("train_vqvae.py",), ("train_ae.py",), ("train_world.py",), ("train_latent_action.py",),
           ("train_agent.py",), ("play.py", "--gif", "x.gif"), ("bench.py", "world")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("script", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_missing_cuda_is_one_line(script, run_script, tmp_path):
    r = run_script(*script, "--device", "cuda")
    assert r.returncode != 0 and "Traceback" not in r.stderr, describe(r)
    assert r.stderr.strip().splitlines()[-1].startswith("error: --device cuda: CUDA is not available"), describe(r)


def test_unknown_device_is_one_line(run_script):
    r = run_script("train_world.py", "--device", "tpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr, describe(r)
    assert "not a device this kit runs on" in r.stderr.strip().splitlines()[-1], describe(r)


# -----------------------------------------------------------------------------
# torch.compile: graphs built once, never again; the MPS guard

def test_training_steps_compile_once():
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    counter = CompileCounter()
    dyn = common.make_dynamics("conv", n_codes=CODES, n_actions=ACTIONS, grid=GRID, memory=8, masked=True, actions=2)
    fwd = torch.compile(dyn, backend=counter)
    opt = torch.optim.AdamW(dyn.parameters())
    counts = []
    for step in range(4):
        hide = torch.rand(2, *GRID) < 0.5
        logits = fwd(torch.randint(CODES, (2, 4, *GRID)), torch.randint(ACTIONS, (2, 2)),
                     torch.randint(9, (2, *GRID)), torch.where(hide, CODES, torch.randint(CODES, (2, *GRID))))
        opt.zero_grad()
        logits.logsumexp(1).mean().backward()
        opt.step()
        counts.append(counter.frame_count)
    assert counts[0] >= 1 and counts[-1] == counts[0], counts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_dream_steps_compile_once(token_worlds, temperature):
    """World.compile in place: dreams stop compiling after their first steps (a drawn frame calls
    the model once with nothing decided and then with part of the frame decided: two graphs),
    and the state_dicts keep their keys."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    counter = CompileCounter()
    wm = common.load_world(str(token_worlds["heads"]), temperature=temperature)
    keys = list(wm.tok.state_dict()) + list(wm.dyn.state_dict())
    for m in (wm.dyn, wm.tok.decoder):
        common.compiled(m, "cpu", in_place=True, backend=counter)
    assert list(wm.tok.state_dict()) + list(wm.dyn.state_dict()) == keys  # no "_orig_mod."
    wm.reset_batch(torch.zeros(1, wm.context, 3, 84, 64, dtype=torch.uint8))
    counts = []
    for step in range(12):
        wm.step_batch([step % wm.n_actions])
        counts.append(counter.frame_count)
    assert counts[-1] == counts[5] and counts[0] >= 1, counts


def test_compile_on_old_torch_mps_is_one_line(monkeypatch, token_worlds, capsys):
    monkeypatch.setattr(torch, "__version__", "2.7.1")
    with pytest.raises(common.KitError, match="torch 2.8"):
        common.compiled(nn.Linear(2, 2), "mps")
    wm = common.load_world(str(token_worlds["heads"]))
    wm.device = torch.device("mps")  # what a Mac would have; the guard reads nothing else
    with pytest.raises(SystemExit) as e:
        common.run(wm.compile)
    assert e.value.code == 2 and capsys.readouterr().err.strip().startswith("error: --compile on mps needs torch 2.8")
    common.compiled(nn.Linear(2, 2), "cpu")  # a CPU is never refused
