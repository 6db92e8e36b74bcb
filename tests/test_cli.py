"""The CLI as a user meets it: real subprocesses, one-line errors, exit code 2."""

import argparse
import json
import subprocess
import sys

import pytest

from federation_procs import ENV, stamen, stamen_each


def test_models_lists_every_preset_with_its_count():
    from stamen.core.model import PRESETS, gpt_param_count

    r = stamen("models")
    assert r.returncode == 0
    for name, cfg in PRESETS.items():
        assert any(line.split()[:2] == [name, f"{gpt_param_count(cfg):,}"] for line in r.stdout.splitlines())


@pytest.mark.parametrize("args, message", [
    (["baseline", "--model", "gpt-huge", "--out", "x"], "unknown model 'gpt-huge'"),
    (["baseline", "--tokens", "many", "--out", "x"], "not a whole number"),
    (["baseline", "--tokens", "-5", "--out", "x"], "must be positive"),
    (["baseline", "--data", "/no/such/dir", "--out", "x"], "/no/such/dir"),
    (["frobnicate"], "invalid choice"),
])
def test_user_mistakes_are_one_line_and_exit_2(args, message, tmp_path):
    r = stamen(*args)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr and "Traceback" not in r.stderr


def test_help_everywhere():
    for args in (["--help"], ["baseline", "--help"], ["models", "--help"]):
        r = stamen(*args)
        assert r.returncode == 0 and "usage:" in r.stdout


