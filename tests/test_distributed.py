"""torchrun on the CPU (gloo): two processes of batch B/2 take the step one process of batch B
takes, the VQ codebook moves by the global batch on every rank, and the trainers run under
`torchrun --nproc_per_node 2` with rank 0 alone logging and writing."""
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_VQ, describe

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Run by each rank under torchrun: the gradients and codebook of a VQ-VAE after one step on the
# rank's half of a fixed global batch, then after a dead-code reset drawn from the rank's own half.
RANK_SCRIPT = """
import sys, torch, torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
import common
rank, ranks, device = common.distributed("cpu")
torch.manual_seed(0)
model = common.VQVAE(in_ch=3, hidden=4, code_dim=8, n_codes=16)
x = torch.randint(0, 256, (8, 3, 84, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
mine = x[rank * 8 // ranks:(rank + 1) * 8 // ranks]
rec, idx, commit, z = model(mine)
loss = F.mse_loss(rec, common.to_float(mine)) + 0.25 * commit
loss.backward()
common.average_gradients(model.parameters(), ranks)
q = model.quantizer
out = dict(grads=[p.grad for p in model.parameters()], embed=q.embed.clone(), size=q.cluster_size.clone())
q.cluster_size[:8] = 0  # half the codes dead: each rank re-seeds them from its own z
q.reset_dead(z.detach() + rank)
out["reset"] = q.embed.clone()
torch.save(out, f"{sys.argv[2]}/rank{rank}.pt")
"""


