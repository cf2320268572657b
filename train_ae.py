"""train_ae.py -- the continuous path: frames -> one latent vector per frame, then the latent dynamics.

Stage one trains the autoencoder: the seed-000 AE (84x84 gray -> 128-D) or the seed-004 VAE
(4 stacked 64x64 gray frames -> 64-D, beta 1e-4): four stride-2 convs, FC to the latent and
back, transposed-conv decoder. It logs reconstruction loss, validation PSNR and, on Pong,
whether the reconstruction keeps the ball; writes a real-vs-reconstruction PNG to assets/ and
the latent cache (data/<game>/latents.npy + .json, keyed by the checkpoint).

Stage two trains the dynamics over those latents: an MLP on the last latents (seed 000) or a
GRU (seed 004), K-step rollouts fed back with their gradient, scheduled sampling, MSE on
standardized latents. It evaluates on frozen validation windows (latent MSE, action
sensitivity in pixels, and through the world-model contract the decoded PSNR next to
copy-last-frame and the Pong paddle and ball) and writes the world checkpoint and a
real | dream | difference GIF.

Examples:
  python train_ae.py                                       # seed 000: ae.pt + MLP -> world_ae.pt
  python train_ae.py --vae --beta 1e-4 --latent-dim 64 --frame-space gray64x64 --stack 4 --dynamics gru  # seed 004
  python train_ae.py --dynamics-steps 0                    # the autoencoder only
  python train_ae.py --resume --steps 1500                 # continue the autoencoder, then its dynamics
  torchrun --nproc_per_node 2 train_ae.py                  # 2 processes, same global batches
"""
import argparse
import os
import sys
import time

import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common

# -----------------------------------------------------------------------------
# flags

p = common.flags(__doc__)
p.add_argument("--data", default="data/pong", help="folder of episodes from collect.py")
p.add_argument("--out", default=None, help="autoencoder checkpoint (default: checkpoints/<data name>/ae.pt or vae.pt)")
p.add_argument("--vae", action="store_true", help="a VAE (seed 004) instead of a plain autoencoder (seed 000)")
p.add_argument("--beta", type=common.nonneg_float, default=1e-4,
               help="VAE: weight of the KL term against the error summed over pixels (seed 004)")
p.add_argument("--latent-dim", type=common.positive_int, default=128,
               help="size of the latent vector (seed 000: 128, seed 004: 64)")
p.add_argument("--frame-space", default="gray84x84", choices=list(common.FRAME_SPACES),
               help="preprocessing of raw frames")
p.add_argument("--stack", type=common.positive_int, default=1,
               help="consecutive frames encoded into one latent, as channels (seed 004: 4)")
p.add_argument("--hidden", type=common.positive_int, default=32,
               help="channels of the first conv; each of the 4 stages doubles them")
p.add_argument("--fc", type=common.positive_int, default=512,
               help="width of the FC layer between the convs and the latent")
p.add_argument("--steps", type=common.positive_int, default=800, help="autoencoder: optimizer steps")
p.add_argument("--batch", type=common.positive_int, default=32, help="autoencoder: frames (or stacks) per batch")
p.add_argument("--lr", type=common.positive_float, default=1e-3, help="autoencoder: AdamW learning rate")
p.add_argument("--fg-weight", type=common.nonneg_float, default=20.0,
               help="extra loss weight on pixels that differ from the median frame: the ball is 0.1%% of a Pong frame")
p.add_argument("--eval-every", type=common.positive_int, default=100,
               help="autoencoder: validation and checkpoint every N steps")
p.add_argument("--world-out", default=None,
               help="world checkpoint of stage two (default: checkpoints/<data name>/world_ae.pt or world_vae.pt)")
p.add_argument("--dynamics", default="mlp", choices=["mlp", "gru"],
               help="MLP on the last latents, concatenated (seed 000), or GRU (seed 004)")
p.add_argument("--dynamics-steps", type=common.nonneg_int, default=10000,
               help="dynamics: optimizer steps (0: stop after the autoencoder)")
p.add_argument("--dynamics-dim", type=common.positive_int, default=256,
               help="dynamics: MLP width, GRU hidden units (seed 004: 256)")
p.add_argument("--dynamics-batch", type=common.positive_int, default=64, help="dynamics: windows per batch")
p.add_argument("--dynamics-lr", type=common.positive_float, default=1e-3,
               help="dynamics: AdamW learning rate (cosine decay)")
