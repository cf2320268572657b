"""train_ae.py -- the continuous tokenizer: frames -> one latent vector per frame (or stack).

The seed-000 autoencoder (84x84 gray -> 128-D) and the seed-004 VAE (4 stacked 64x64 gray
frames -> 64-D, beta 1e-4) in one net: four stride-2 convs, FC to the latent and back,
transposed-conv decoder. Logs reconstruction loss, validation PSNR and, on Pong, whether
the reconstruction keeps the ball; writes a real-vs-reconstruction PNG to assets/ and the
latent cache that train_world.py reads (data/<game>/latents.npz, keyed by this checkpoint).

Examples:
  python train_ae.py                                       # seed 000: data/pong -> checkpoints/pong/ae.pt
  python train_ae.py --kind vae --beta 1e-4 --latent-dim 64 --frame-space gray64x64 --stack 4   # seed 004 -> vae.pt
  python train_ae.py --resume --steps 1500                 # continue from --out
"""
import argparse
import os
import sys
import time

import imageio.v2 as imageio
import numpy as np
import torch
from tqdm import tqdm

import common

# -----------------------------------------------------------------------------
# flags

p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--data", default="data/pong", help="folder of episodes from collect.py")
p.add_argument("--out", default=None, help="checkpoint path (default: checkpoints/<data name>/<kind>.pt)")
p.add_argument("--kind", default="ae", choices=["ae", "vae"], help="plain autoencoder (seed 000) or VAE (seed 004)")
p.add_argument("--beta", type=float, default=1e-4, help="vae: weight of the KL term against the error summed over pixels (seed 004)")
p.add_argument("--latent-dim", type=int, default=128, help="size of the latent vector (seed 000: 128, seed 004: 64)")
p.add_argument("--frame-space", default="gray84x84", choices=list(common.FRAME_SPACES), help="preprocessing of raw frames")
p.add_argument("--stack", type=int, default=1, help="consecutive frames encoded into one latent, as channels (seed 004: 4)")
p.add_argument("--hidden", type=int, default=32, help="channels of the first conv; each of the 4 stages doubles them")
p.add_argument("--fc", type=int, default=512, help="width of the FC layer between the convs and the latent")
p.add_argument("--steps", type=int, default=800, help="optimizer steps")
p.add_argument("--batch", type=int, default=32, help="frames (or stacks) per batch")
p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
p.add_argument("--fg-weight", type=float, default=20.0,
               help="extra loss weight on pixels that differ from the median frame: the ball is 0.1%% of a Pong frame")
p.add_argument("--eval-every", type=int, default=100, help="validation and checkpoint every N steps")
p.add_argument("--val-frac", type=float, default=0.1, help="fraction of episodes held out (split by episode)")
p.add_argument("--seed", type=int, default=0, help="random seed")
p.add_argument("--device", default=None, help="cuda | mps | cpu (default: best available)")
p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on CUDA, not on CPU)")
p.add_argument("--resume", action="store_true", help="continue from --out with its optimizer and step")
p.add_argument("--skip-bad", action="store_true", help="skip unreadable episode files instead of stopping")
p.add_argument("--assets", default="assets", help="where the reconstruction PNG goes")


# -----------------------------------------------------------------------------

def stacks(eps, S):
    """Frames of all episodes in one tensor, and the start of every run of S frames that stays
    inside one episode: X[starts[:, None] + arange(S)] are the stacks."""
    X = torch.cat([ep["frames"] for ep in eps])
    ends = torch.tensor([len(ep["frames"]) for ep in eps]).cumsum(0)
    starts = torch.cat([torch.arange(e - len(ep["frames"]), e - S + 1) for e, ep in zip(ends.tolist(), eps)])
    return X, starts


def take(X, starts, S):
    return X[starts[:, None] + torch.arange(S)].flatten(1, 2)  # (B, S * C, H, W)


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
def evaluate(model, V, device, space, pong, batch=256):
    """Validation PSNR (dB, on [0, 255]), plain MSE on [0, 1] pixels (the seed-000 number) and,
    on Pong, the share of real frames with a ball whose reconstruction has it within 8 raw
    pixels (common.pong_objects): a blurry AE keeps the paddles and loses the ball first."""
    model.eval()
    mse, hit = [], []
    for i in range(0, len(V), batch):
        x = V[i:i + batch].to(device)
        rec = common.to_uint8(model(x)[0])
        mse.append(((rec.float() - x.float()) ** 2).mean((1, 2, 3)).cpu())
        if pong:
            for r, d in zip(x.cpu(), rec.cpu()):
                for fr, fd in zip(r.split(model.in_ch), d.split(model.in_ch)):
                    _, rb, rc = common.pong_objects(common.to_image(fr), space)
                    if rb is not None:
                        _, db, dc = common.pong_objects(common.to_image(fd), space)
                        hit.append(db is not None and np.hypot(db - rb, dc - rc) <= 8)
    model.train()
    mse = torch.cat(mse)
    psnr = (10 * torch.log10(255 ** 2 / mse.clamp_min(1e-3))).mean().item()
    return psnr, (mse / 255 ** 2).mean().item(), float(np.mean(hit)) if hit else float("nan")