def torchrun(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_two_ranks_of_half_a_batch_take_the_step_of_the_whole_batch(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    proc = torchrun(script, ROOT, tmp_path)
    assert proc.returncode == 0, describe(proc)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    import torch.nn.functional as F
    import common
    torch.manual_seed(0)
    model = common.VQVAE(in_ch=3, hidden=4, code_dim=8, n_codes=16)
    x = torch.randint(0, 256, (8, 3, 84, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    rec, idx, commit, z = model(x)
    (F.mse_loss(rec, common.to_float(x)) + 0.25 * commit).backward()
    for r in ranks:
        for mine, whole in zip(r["grads"], [p.grad for p in model.parameters()]):
            torch.testing.assert_close(mine, whole, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(r["embed"], model.quantizer.embed)  # EMA over the global batch
        torch.testing.assert_close(r["size"], model.quantizer.cluster_size)
    assert torch.equal(ranks[0]["reset"], ranks[1]["reset"])  # rank 0's re-seeded codes, on both
    assert not torch.equal(ranks[0]["reset"][:8], ranks[0]["embed"][:8])


@pytest.fixture
def data(pong_data, tmp_path):
    shutil.copytree(pong_data, tmp_path / "pong")
    return tmp_path / "pong"


def test_torchrun_trains_the_tokenizer_and_world_with_one_writer(data, tmp_path):
    vq, world = tmp_path / "vq.pt", tmp_path / "world.pt"
    proc = torchrun("train_vqvae.py", "--data", data, "--out", vq, "--assets", tmp_path, *TINY_VQ, "--workers", "1")
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.count("trained 6 steps") == 1 and proc.stdout.count("step 6: recon") == 1, describe(proc)
    assert torch.load(vq, weights_only=True)["step"] == 6
    proc = torchrun("train_world.py", "--data", data, "--tokenizer", vq, "--out", world, "--assets", tmp_path,
                    "--steps", "3", "--eval-every", "3", "--eval-windows", "4", "--gif-steps", "4", "--batch", "4")
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.count("trained 3 steps") == 1, describe(proc)
    ck = torch.load(world, weights_only=True)
    assert ck["step"] == 3 and ck["args"]["batch"] == 4  # the global batch, as one process would record it


def test_torchrun_trains_the_tokenizer_one_process_would(data, tmp_path, run_script):
    """Each rank trains on its slice of the global batch the one process draws, with the loss
    normalized over the whole batch: the two checkpoints differ by float rounding only."""
    flags = ("--data", data, "--assets", tmp_path, "--steps", "6", "--eval-every", "6", "--batch", "8",
             "--workers", "0", "--no-cache")
    one = run_script("train_vqvae.py", *flags, "--out", tmp_path / "one.pt")
    assert one.returncode == 0, describe(one)
    two = torchrun("train_vqvae.py", *flags, "--out", tmp_path / "two.pt")
    assert two.returncode == 0, describe(two)
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True)["model"] for n in ("one", "two"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5, msg=k)


def test_torchrun_refuses_a_batch_that_does_not_split(data, tmp_path):
    proc = torchrun("train_vqvae.py", "--data", data, "--out", tmp_path / "vq.pt", "--steps", "2", "--batch", "7")
    assert proc.returncode != 0
    assert "error: --batch 7 does not split over 2 processes: use a multiple of 2" in proc.stderr
    assert 'train_vqvae.py", line' not in proc.stderr  # one line, no traceback through the script


def test_torchrun_runs_both_stages_of_train_ae(data, tmp_path):
    proc = torchrun("train_ae.py", "--data", data, "--out", tmp_path / "ae.pt", "--world-out", tmp_path / "w.pt",
                    "--assets", tmp_path, "--steps", "2", "--eval-every", "2", "--batch", "4", "--dynamics-steps", "2",
                    "--dynamics-eval-every", "2", "--dynamics-batch", "4", "--eval-windows", "4", "--gif-steps", "4")
    assert proc.returncode == 0, describe(proc)
    assert torch.load(tmp_path / "w.pt", weights_only=True)["step"] == 2


def test_torchrun_trains_latent_actions_and_the_agent(token_worlds, tmp_path):
    proc = torchrun("train_latent_action.py", "--data", token_worlds["data"], "--tokenizer", token_worlds["vq"],
                    "--out", tmp_path / "lam.pt", "--assets", tmp_path, "--steps", "2", "--eval-every", "2",
                    "--batch", "4", "--map-steps", "2")
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.count("validation transitions, real action x latent action") == 1, describe(proc)
    proc = torchrun("train_agent.py", "--world", token_worlds["heads"], "--out", tmp_path / "agent.pt",
                    "--assets", tmp_path, "--total-steps", "32", "--envs", "4", "--rollout", "8",
                    "--eval-episodes", "1", "--eval-max-steps", "20", "--gif-steps", "4")
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.count("random policy, real game") == 1, describe(proc)
    assert torch.load(tmp_path / "agent.pt", weights_only=True)["step"] == 32


def test_bench_train_times_one_process_and_torchrun_and_leaves_the_data_alone(data, run_script):
    before = sorted(p.name for p in data.iterdir())
    r = run_script("bench.py", "train", "--data", data, "--steps", "2", timeout=300)
    assert r.returncode == 0, describe(r)
    rows = [line for line in r.stdout.splitlines() if line.startswith("| one process") or line.startswith("| torchrun")]
    assert len(rows) == 2 and all(" GB |" in row for row in rows), r.stdout
    assert sorted(p.name for p in data.iterdir()) == before  # no token cache written beside the episodes


@pytest.mark.parametrize("argv, env, message", [
    (("train_vqvae.py", "--workers", "-1"), {}, "argument --workers: must be 0 or more (an integer), got '-1'"),
    (("train_vqvae.py", "--steps", "1"), {"RANK": "0", "WORLD_SIZE": "2"}, "cannot join the torchrun process group"),
])
def test_bad_launch_is_one_line(data, tmp_path, argv, env, message):
    import os
    proc = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:], "--data", str(data), "--out",
                           str(tmp_path / "vq.pt")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("MASTER_")}, **env})
    assert proc.returncode == 2, describe(proc)
    assert message in proc.stderr and "Traceback" not in proc.stderr, describe(proc)