p.add_argument("--dynamics-eval-every", type=common.positive_int, default=1000,
               help="dynamics: evaluate and checkpoint every N steps")
p.add_argument("--context", type=common.positive_int, default=4, help="dynamics: frames of history (at least --stack)")
p.add_argument("--heads", action=argparse.BooleanOptionalAction, default=True,
               help="dynamics: also learn each transition's reward (its sign) and whether it ends the episode, "
                    "from the latents around it: world.reward, world.terminated, DreamEnv")
p.add_argument("--event-share", type=common.probability, default=0.5,
               help="share of the heads' batch drawn from the transitions within 2 steps of a reward or an end "
                    "(Pong pays a point every ~70 steps: uniform batches would hardly ever show one)")
p.add_argument("--rollout", type=common.positive_int, default=3,
               help="dynamics: K, steps unrolled on its own predictions")
p.add_argument("--teacher-forcing", type=common.probability, default=0.5,
               help="dynamics: final probability of feeding the true latent (seed 004)")
p.add_argument("--discount", type=common.positive_float, default=0.7, help="dynamics: loss discount per rollout step")
p.add_argument("--pixel-loss", type=common.nonneg_float, default=0.0,
               help="dynamics: weight of an MSE on the newest frame, decoded by the frozen decoder")
p.add_argument("--eval-windows", type=common.positive_int, default=48,
               help="dynamics: frozen validation windows (each 30 steps)")
p.add_argument("--gif-steps", type=common.positive_int, default=48,
               help="dynamics: length of the real | dream | difference GIF")
p.add_argument("--val-frac", type=common.probability, default=0.1,
               help="fraction of episodes held out (split by episode)")
p.add_argument("--seed", type=int, default=0, help="random seed")
p.add_argument("--device", default=None, help="cuda | mps | cpu (default: best available)")
p.add_argument("--compile", action="store_true", help="torch.compile the autoencoder (pays off on CUDA, not on CPU)")
p.add_argument("--resume", action="store_true",
               help="continue each stage from its checkpoint (--out, --world-out) where there is one")
p.add_argument("--workers", type=common.nonneg_int, default=common.STREAM_WORKERS,
               help="autoencoder: processes that read and preprocess episodes beside training (0: in this one; "
                    "default: a quarter of the cores, at most 4)")
p.add_argument("--skip-bad", action="store_true", help="skip unreadable episode files instead of stopping")
p.add_argument("--assets", default="assets", help="where the reconstruction PNG and the dream GIF go")
common.renamed(p, "--kind", "--vae", type=lambda kind: kind == "vae")  # --kind ae|vae


# -----------------------------------------------------------------------------
# stage one: the autoencoder

