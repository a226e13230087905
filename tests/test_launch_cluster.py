"""Every launch script on a real two-node cluster on this machine (tests/cluster.py): `make test-cluster`.

- launch/train.sh --hostfile: DeepSpeed's own PDSH runner over ssh to dtr-node-a / dtr-node-b;
- launch/torchrun.sh with NNODES=2: two invocations, NODE_RANK 0 and 1;
- launch/slurm.sbatch: `sbatch --nodes 2` on slurmctld + two slurmd, then `scontrol requeue` mid-run.
Each ends with weights bitwise equal to a single-node world-2 run of the same config and seed (the
expectation), and a killed or requeued run resumes from checkpoints/latest to those same weights.
- launch/slurm.sbatch again, `sbatch --nodes 2` requeued onto one node: it reshards to world 1 and ends within
1e-5 relative of a straight world-1 run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cluster import NODES, LoopbackCluster, free_port_on, missing_tools, wait_for
from distributed import REPO, launcher_env
from test_train_distributed import TINY, final_weights

pytestmark = [pytest.mark.cluster]

STEPS = 6
FINAL = f"step{STEPS:08d}"
OVERRIDES = [
    *TINY,
    f"train.max_steps={STEPS}",
    "train.checkpoint_every=2",
    "deepspeed.zero_stage=2",
    "eval.every=0",
]
CONFIG = "configs/demo-cpu.yaml"
MASTER = NODES["dtr-node-a"]
# What every rank needs, on any node: DeepSpeed's CPU accelerator, gloo on the loopback interface only, the
# hooks of tests/dtr_scale_testhooks.py through tests/cluster_site/sitecustomize.py.
RANK_ENV = {
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "GLOO_SOCKET_IFNAME": "lo",
    "HF_HUB_OFFLINE": "1",
    "DTR_TEST_HOOKS": "1",
    "DTR_TEST_CHECKSUM": "1",
}
HOOK_PATH = os.pathsep.join([str(REPO / "tests" / "cluster_site"), str(REPO / "tests"), str(REPO)])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_tools()
    if missing or os.geteuid() != 0:
        pytest.fail(f"the launch cluster needs root and {missing or 'its tools'}: run `make test-cluster`")
    c = LoopbackCluster(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield c
    finally:
        c.stop()


def train_overrides(run_dir: Path, manifest: Path) -> list[str]:
    return [f"run_dir={run_dir}", f"data.shards={manifest}", *OVERRIDES]


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A launcher in its own session, so that it and every process it starts can be killed together."""
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip


def kill_session(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run(command: list[str], env: dict[str, str], timeout: float = 420) -> subprocess.CompletedProcess:
    """Run a launch command to its end; on a timeout its whole session is killed and the output shown."""
    proc = start(command, env)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        pytest.fail(f"{command[:3]} did not finish in {timeout} s:\n{proc.stdout.read()[-4000:]}")
    finally:
        kill_session(proc)
    return subprocess.CompletedProcess(command, proc.returncode, output, "")


CHECKSUM = re.compile(r"rank (\d+): parameter checksum (-?\d+\.\d+(?:e[-+]?\d+)?) master (\S+)")


def checksums(output: str) -> dict[int, float]:
    """rank -> float64 parameter sum printed by each rank at the end (dtr_scale_testhooks)."""
    return {int(r): float(v) for r, v, _ in CHECKSUM.findall(output)}


def masters(output: str) -> set[str]:
    """The MASTER_ADDR every rank met the others at."""
    return {m for _, _, m in CHECKSUM.findall(output)}


def assert_same_weights(run_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    weights = final_weights(run_dir, FINAL)
    assert weights.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(weights[k], reference[k])]
    assert not different, (
        f"{run_dir}: {len(different)} tensors differ from the single-node run, e.g. {different[:3]}"
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, builtin_data) -> tuple[dict[str, torch.Tensor], dict[int, float]]:
    """Weights and checksums of the same config on one node, world 2 (launch/torchrun.sh, standalone)."""
    run_dir = tmp_path_factory.mktemp("single-node") / "run"
    env = {**launcher_env(), **RANK_ENV, "PYTHONPATH": HOOK_PATH}
    done = run(
        ["bash", "launch/torchrun.sh", "2", CONFIG, *train_overrides(run_dir, builtin_data["train"])], env
    )
    assert done.returncode == 0, done.stdout[-4000:]
    sums = checksums(done.stdout)
    assert sorted(sums) == [0, 1] and sums[0] == sums[1]
    return final_weights(run_dir, FINAL), sums


def test_deepspeed_hostfile_launch_trains_on_two_nodes_and_a_rerun_resumes(
    cluster, reference, builtin_data, tmp_path
):
    run_dir = tmp_path / "my run"  # a space: the override must reach the remote ranks as one argument
    port = free_port_on([MASTER])
    command = ["bash", "launch/train.sh", "--hostfile", str(cluster.hostfile), "--num_nodes", "2", "--num_gpus", "1",
               "--master_addr", MASTER, "--master_port", str(port), CONFIG,
               *train_overrides(run_dir, builtin_data["train"])]  # fmt: skip
    ds_env = tmp_path / "ds_env"  # DeepSpeed's .deepspeed_env: the variables it exports to every remote rank
    env = cluster.env({**RANK_ENV, "PYTHONPATH": HOOK_PATH, "DS_ENV_FILE": str(ds_env)})
    # First run: rank 0 (on dtr-node-a) dies after step 3, as a crashed node would; step 2 is checkpointed.
    ds_env.write_text("".join(f"{k}={v}\n" for k, v in {**RANK_ENV, "DTR_TEST_KILL_AFTER_STEP": "3"}.items()))
    crashed = run(command, env)
    assert crashed.returncode != 0, crashed.stdout[-4000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000002", crashed.stdout[-4000:]
    assert "dtr-node-a: " in crashed.stdout and "dtr-node-b: " in crashed.stdout
    # The same command again resumes from latest and trains to the end.
    ds_env.write_text("".join(f"{k}={v}\n" for k, v in RANK_ENV.items()))
    done = run(command, env)
    output = done.stdout
    assert done.returncode == 0, output[-4000:]
    assert "dtr-node-a: resumed from" in output and "at step 2" in output
    sums = checksums(output)
    assert sorted(sums) == [0, 1] and sums[0] == sums[1] == reference[1][0]  # both ranks, both nodes agree
    assert re.search(r"dtr-node-b: rank 1: parameter checksum", output)  # rank 1 ran on the second node
    assert masters(output) == {MASTER}  # both nodes met at --master_addr, not at an address DeepSpeed guessed
    assert_same_weights(run_dir, reference[0])


def test_torchrun_two_invocations_equal_the_single_node_run(reference, builtin_data, tmp_path):
    run_dir = tmp_path / "run"
    port = str(free_port_on([MASTER]))
    args = ["bash", "launch/torchrun.sh", "1", CONFIG, *train_overrides(run_dir, builtin_data["train"])]
    procs = []
    try:
        for node_rank in (1, 0):
            env = {**launcher_env(), **RANK_ENV, "PYTHONPATH": HOOK_PATH, "NNODES": "2",
                   "NODE_RANK": str(node_rank), "MASTER_ADDR": MASTER, "MASTER_PORT": port}  # fmt: skip
            procs.append(start(args, env))
        # Both must finish; one that fails ends the test at once (its partner would wait for it until the timeout).
        deadline = time.monotonic() + 420
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            kill_session(p)
    outputs = [p.stdout.read() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    node1, node0 = (checksums(o) for o in outputs)
    assert node0 == {0: reference[1][0]} and node1 == {1: reference[1][1]}  # NODE_RANK i holds global rank i
    assert_same_weights(run_dir, reference[0])


def job_state(cluster, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], env=cluster.env(), capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S+)", out.stdout))


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def run_requeued_job(cluster, tmp_path: Path, steps: list[str], *updates: str) -> tuple[dict[str, str], str]:
    """`sbatch --nodes 2 launch/slurm.sbatch` on the CPU nodes (the script's GPU defaults overridden on the
    command line, as on any CPU-only partition); once rank 0 holds after step 4 (its checkpoint written;
    tests/dtr_scale_testhooks.py), requeue it and wait for the job to end. Without `updates`: a plain
    `scontrol requeue` (what a preemption does), then StartTime=now; with them (e.g. NumNodes=1): `requeuehold`,
    `update`, `release`. Returns the job's final `scontrol show job` fields and its log (both attempts); the job
    is cancelled whatever happens, so a failed check cannot leave it holding the nodes for the next test."""
    held, log = tmp_path / "held", tmp_path / "job.out"
    hold = {"DTR_TEST_HOLD_AFTER_STEP": "4", "DTR_TEST_HOLD_MARK": str(held)}
    env = cluster.env({**RANK_ENV, **hold, "PYTHONPATH": HOOK_PATH, "NPROC_PER_NODE": "1"})
    submit = subprocess.run(["sbatch", "--parsable", "--nodes", "2", "--gpus-per-node=0", "--cpus-per-task=1",
                             f"--output={log}", "launch/slurm.sbatch", CONFIG, *steps],
                            cwd=REPO, env=env, capture_output=True, text=True)  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]

    def scontrol(*args: str) -> None:
        done = subprocess.run(["scontrol", *args], env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"scontrol {' '.join(args)}: {done.stderr}"

    try:
        wait_for(lambda: held.is_file() or job_state(cluster, job).get("JobState") in ENDED, 300,
                 "the job to hold after step 4", interval=1)  # fmt: skip
        text = log.read_text() if log.is_file() else "(no job log)"
        assert held.is_file() and "attempt 1: 2 nodes x 1" in text, (
            f"job {job} ended before step 4:\n{text[-3000:]}"
        )
        assert job_state(cluster, job)["JobState"] == "RUNNING", text[-3000:]
        scontrol("requeuehold" if updates else "requeue", job)
        wait_for(lambda: job_state(cluster, job).get("JobState") == "PENDING", 60, f"job {job} requeued",
                 interval=1)  # fmt: skip
        # StartTime=now: a requeued job is otherwise not eligible for another 2 minutes.
        scontrol("update", f"JobId={job}", *updates, "StartTime=now")
        if updates:
            scontrol("release", job)
        wait_for(lambda: job_state(cluster, job).get("JobState") in ENDED, 400,
                 f"job {job} to finish after its requeue", interval=1)  # fmt: skip
        return job_state(cluster, job), log.read_text()
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)  # a no-op once it has ended


def test_slurm_two_node_job_requeued_mid_run_resumes_to_the_same_weights(cluster, builtin_data, tmp_path):
    """`sbatch --nodes 2`, requeued mid-run: the job runs twice into one log, meets at the first node's NodeAddr
    both times, resumes from step 4 and ends bitwise equal to an uninterrupted run."""
    run_dir = tmp_path / "run"
    steps = [
        *train_overrides(run_dir, builtin_data["train"]),
        "train.max_steps=30",
        "train.checkpoint_every=2",
    ]
    state, text = run_requeued_job(cluster, tmp_path, steps)
    assert state["JobState"] == "COMPLETED", text[-4000:]
    assert (
        state["Restarts"] == "1" and "attempt 1:" in text and "attempt 2:" in text
    )  # ran twice, one log ...
    assert text.count(f"rendezvous {MASTER}:") == 2  # at the first node's NodeAddr, both times
    assert re.search(r"resumed from .* at step 4\n", text)  # ... and the second attempt resumed
    sums = checksums(text)
    # (c10d rendezvous: the workers' MASTER_ADDR is the elected agent's hostname, not the endpoint; the
    # endpoint is what the log line above checks.)
    assert sorted(sums) == [0, 1] and sums[0] == sums[1]
    straight = tmp_path / "straight"  # the same 30 steps on one node, uninterrupted
    done = run(["bash", "launch/torchrun.sh", "2", CONFIG,
                *[s.replace(str(run_dir), str(straight)) for s in steps]],
               {**launcher_env(), **RANK_ENV, "PYTHONPATH": HOOK_PATH})  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    a, b = final_weights(run_dir, "step00000030"), final_weights(straight, "step00000030")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_slurm_two_node_job_requeued_onto_one_node_reshards_and_finishes(cluster, builtin_data, tmp_path):
    """`sbatch --nodes 2`, requeued mid-run and brought back on one node: the unchanged batch script starts
    world 1, which reshards the world-2 checkpoint and finishes within 1e-5 relative of a straight world-1 run.

    Slurm 22.05 does not shrink a requeued job by itself (a `--nodes 1-2` job gets one node from the start,
    and one that also asks for 2 tasks waits for both nodes after a requeue), so the shrink is the
    administrator's: `scontrol requeuehold`, then `update NumNodes=1 NumTasks=1`, then `release`
    (docs/multi-node.md). The job's second attempt still has the first's SLURM_NTASKS=2 in its environment.
    """
    run_dir = tmp_path / "run"
    steps = [
        *train_overrides(run_dir, builtin_data["train"]),
        "train.max_steps=20",
        "train.checkpoint_every=2",
    ]
    state, text = run_requeued_job(cluster, tmp_path, steps, "NumNodes=1", "NumTasks=1")
    assert state["JobState"] == "COMPLETED" and state["NodeList"] == "dtr-node-a", text[-4000:]
    assert state["Restarts"] == "1" and "attempt 2: 1 nodes x 1" in text, text[-4000:]
    assert re.search(r"resharding step 4 from world 2 to world 1\n", text), text[-4000:]
    assert sorted(checksums(text.split("attempt 2:")[1])) == [0]  # one rank after the requeue, not two
    straight = tmp_path / "straight"  # the same 20 steps at world 1, uninterrupted
    done = run(["bash", "launch/torchrun.sh", "1", CONFIG, *[s.replace(str(run_dir), str(straight)) for s in steps]],
               {**launcher_env(), **RANK_ENV, "PYTHONPATH": HOOK_PATH})  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    wa, wb = final_weights(straight, "step00000020"), final_weights(run_dir, "step00000020")
    assert wa.keys() == wb.keys()
    a, b = (torch.cat([w[k].detach().double().flatten() for k in sorted(wa)]) for w in (wa, wb))
    relative = float((a - b).norm() / a.norm())
    print(f"requeued 2 -> 1 node vs straight world 1: relative weight difference {relative:.3g}")
    assert relative < 1e-5  # the same steps, up to the order of float reductions