def main():
    args = p.parse_args()
    common.seed_everything(args.seed)
    device = common.pick_device(args.device)
    name = os.path.basename(os.path.normpath(args.data))
    out = args.out or os.path.join("checkpoints", name, f"{args.kind}.pt")
    S = args.stack
    if S < 1 or args.latent_dim < 1:
        raise common.KitError("--stack and --latent-dim must be at least 1")

    # -------------------------------------------------------------------------
    # data: every run of S frames of the training episodes; validation = held-out episodes
    train, val, meta = common.load_dataset(args.data, args.frame_space, args.val_frac, args.seed, args.skip_bad)
    X, starts = stacks(train, S)
    VX, vstarts = stacks(val or train, S)
    if not len(starts) or not len(vstarts):
        raise common.KitError(f"episodes in {args.data} are shorter than --stack {S} frames")
    V = take(VX, vstarts[torch.linspace(0, len(vstarts) - 1, min(len(vstarts), 512)).long()], S)
    bg = X[torch.randperm(len(X))[:2000]].float().median(0).values.repeat(S, 1, 1)  # the static background
    print(f"data: {len(starts)} train {'stacks' if S > 1 else 'frames'} ({len(train)} episodes), {len(V)} val "
          f"({len(val)} episodes), {meta['game']}, {args.frame_space}, stack {S}")

    # -------------------------------------------------------------------------
    # model
    H, W, C = common.frame_shape(args.frame_space)
    model_args = dict(in_ch=C, size=(H, W), stack=S, latent_dim=args.latent_dim, hidden=args.hidden, fc=args.fc,
                      vae=args.kind == "vae")
    model = common.ConvAE(**model_args).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step, metrics = 0, {}
    if args.resume:
        ck = common.load_checkpoint(out, ("ae",))
        if ck["model_args"] != model_args or ck["frame_space"] != args.frame_space:
            raise common.KitError(f"--resume: {out} was trained with other model flags ({ck['model_args']})")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, metrics = ck["step"], ck.get("metrics", {})
        print(f"resumed {out} at step {step}")
    fwd = torch.compile(model) if args.compile else model
    os.makedirs(args.assets, exist_ok=True)
    png = os.path.join(args.assets, f"{name}_{args.kind}_recon.png")
    print(f"model: {args.kind}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}")

    def save():
        common.save_checkpoint(out, dict(
            kind="ae", model_args=model_args, model=model.state_dict(), optimizer=opt.state_dict(),
            frame_space=args.frame_space, game=meta["game"], action_meanings=meta["action_meanings"],
            step=step, args=vars(args), metrics=metrics))

    # -------------------------------------------------------------------------
    # loop
    g = torch.Generator().manual_seed(args.seed)
    bar = tqdm(total=args.steps, initial=step, desc=args.kind, unit="step")
    t0 = time.time()
    try:
        while step < args.steps:
            x = take(X, starts[torch.randint(len(starts), (args.batch,), generator=g)], S)
            w = 1 + args.fg_weight * ((x.float() - bg).abs() > 12).float()
            x, w = x.to(device), w.to(device)
            lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / args.steps))
            for group in opt.param_groups:
                group["lr"] = lr
            rec, _, kl = fwd(x)
            recon = (w * (rec - common.to_float(x)) ** 2).sum() / w.sum()
            # beta weighs the KL against the error summed over pixels, as in the ELBO; against the mean
            # it is 16384x stronger at 4x64x64, and the VAE collapsed to the mean frame (KL 0)
            loss = recon + args.beta * kl / x[0].numel()
            common.check_finite(loss, step, out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % args.eval_every == 0 or step == args.steps:
                psnr, mse, ball = evaluate(model, V, device, args.frame_space, meta["game"] == "ALE/Pong-v5")
                metrics = dict(recon=recon.item(), kl=kl.item(), val_psnr=psnr, val_mse=mse, ball_8px=ball)
                tqdm.write(f"step {step}: recon {recon.item():.5f}" + (f"  kl {kl.item():.2f}" if model.vae else "") +
                           f"  val PSNR {psnr:.2f} dB  val MSE {mse:.6f}  ball within 8 px {ball:.0%}")
                save()
                recon_grid(model, V, png, device)
            bar.update(1)
            bar.set_postfix(loss=f"{recon.item():.4f}")
    except KeyboardInterrupt:
        bar.close()
        save()
        print(f"interrupted at step {step}: checkpoint saved to {out} (continue with --resume)", file=sys.stderr)
        sys.exit(130)
    bar.close()

    # -------------------------------------------------------------------------
    # outputs: the latent cache (the reconstruction grid is written at every eval)
    files = common.episode_files(args.data)
    common.latent_cache(args.data, out, model, args.frame_space, device, meta["game"], args.skip_bad)
    print(f"trained {step} steps in {(time.time() - t0) / 60:.1f} min: val PSNR {metrics.get('val_psnr', float('nan')):.2f} dB, "
          f"val MSE {metrics.get('val_mse', float('nan')):.6f}; wrote {out}, {png} and the latent cache for {len(files)} episodes")


if __name__ == "__main__":
    common.run(main)