@torch.no_grad()
def recon_grid(model, V, path, device):
    """8 validation frames, real on top, reconstruction below, 3x upscaled; with stacked
    frames, every frame of 8 / stack stacks."""
    model.eval()
    x = V[torch.linspace(0, len(V) - 1, max(1, 8 // model.stack)).long()].to(device)
    rec = common.to_uint8(model(x)[0])
    model.train()
    split = lambda t: [f for s in t.cpu() for f in s.split(model.in_ch)][:8]
    grid = np.concatenate([np.concatenate([common.to_image(f) for f in split(t)], 1) for t in (x, rec)], 0)
    imageio.imwrite(path, grid.repeat(3, 0).repeat(3, 1))


@torch.no_grad()
def evaluate_ae(model, V, device, space, pong, batch=256):
    """Validation PSNR (dB, on [0, 255]), plain MSE on [0, 1] pixels (the seed-000 number) and,
    on Pong, the share of real frames with a ball whose reconstruction has it within 8 raw
    pixels (common.pong_objects): a blurry AE keeps the paddles and loses the ball first."""
    model.eval()
    mse, hit = [], []
    for x in V.split(batch):
        x = x.to(device)
        rec = common.to_uint8(model(x)[0])
        mse.append(common.frame_mse(rec, x).cpu())
        if pong:
            frames = lambda t: t.cpu().reshape(-1, model.in_ch, *t.shape[2:])  # every frame of every stack
            hit.append(common.pong_scores(frames(rec), frames(x), space, 0)["ball_8px@0"])
    model.train()
    mse = torch.cat(mse)
    ball = float(np.nanmean(hit)) if hit else float("nan")
    return common.psnr(mse).mean().item(), (mse / 255 ** 2).mean().item(), ball


def train_autoencoder(args, out, name, device, rank, ranks):
    """Stage one: train (or continue) the autoencoder at `out`, write its PNG and the latent cache."""
    S, rank_batch = args.stack, common.per_rank(args.batch, ranks)
    train, val, meta = common.scan_dataset(args.data, args.val_frac, args.seed, args.skip_bad)
    if not any(n >= S for _, n in train) or not any(n >= S for _, n in val or train):
        raise common.KitError(f"episodes in {args.data} are shorter than --stack {S} frames")
    V = common.frame_runs(val or train, args.frame_space, 512, S).flatten(1, 2)  # stacks: S frames as channels
    bg = common.background(train, args.frame_space, args.seed).repeat(S, 1, 1).to(device)
    # every rank reads the same stream of global batches and trains on its slice: the run is the one
    # process's, whatever the number of ranks (up to float rounding; a VAE draws its own noise)
    stream = common.frame_stream(train, args.frame_space, args.batch, S, args.workers, args.seed, args.skip_bad)
    mine = slice(rank * rank_batch, (rank + 1) * rank_batch)
    print(f"data: {sum(n - S + 1 for _, n in train if n >= S)} train {'stacks' if S > 1 else 'frames'} ({len(train)} "
          f"episodes, streamed by {args.workers} workers), {len(V)} val ({len(val)} episodes), {meta['game']}, "
          f"{args.frame_space}, stack {S}")
    H, W, C = common.frame_shape(args.frame_space)
    model_args = dict(in_ch=C, size=(H, W), stack=S, latent_dim=args.latent_dim, hidden=args.hidden, fc=args.fc,
                      vae=args.vae)
    model = common.ConvAE(**model_args).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step, metrics = 0, {}
    if args.resume and os.path.exists(out):
        _, step, metrics = common.resume(out, "ae", model, opt, model_args=model_args, frame_space=args.frame_space)
    fwd = common.compiled(model, device) if args.compile else model
    os.makedirs(args.assets, exist_ok=True)
    png = os.path.join(args.assets, f"{name}_{'vae' if args.vae else 'ae'}_recon.png")
    print(f"model: {'vae' if args.vae else 'ae'}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters on {device}")

    watch = common.LossWatch()

    def save():
        watch.check(out)  # a NaN is never saved over the last good checkpoint
        if rank:  # one writer
            return
        common.save_checkpoint(out, dict(
            kind="ae", model_args=model_args, model=model.state_dict(), optimizer=opt.state_dict(),
            frame_space=args.frame_space, game=meta["game"], action_meanings=meta["action_meanings"],
            step=step, args=vars(args), metrics=metrics))

    bar = tqdm(total=args.steps, initial=min(step, args.steps), desc="vae" if args.vae else "ae", unit="step")
    t0 = time.time()
    try:
        while step < args.steps:
            x = next(stream)[mine].flatten(1, 2).to(device)  # S frames as channels, oldest first
            w = 1 + args.fg_weight * ((x.float() - bg).abs() > 12).float()
            # a 200-step warmup, not 50: after 50, some orders of the batches sat ~500 steps at the mean
            # frame (ball 0%); after 200, all 4 orders tried left it by step 300
            lr = args.lr * min(1.0, (step + 1) / min(200, args.steps // 4 + 1)) * (0.1 + 0.9 * (1 - step / args.steps))
            for group in opt.param_groups:
                group["lr"] = lr
            rec, _, kl = fwd(x)
            # normalized by the global batch's weight: the ranks' mean gradient is the whole batch's
            recon = (w * (rec - common.to_float(x)) ** 2).sum() * ranks / common.all_sum(w.sum(), ranks)
            # beta weighs the KL against the error summed over pixels, as in the ELBO; against the mean
            # it is 16384x stronger at 4x64x64, and the VAE collapsed to the mean frame (KL 0)
            loss = recon + args.beta * kl / x[0].numel()
            read = watch(loss, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            common.average_gradients(model.parameters(), ranks)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update(1)
            if read:  # the loss leaves the device every few steps, not every step
                watch.check(out)
                bar.set_postfix(loss=f"{recon.item():.4f}")
            if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
                psnr, mse, ball = evaluate_ae(model, V, device, args.frame_space, meta["game"] == "ALE/Pong-v5")
                metrics = dict(recon=recon.item(), kl=kl.item(), val_psnr=psnr, val_mse=mse, ball_8px=ball)
                tqdm.write(f"step {step}: recon {recon.item():.5f}" + (f"  kl {kl.item():.2f}" if args.vae else "") +
                           f"  val PSNR {psnr:.2f} dB  val MSE {mse:.6f}  ball within 8 px {ball:.0%}")
                save()
                recon_grid(model, V, png, device)
    except KeyboardInterrupt:
        bar.close()
        save()
        print(f"interrupted at step {step}: checkpoint saved to {out} (continue with --resume)", file=sys.stderr)
        sys.exit(130)
    bar.close()
    stream.close()  # its workers and their frames go before the cache is written
    common.rank_zero_first(rank, lambda: common.latent_cache(args.data, out, model, args.frame_space, device,
                                                             meta["game"], args.skip_bad, read=False))
    print(f"autoencoder: {step} steps ({(time.time() - t0) / 60:.1f} min this run), val PSNR "
          f"{metrics.get('val_psnr', float('nan')):.2f} dB, val MSE {metrics.get('val_mse', float('nan')):.6f}; "
          f"wrote {out}, {png} and the latent cache")


# -----------------------------------------------------------------------------
# stage two: the dynamics over the latents. Latent j encodes frames j .. j + stack - 1, so the
# action that takes latent j to j + 1 is actions[j + stack - 1], and a window of T + H latents
# from j is the window of T + stack - 1 + H frames from j: the same frames as the token path's.

def latent_batch(eps, idx, T, K, S, device):
    """history (B, T, D), actions (B, K), targets (B, K, D) of the windows idx."""
    z = torch.stack([eps[i]["latents"][s:s + T + K] for i, s in idx]).to(device)
    act = torch.stack([eps[i]["actions"][s + T + S - 2:s + T + S - 2 + K] for i, s in idx]).to(device)
    return z[:, :T], act, z[:, T:]


def latent_loss(dyn, decode, hist, act, tgt, tf, disc, pixel):
    """K steps with scheduled sampling, each prediction fed back with its gradient (there is no
    argmax to cut it), so the loss at step k also trains the steps that led there. MSE on
    standardized latents, plus `pixel` x MSE of the decoded newest frame against the decoding
    of the true latent (no frames needed: the decoder is frozen and cannot beat that anyway)."""
    loss, h = 0.0, None
    for k in range(len(disc)):
        pred, h = dyn(hist, act[:, k], h)
        err = (((pred - tgt[:, k]) / dyn.scale) ** 2).mean()
        if pixel:
            with torch.no_grad():
                want = decode(tgt[:, k])
            err = err + pixel * F.mse_loss(decode(pred), want)
        loss = loss + disc[k] * err
        keep = torch.rand(len(hist), 1, device=hist.device) < tf
        hist = torch.cat([hist[:, 1:], torch.where(keep, tgt[:, k], pred)[:, None]], 1)
    return loss


@torch.no_grad()
def evaluate_dynamics(wm, val, fixed, T, S, outcomes=True):
    """Standardized latent MSE at 1, 5 and 10 steps (and at 1 step that of copying the last
    latent); action_px: pixels of the decoded 1-step prediction that move by more than 25 of
    255 when only the action changes, averaged over action pairs (0: the action is ignored);
    then common.open_loop through the world: decoded PSNR next to copy-last-frame, Pong objects;
    with `outcomes`, the heads' reward and end events (common.outcome_scores: every validation
    step from real frames, each encoded anew: longer than 1000 steps here, so at the end only)."""
    dyn, H = wm.dyn.eval(), max(common.HORIZONS)
    hist, act, tgt = latent_batch(val, fixed, T, H, S, wm.device)
    err = lambda z, k: (((z - tgt[:, k]) / dyn.scale) ** 2).mean().item()
    m = {"latent_mse": err(dyn(hist, act[:, 0])[0], 0), "copy_latent_mse": err(hist[:, -1], 0)}
    decoded = [common.to_uint8(wm.tok.decode(dyn(hist, torch.full_like(act[:, 0], a))[0], last=True)).int()
               for a in range(dyn.n_actions)]
    diff = [((decoded[i] - decoded[j]).abs() > 25).flatten(1).sum(1).float().mean()
            for i in range(dyn.n_actions) for j in range(i + 1, dyn.n_actions)]
    m["action_px"] = torch.stack(diff).mean().item() if diff else 0.0
    z, h = hist, None
    for k in range(10):
        nxt, h = dyn(z, act[:, k], h)
        z = torch.cat([z[:, 1:], nxt[:, None]], 1)
        if k + 1 in (5, 10):
            m[f"latent_mse@{k + 1}"] = err(nxt, k)
    frames = torch.stack([val[i]["frames"][s:s + T + S - 1 + H] for i, s in fixed])
    actions = torch.stack([val[i]["actions"][s + T + S - 2:s + T + S - 2 + H] for i, s in fixed])
    m.update(common.open_loop(wm, frames, actions))
    if wm.heads is not None and outcomes:
        wm.heads.eval()
        m.update(common.outcome_scores(wm, val))
        wm.heads.train()
    dyn.train()
    return m


def train_dynamics(args, ae_path, out, name, device, rank, ranks):
    """Stage two: latent dynamics over the autoencoder at ae_path, written to `out`."""
    ae, ack = common.load_tokenizer(ae_path, ("ae",))
    S, T, K, H = ae.stack, args.context - ae.stack + 1, args.rollout, max(common.HORIZONS)
    if T < 1:
        raise common.KitError(f"--context {args.context} is shorter than the stack of {ae_path}: each latent "
                              f"encodes {S} frames, so the world needs at least {S} frames of history")
    ae_key, space, meanings = common.file_key(ae_path), ack["frame_space"], ack["action_meanings"]
    latents = common.latent_cache(args.data, ae_path, ae, space, device, ack["game"], args.skip_bad)
    train, val = common.coded_episodes(args.data, latents, "latents", space, args.val_frac, args.seed)
    pool = common.windows([len(ep["latents"]) for ep in train], T + K)
    vpool = common.windows([len(ep["latents"]) for ep in val], T + H)
    if not len(pool) or not len(vpool):
        raise common.KitError(f"episodes in {args.data} are shorter than context + {max(K, H)} frames")
    rng = np.random.default_rng(1234)  # frozen eval indices (seed 003's gold eval)
    fixed = vpool[np.sort(rng.choice(len(vpool), min(args.eval_windows, len(vpool)), replace=False))]
    print(f"data: {sum(len(e['actions']) for e in train)} train transitions ({len(train)} episodes), "
          f"{len(val)} val episodes, {len(fixed)} frozen eval windows; {ae.latent_dim}-D latents of {S} frame(s)")

    model_args = dict(arch=args.dynamics, latent_dim=ae.latent_dim, n_actions=len(meanings), context=T,
                      hidden=args.dynamics_dim)
    dyn = common.make_dynamics(**model_args).to(device)
    heads_args = dict(latent_dim=ae.latent_dim, stack=S, frames=min(3, T + 1)) if args.heads else None
    with torch.random.fork_rng(devices=[]):  # the heads draw from their own streams: the dynamics train
        torch.manual_seed(args.seed + 1)  # exactly as they would without them
        heads = common.LatentOutcome(**heads_args).to(device) if args.heads else None
    ae = ae.to(device).requires_grad_(False)  # frozen: a pixel loss trains the dynamics only
    z = torch.cat([ep["latents"] for ep in train]).to(device)
    for net in (dyn, heads) if heads else (dyn,):  # the same statistics for both
        net.standardize_with(z)
    del z
    opt = torch.optim.AdamW(list(dyn.parameters()) + list(heads.parameters() if heads else []),
                            lr=args.dynamics_lr, weight_decay=0.01)
    step, metrics = 0, {}
    if args.resume and os.path.exists(out):
        ck, step, metrics = common.resume(out, "world", dyn, opt, model_args=model_args, tokenizer_key=ae_key,
                                          heads_args=heads_args)
        if heads:
            heads.load_state_dict(ck["heads"])
    wm = common.LatentWorld(ae, dyn, space, ack["game"], meanings, device)
    wm.heads = heads
    decode = lambda z: ae.decode(z, last=True)
    print(f"model: {args.dynamics}, {sum(p.numel() for p in dyn.parameters()) / 1e6:.2f}M parameters on {device}")

    watch = common.LossWatch()

    def save():
        watch.check(out)  # a NaN is never saved over the last good checkpoint
        if rank:  # one writer
            return
        common.save_checkpoint(out, dict(
            kind="world", model_args=model_args, model=dyn.state_dict(), optimizer=opt.state_dict(),
            tokenizer_kind="ae", tokenizer_args=ack["model_args"], tokenizer=ae.state_dict(), tokenizer_path=ae_path,
            tokenizer_key=ae_key, frame_space=space, game=ack["game"], action_meanings=meanings,
            step=step, args=vars(args), metrics=metrics,
            **({"heads_args": heads_args, "heads": heads.state_dict()} if heads else {})))

    g = np.random.default_rng(args.seed + rank)  # each rank its own draws
    g_heads = np.random.default_rng((args.seed % 2 ** 32, rank, 1))  # and the heads theirs: g draws as without them
    if heads:  # the heads' transitions, and the rare ones that pay or end; episodes on the device once
        transitions, events, _ = (torch.as_tensor(rows, device=device) for rows in
                                  common.outcome_transitions(train, heads.frames + S - 3))
        coded = {k: common.pack([ep[k] for ep in train], device) for k in ("latents", "rewards", "terminated")}
    rank_batch = common.per_rank(args.dynamics_batch, ranks, "--dynamics-batch")
    disc = torch.tensor([args.discount ** k for k in range(K)])
    disc = disc / disc.sum()  # normalized discounted loss (seed 003)
    bar = tqdm(total=args.dynamics_steps, initial=min(step, args.dynamics_steps), desc="dynamics", unit="step")
    t0 = time.time()
    try:
        while step < args.dynamics_steps:
            frac = step / args.dynamics_steps
            lr = float(args.dynamics_lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * frac)))
            for group in opt.param_groups:
                group["lr"] = lr
            tf = max(args.teacher_forcing, 1 - frac / 0.3)  # from 1 to its floor over the first 30%
            idx = [pool[i] for i in g.integers(len(pool), size=rank_batch)]
            hist, act, tgt = latent_batch(train, idx, T, K, S, device)
            loss = latent_loss(dyn, decode, hist, act, tgt, tf, disc, args.pixel_loss)
            if heads:
                loss = loss + common.outcome_loss(heads, coded, transitions, events, g_heads, 2 * rank_batch,
                                                   args.event_share)
            read = watch(loss, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            common.average_gradients(opt.param_groups[0]["params"], ranks)
            torch.nn.utils.clip_grad_norm_(dyn.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update(1)
            if read:  # the loss leaves the device every few steps, not every step
                watch.check(out)
                bar.set_postfix(loss=f"{loss.item():.4f}", tf=f"{tf:.2f}")
            if rank == 0 and (step % args.dynamics_eval_every == 0 or step == args.dynamics_steps):
                metrics = evaluate_dynamics(wm, val, fixed, T, S, outcomes=step == args.dynamics_steps)
                tqdm.write(f"step {step}: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
                save()
    except KeyboardInterrupt:
        bar.close()
        save()
        print(f"interrupted at step {step}: checkpoint saved to {out} (continue with --resume)", file=sys.stderr)
        sys.exit(130)
    bar.close()
    if rank:
        return

    os.makedirs(args.assets, exist_ok=True)
    gif = os.path.join(args.assets, f"{name}_dream_{'vae' if ae.vae else 'ae'}.gif")
    i, s = common.busiest([ep["frames"] for ep in val], wm.context + args.gif_steps)
    n = min(args.gif_steps, len(val[i]["actions"]) - s - wm.context + 1)
    common.dream_gif(wm, val[i]["frames"][s:s + wm.context + n], val[i]["actions"][s + wm.context - 1:][:n], gif)
    print(f"dynamics: {step} steps ({(time.time() - t0) / 60:.1f} min this run); wrote {out} and {gif}")
    print("PSNR dream vs copy-last-frame: " + "  ".join(
        f"@{h} {metrics[f'psnr@{h}']:.2f}/{metrics[f'copy_psnr@{h}']:.2f}" for h in common.HORIZONS))


# -----------------------------------------------------------------------------

def main():
    args = p.parse_args()
    common.seed_everything(args.seed)
    rank, ranks, device = common.distributed(args.device)  # torchrun: one process per rank
    name = os.path.basename(os.path.normpath(args.data))
    kind = "vae" if args.vae else "ae"
    out = args.out or os.path.join("checkpoints", name, f"{kind}.pt")
    world_out = args.world_out or os.path.join("checkpoints", name, f"world_{kind}.pt")
    if args.context < args.stack:
        raise common.KitError(f"--context {args.context} is shorter than --stack {args.stack}: each latent encodes "
                              f"{args.stack} frames, so the world needs at least {args.stack} frames of history")
    common.per_rank(args.dynamics_batch, ranks, "--dynamics-batch")  # refused before stage one, not after it
    train_autoencoder(args, out, name, device, rank, ranks)
    if args.dynamics_steps > 0:
        train_dynamics(args, out, world_out, name, device, rank, ranks)


if __name__ == "__main__":
    common.run(main)