def test_baseline_writes_summary_and_plot(tmp_path):
    r = stamen("baseline", "--tokens", "20000", "--batch-size", "8", "--seq-len", "32", "--out", str(tmp_path), "--quiet")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) >= {"model", "tokens", "final_val_loss", "val_curve", "wall_s"}
    assert summary["tokens"] == (20000 // 256) * 256
    assert summary["val_curve"][-1][1] < summary["val_curve"][0][1]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = stamen("generate", "--model", tmp_path / "model", "--prompt", "import ", "--max-new-tokens", "20")
    assert r.returncode == 0 and len(r.stdout) > 10, r.stderr


def test_plans_prints_every_tier_with_its_cost():
    from stamen.core.model import ModelSpec
    from stamen.core.plan import TIERS, plans_table

    r = stamen("plans", "--model", "gpt-tiny")
    assert r.returncode == 0, r.stderr
    rows = {row["tier"]: row for row in plans_table(ModelSpec("gpt-tiny"), 8, 128)}
    for tier in TIERS:
        line = next(line for line in r.stdout.splitlines() if line.startswith(tier + " "))
        assert f"{rows[tier]['params']:,}" in line and rows[tier]["plan"] in line


def test_token_create_prints_a_token_for_the_role(tmp_path):
    r = stamen("token", "create", "--role", "gpu", "--state", str(tmp_path), "--init")
    assert r.returncode == 0 and r.stdout.startswith("stj_gpu_")
    r = stamen("token", "create", "--role", "boss", "--state", str(tmp_path))
    assert r.returncode == 2 and "invalid choice" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["server", "--model", "gpt-huge", "--state", "s"], "unknown model"),
    (["server", "--state", "s", "--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
    (["status", "http://127.0.0.1:9"], "cannot read"),
    (["client", "--server", "http://127.0.0.1:9", "--token", "x", "--data", "stdlib", "--max-memory", "lots"], "lots"),
])
def test_operator_and_client_mistakes_are_one_line(args, message, tmp_path):
    r = stamen(*args)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_memory_sizes():
    from stamen.cli_federation import memory_size

    assert memory_size("512M") == 512 * 2**20 and memory_size("1.5GiB") == int(1.5 * 2**30)
    assert memory_size("4096") == 4096 and memory_size("2g") == 2 * 2**30
    for bad in ("lots", "0", "-1G", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            memory_size(bad)


MISTAKES_BEFORE_TORCH = [
    ["frobnicate"],
    ["baseline", "--model", "gpt-huge", "--out", "x"],
    ["baseline", "--data", "/no/such/dir", "--out", "x"],
    ["server", "--model", "gpt-huge", "--state", "s"],
    ["server", "--state", "s", "--tls-cert", "c.pem"],
    ["client", "--server", "http://127.0.0.1:9", "--token", "x", "--data", "stdlib", "--max-memory", "lots"],
    ["device-emulator", "--server", "http://127.0.0.1:9", "--token", "t", "--runtime", "tflite", "--data", "d"],
    ["export", "--plan", "missing.json", "--runtime", "ort", "--out", "x"],
    ["export", "--model", "gpt-huge", "--plan", "gpu", "--runtime", "ort", "--out", "x"],
    ["status", "http://127.0.0.1:9"],  # nothing listens there; a status read never loads torch
]


def test_mistakes_are_answered_before_torch_loads():
    """A mistake costs its user a fraction of a second, not the seconds (minutes on a busy
    machine) of importing torch: each of these exits 2 with torch still unloaded."""
    code = ("import sys\nfrom stamen.cli import main\n"
            f"for argv in {MISTAKES_BEFORE_TORCH!r}:\n"
            "    print(main(argv), 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.stdout.splitlines() == ["2 False"] * len(MISTAKES_BEFORE_TORCH), r.stdout + r.stderr
    assert r.stderr.count("\n") == len(MISTAKES_BEFORE_TORCH) and "Traceback" not in r.stderr, r.stderr


def test_export_writes_a_verified_bundle(tmp_path):
    from stamen.core.model import ModelSpec
    from stamen.core.plan import tier_plans
    from stamen.mobile_bridge.manifest import read_bundle

    spec = ModelSpec("gpt-tiny")
    r = subprocess.run([sys.executable, "-m", "stamen", "export", "--plan", "phone-low", "--runtime", "ort",
                        "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "STAMEN_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert "I:onnxruntime" not in r.stderr
    plan = tier_plans(spec.gpt_config())["phone-low"]
    manifest = read_bundle(tmp_path / "b", spec.hash, plan.hash, "ort")
    assert manifest.runtime == "ort"


@pytest.mark.parametrize("args, message", [
    (["export", "--plan", "tablet", "--runtime", "ort", "--out", "x"], "unknown plan 'tablet'"),
    (["export", "--plan", "missing.json", "--runtime", "ort", "--out", "x"], "plan file not found"),
    (["export", "--model", "torch.nn:Identity", "--plan", "gpu", "--runtime", "ort", "--out", "x"], "not a stamen GPT"),
    (["export", "--plan", "gpu", "--runtime", "coreml", "--out", "x"], "invalid choice"),
    (["device-emulator", "--server", "http://127.0.0.1:9", "--token", "t", "--runtime", "tflite", "--data", "d"], "invalid choice"),
])
def test_export_mistakes_are_one_line(args, message):
    r = stamen(*args)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_simulate_writes_the_report(tmp_path):
    config = tmp_path / "sim.toml"
    config.write_text("[simulation]\nmax_versions = 2\neval_every = 1\neval_batches = 1\nbaseline = false\n")
    r = stamen("simulate", "--config", str(config), "--devices", "30", "--out", str(tmp_path / "run"), "--quiet")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sum(summary["devices"].values()) == 30 + 2  # the packaged default adds 2 GPU nodes
    assert summary["versions"] == 2
    for png in ("loss.png", "devices.png", "staleness.png"):
        assert (tmp_path / "run" / png).read_bytes()[:4] == b"\x89PNG"
    assert f"report in {tmp_path / 'run'}/" in r.stdout


BAD_CONFIGS = [
    ("[simulation]\nmax_versions = 'many'\n", "max_versions"),
    ("[simulaton]\nseed = 1\n", "simulaton"),
    ("[simulation]\ntext = 'secret'\n", "unknown text mode"),
    ("[simulation]\ntext = 'private'\npublic_share = 1.5\n", "public share"),
]


def test_simulate_bad_config_is_one_line(tmp_path):
    argvs = []
    for i, (body, _) in enumerate(BAD_CONFIGS):
        (tmp_path / f"sim{i}.toml").write_text(body)
        argvs.append(["simulate", "--config", tmp_path / f"sim{i}.toml", "--out", tmp_path / f"run{i}"])
    for (code, err), (_, message) in zip(stamen_each(*argvs), BAD_CONFIGS, strict=True):
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_simulate_refuses_at_start_up_a_population_its_text_cannot_feed(tmp_path):
    """Each device needs a window of seq_len+1 bytes: the 2 training files of 600 bytes (the
    third is held out) cannot feed 100 devices, which is said in one line after the data's
    own line, before anything runs (not by a batch stream mid-run)."""
    for name in ("a", "b", "c"):
        (tmp_path / "text" / name).mkdir(parents=True)
        (tmp_path / "text" / name / "f.txt").write_text("x = 1\n" * 100)
    config = tmp_path / "sim.toml"
    config.write_text(f"[simulation]\ndata = '{tmp_path / 'text'}'\ntext = 'shared'\n")
    r = stamen("simulate", "--config", str(config), "--devices", "100", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1] == ("stamen: error: the text holds 18 training windows of 66 bytes, fewer than "
                                         "the 100 devices to deal it to: use fewer devices or more text")
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--compare", "mixed,phones"], "--compare takes distinct names"),
    (["--compare", "mixed", "--sync-vs-async"], "not allowed with"),
    (["--compare", "mixed", "--seeds", "0"], "must be positive"),
    (["--seeds", "2"], "--seeds applies to --compare and --sync-vs-async"),
])
def test_simulate_compare_mistakes_are_one_line(tmp_path, args, message):
    r = stamen("simulate", *args, "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
