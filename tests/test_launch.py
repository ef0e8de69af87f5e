"""The launch scripts' --dry-run output: every printed command is read back with shlex and
checked (flags, order, quoting); remote scripts pass `bash -n`; the SLURM task line is run
against a stand-in `vlm-jax` to see the argv each process really gets. Needs bash, not gcloud
or SLURM."""
import json
import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the launch scripts need bash")

TPU_ARGS = ["--name", "vlm-t1", "--zone", "us-central2-b", "--accelerator-type", "v4-16",
            "--config", "configs/tiny.py:phase=align", "--workdir", "gs://my-bucket/runs/a 1"]
# An override with a space and a quote: survives two rounds of shell quoting only if done right.
TRICKY = "--config.train.phase.name=it's a b"


def _run(script, args, env=None):
    return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=60)


def _commands(stdout, prefix="+ "):
    """Printed commands as argv lists (a trailing `# comment` is dropped by shlex)."""
    return [shlex.split(line[len(prefix):], comments=True)
            for line in stdout.splitlines() if line.startswith(prefix)]


def _flag(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def _remote_steps(argv):
    """The `--command` script of a `tpu-vm ssh`: syntax-checked, split into its steps."""
    script = _flag(argv, "--command")
    check = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert check.returncode == 0, (script, check.stderr)
    assert script.startswith("set -e; ")
    return script


def test_tpu_pod_dry_run_creates_installs_trains_deletes():
    result = _run("tpu_pod.sh", ["--dry-run", *TPU_ARGS, "--", "--config.train.steps=10", TRICKY])
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    kinds = [" ".join(argv[:4]) for argv in commands]
    assert kinds == ["gcloud compute tpus tpu-vm", "git -C " + ROOT + " archive",
                     "gcloud compute tpus tpu-vm", "gcloud compute tpus tpu-vm",
                     "gcloud compute tpus tpu-vm", "gcloud compute tpus tpu-vm"]
    create, archive, scp, install, train, delete = commands
    assert create[4:6] == ["create", "vlm-t1"]
    assert _flag(create, "--zone") == "us-central2-b"
    assert _flag(create, "--accelerator-type") == "v4-16"
    assert _flag(create, "--version") == "tpu-ubuntu2204-base"  # the v4 default
    tarball = archive[archive.index("-o") + 1]
    assert archive[-1] == "HEAD"  # the committed code
    assert scp[4:7] == ["scp", tarball, "vlm-t1:vlm_jax.tar.gz"] and "--worker=all" in scp
    for ssh in (install, train):
        assert ssh[4:6] == ["ssh", "vlm-t1"] and "--worker=all" in ssh
        assert _flag(ssh, "--zone") == "us-central2-b"
    install_script = _remote_steps(install)
    assert "tar -xzf ~/vlm_jax.tar.gz -C ~/vlm_jax" in install_script
    assert "-e ~/vlm_jax 'jax[tpu]'" in install_script
    train_script = _remote_steps(train)
    assert "gcsfuse --implicit-dirs --rename-dir-limit=200000 my-bucket ~/gcs/my-bucket" \
        in train_script
    train_step = train_script.split("; ")[-1]
    assert train_step.startswith("PATH=~/vlm_jax_venv/bin:$PATH exec vlm-jax train ")
    # What the worker's shell will hand to vlm-jax (after its own quote removal):
    argv = shlex.split(train_step.split(" exec ", 1)[1])
    assert argv == ["vlm-jax", "train", "--config", "configs/tiny.py:phase=align",
                    "--config.train.steps=10", TRICKY, "--workdir", "~/gcs/my-bucket/runs/a 1"]
    assert delete[4:6] == ["delete", "vlm-t1"] and "--quiet" in delete


def test_tpu_pod_queued_spot_and_keep_existing():
    result = _run("tpu_pod.sh", ["--dry-run", *TPU_ARGS[:4], "--accelerator-type", "v5p-64",
                                 *TPU_ARGS[6:], "--queued", "--spot", "--project", "p1"])
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    create, poll, delete = commands[0], commands[1], commands[-1]
    assert create[3:6] == ["queued-resources", "create", "vlm-t1"]
    assert _flag(create, "--node-id") == "vlm-t1"
    assert _flag(create, "--runtime-version") == "v2-alpha-tpuv5"  # the v5p default
    assert "--spot" in create and _flag(create, "--project") == "p1"
    assert poll[3:5] == ["queued-resources", "describe"]
    assert _flag(poll, "--format") == "value(state.state)"
    assert delete[3:5] == ["queued-resources", "delete"] and "--force" in delete
    assert all(_flag(c, "--project") == "p1" for c in commands if c[0] == "gcloud")

    kept = _commands(_run("tpu_pod.sh", ["--dry-run", *TPU_ARGS, "--keep"]).stdout)
    assert kept[0][4] == "create" and not any("delete" in c for c in kept)
    existing = _commands(_run("tpu_pod.sh", ["--dry-run", *TPU_ARGS, "--existing"]).stdout)
    assert not any(c[4] in ("create", "delete") for c in existing if c[0] == "gcloud")
    assert existing[-1][4] == "ssh"


@pytest.mark.parametrize("change, message", [
    ({"--workdir": "/local/runs"}, "--workdir must be gs://BUCKET/PATH"),
    ({"--workdir": "gs://bucket-only"}, "needs a path inside the bucket"),
    ({"--zone": None}, "missing --zone"),
    ({"--accelerator-type": "v9-8"}, "no default --runtime-version"),
])
def test_tpu_pod_refuses_bad_arguments(change, message):
    args = dict(zip(TPU_ARGS[::2], TPU_ARGS[1::2]))
    args.update(change)
    flat = [x for k, v in args.items() if v is not None for x in (k, v)]
    result = _run("tpu_pod.sh", ["--dry-run", *flat])
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stdout == ""


def test_slurm_submit_dry_run_and_what_each_task_runs(tmp_path):
    train_args = ["--config", "configs/tiny.py", "--workdir", "/shared/runs/r1", TRICKY]
    result = _run("slurm_submit.sh", ["--dry-run", "--nodes", "3", "--partition", "gpu",
                                      "--", *train_args])
    assert result.returncode == 0, result.stderr
    sbatch, srun = _commands(result.stdout)
    assert sbatch[0] == "sbatch"
    assert _flag(sbatch, "--nodes") == "3" and _flag(sbatch, "--ntasks-per-node") == "1"
    assert _flag(sbatch, "--gpus-per-node") == "8" and _flag(sbatch, "--partition") == "gpu"
    script = sbatch.index(os.path.join(ROOT, "launch", "slurm_gpu.sbatch"))
    assert sbatch[script + 1:] == train_args
    assert srun[0] == "srun" and _flag(srun, "--ntasks-per-node") == "1"
    assert _flag(srun, "--nodes") == "3" and "--kill-on-bad-exit=1" in srun

    tasks = [shlex.split(line.split(": ", 1)[1]) for line in result.stdout.splitlines()
             if line.startswith("task ")]
    assert len(tasks) == 3
    for i, task in enumerate(tasks):
        assert task[0].endswith("/.venv/bin/vlm-jax") and task[1] == "train"
        assert task[2:6] == train_args[:4] and TRICKY in task
        assert task[-6:] == ["--coordinator", "node0:8476", "--num-processes", "3",
                             "--process-id", str(i)]

    # Run srun's `bash -c TASK ...` as SLURM would start task 2, with a stand-in vlm-jax.
    fake_bin = tmp_path / "venv" / "bin"
    fake_bin.mkdir(parents=True)
    (fake_bin / "vlm-jax").write_text(
        "#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    (fake_bin / "vlm-jax").chmod(0o755)
    bash_c = srun[srun.index("bash"):]
    ran = subprocess.run(bash_c, capture_output=True, text=True, timeout=30, env={
        **os.environ, "VLM_JAX_VENV": str(tmp_path / "venv"), "SLURM_NTASKS": "3",
        "SLURM_PROCID": "2", "VLM_JAX_COORDINATOR": "node0:8476"})
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout) == ["train", *train_args, "--coordinator", "node0:8476",
                                      "--num-processes", "3", "--process-id", "2"]


def test_sbatch_script_reads_the_allocation():
    env = {"SLURM_JOB_NODELIST": "gpu[07-09,12]", "SLURM_NNODES": "4", "VLM_JAX_DRY_RUN": "1",
           "VLM_JAX_PORT": "9999", "PATH": "/usr/bin:/bin"}  # no scontrol: the fallback parser
    result = _run("slurm_gpu.sbatch", ["--config", "c.py", "--workdir", "/w"], env)
    assert result.returncode == 0, result.stderr
    tasks = [line for line in result.stdout.splitlines() if line.startswith("task ")]
    assert len(tasks) == 4 and tasks[3].endswith(
        "--coordinator gpu07:9999 --num-processes 4 --process-id 3")
    missing = _run("slurm_gpu.sbatch", ["--config", "c.py"], {"SLURM_JOB_NODELIST": ""})
    assert missing.returncode != 0 and "run this under sbatch" in missing.stderr


def test_local_dry_run_keeps_the_recipe_arguments():
    result = _run("local.sh", ["--workdir", "/tmp/shapes run", "--dry-run", "--steps", "3"])
    assert result.returncode == 0, result.stderr
    setup, cd, recipe = _commands(result.stdout)
    assert setup == ["bash", os.path.join(ROOT, "launch", "setup_env.sh")]
    assert cd == ["cd", ROOT]
    assert recipe[-5:] == ["configs.shapes.run", "--workdir", "/tmp/shapes run", "--steps", "3"]
    assert "HF_HUB_OFFLINE=1" in recipe


@pytest.mark.parametrize("script, args", [("tpu_pod.sh", ["--dry-run", "--name"]),
                                          ("slurm_submit.sh", ["--dry-run", "--nodes"])])
def test_a_flag_without_its_value_is_named(script, args):
    result = _run(script, args)
    assert result.returncode == 2 and f"{args[-1]} needs a value" in result.stderr
