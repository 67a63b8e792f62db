"""The benches' peer machinery on CPU: peer wheels installed with pip into a target and seen only by
the peer's own process (a stand-in Unsloth wheel built here), failures isolated per system, ratios
to Unsloth from the same call, and the generate / profile benches' smoke modes."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import zipfile
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parents[2] / "benches"

# A stand-in for Unsloth's API, written for this test: plain transformers + peft on CPU. It records
# whether transformers was imported before it (the peer runner must import Unsloth first).
FAKE_UNSLOTH = """
import sys
__version__ = "0.0.1"
TRANSFORMERS_FIRST = "transformers" in sys.modules


class FastLanguageModel:
    @staticmethod
    def from_pretrained(path, max_seq_length=None, dtype=None, load_in_4bit=False, load_in_16bit=False,
                        fix_tokenizer=True):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        assert load_in_4bit != load_in_16bit and fix_tokenizer is False
        if load_in_4bit:
            raise NotImplementedError("the stand-in Unsloth has no 4-bit")
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)

    @staticmethod
    def get_peft_model(model, r, target_modules, lora_alpha, lora_dropout, bias, use_gradient_checkpointing,
                       random_state, max_seq_length):
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
                         target_modules=target_modules, task_type="CAUSAL_LM")
        return get_peft_model(model, cfg)

    @staticmethod
    def for_training(model):
        model.train()
        return model

    @staticmethod
    def for_inference(model):
        model.eval()
        return model
"""


def _fake_unsloth_wheel(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "unsloth-0.0.1-py3-none-any.whl"
    info = "unsloth-0.0.1.dist-info"
    files = {
        "unsloth/__init__.py": FAKE_UNSLOTH,
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: unsloth\nVersion: 0.0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return folder


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


TINY = ["--shape", "tiny", "--batch", "2", "--seq-len", "32", "--warmup", "1", "--steps", "2", "--r", "8"]


def test_unsloth_runs_from_peer_wheels_in_its_own_process_with_ratios(tmp_path):
    train_step = _load("train_step")
    wheels = _fake_unsloth_wheel(tmp_path / "wheels")
    out = tmp_path / "rows.jsonl"
    systems = "rslora_fast:16bit:true,unsloth:bf16:true,nope:bf16"
    argv = [*TINY, "--systems", systems, "--cache", str(tmp_path / "cache"), "--out", str(out)]
    argv += ["--peer-wheels", str(wheels), "--in-process"]
    assert train_step.main(argv) == 1  # the unknown system fails; the others still run
    rows = _rows(out)
    by = {(r["kind"], r["system"]): r for r in rows}
    ours, peer = by[("train_step", "rslora_fast:16bit:true")], by[("train_step", "unsloth:bf16:true")]
    # The peer ran from the installed wheel, in a process where it was imported before transformers;
    # this process (which ran rslora_fast in-process) never imported it.
    assert peer["version"] == "unsloth 0.0.1" and "unsloth" not in sys.modules
    assert peer["losses_finite"] and peer["tokens_per_s"] > 0 and peer["timed_steps"] == 2
    assert "unknown system" in by[("error", "nope:bf16")]["error"]
    ratio = by[("ratio_to_unsloth", "rslora_fast:16bit:true")]
    assert ratio["unsloth"] == "unsloth:bf16:true"
    assert ratio["tokens_per_s"] == pytest.approx(ours["tokens_per_s"] / peer["tokens_per_s"], rel=1e-2)
    for r in (ours, peer):
        assert r["spread"] >= 1.0 and 0 < r["host_enqueue_s_median"] <= r["step_s_max"]
        assert r["optimizer"] == "default" and r["warmup"] == 1


def test_peer_systems_skipped_with_a_note_without_wheels(tmp_path):
    from rslora_fast import bench

    out = tmp_path / "rows.jsonl"
    argv = [
        *TINY,
        "--systems",
        "unsloth:4bit,unsloth:bf16",
        "--cache",
        str(tmp_path / "c"),
        "--out",
        str(out),
    ]
    assert bench.main(argv) == 0
    rows = _rows(out)
    assert [r["kind"] for r in rows] == ["skipped", "skipped"]
    assert all("no --peer-wheels given: unsloth runs from the peer wheels" in r["skipped"] for r in rows)
    # A spent time budget skips what has not started, with the reason.
    argv = [*TINY, "--systems", "rslora_fast:16bit", "--cache", str(tmp_path / "c"), "--out", str(out)]
    assert bench.main([*argv, "--time-budget-s", "0"]) == 0
    assert "--time-budget-s was spent" in _rows(out)[-1]["skipped"]
    # From the package alone (no checkout runner), Unsloth is refused even with wheels.
    runner = bench.Runner(tmp_path, {}, None)
    assert "only from a checkout" in runner.skip_reason(bench.parse_system("unsloth:4bit"), "x")


def test_ratio_rows_pair_each_system_with_unsloth_of_its_precision_and_optimizer():
    from rslora_fast import bench

    def row(system, optimizer, tps, peak):
        return {"kind": "train_step", "system": system, "optimizer": optimizer, "tokens_per_s": tps,
                "peak_alloc_gib": peak, "spread": 1.1, "host_enqueue_s_median": 0.1}  # fmt: skip

    rows = [
        row("unsloth:4bit", "default", 1000.0, 7.0),
        row("unsloth:bf16", "default", 2000.0, 16.0),
        row("rslora_fast:4bit:unsloth", "default", 1300.0, 6.3),
        row("rslora_fast:16bit:unsloth", "default", 2500.0, 16.0),
        row("rslora_fast:4bit:unsloth", "fused", 1400.0, 6.3),  # no fused Unsloth row: no ratio
        row("unsloth:4bit:false", "default", 1500.0, 21.0),
        row("rslora_fast:4bit:unsloth:budget=21", "default", 1800.0, 21.0),
    ]
    got = {r["system"]: r for r in bench.ratio_rows(rows)}
    assert set(got) == {
        "rslora_fast:4bit:unsloth",
        "rslora_fast:16bit:unsloth",
        "rslora_fast:4bit:unsloth:budget=21",
    }
    # A budget row is compared with Unsloth without checkpointing.
    assert got["rslora_fast:4bit:unsloth:budget=21"]["unsloth"] == "unsloth:4bit:false"
    assert got["rslora_fast:4bit:unsloth:budget=21"]["tokens_per_s"] == 1.2
    assert got["rslora_fast:4bit:unsloth"]["unsloth"] == "unsloth:4bit"
    assert got["rslora_fast:4bit:unsloth"]["tokens_per_s"] == 1.3
    assert got["rslora_fast:4bit:unsloth"]["peak_alloc_gib"] == 0.9
    assert got["rslora_fast:16bit:unsloth"]["tokens_per_s"] == 1.25


@pytest.mark.parametrize(
    "text,match",
    [("unsloth:8bit", "base '8bit' is not one of"), ("hf_peft:bf16:budget=3", "is not one of"),
     ("rslora_fast:4bit:budget=x", "budget must be GiB"), ("rslora_fast:4bit:sometimes", "'sometimes' is not one of"),
     ("unsloth:4bit:embed=host", "'embed=host' is not one of"), ("rslora_fast:4bit:save=sometimes", "is not one of")],
)  # fmt: skip
def test_bad_systems_are_named(text, match):
    from rslora_fast import bench

    with pytest.raises(ValueError, match=match):
        bench.parse_system(text)


def test_embed_host_and_save_reach_get_peft_model_options():
    from rslora_fast import bench

    assert bench.parse_system("rslora_fast:4bit:unsloth:embed=host").offload_embedding
    assert not bench.parse_system("rslora_fast:4bit:unsloth").offload_embedding
    both = bench.parse_system("rslora_fast:4bit:unsloth:embed=host:save=auto")
    assert both.offload_embedding and both.save_policy == "auto"
    assert bench.parse_system("rslora_fast:4bit").save_policy == "never"


def test_optimizer_rows_default_and_fused():
    import torch

    from rslora_fast import bench

    p = [torch.nn.Parameter(torch.zeros(2))]
    assert not bench.make_optimizer(p, "default").defaults["fused"]
    assert bench.make_optimizer(p, "fused").defaults["fused"] is True
    with pytest.raises(ValueError, match="not one of"):
        bench.make_optimizer(p, "sgd")


def test_generate_smoke_with_peer_and_grpo(tmp_path):
    generate = _load("generate")
    wheels = _fake_unsloth_wheel(tmp_path / "wheels")
    out = tmp_path / "gen.jsonl"
    argv = ["--smoke", "--systems", "rslora_fast:16bit,unsloth:bf16,unsloth:4bit", "--batches", "1,2"]
    argv += ["--cache", str(tmp_path / "cache"), "--out", str(out), "--peer-wheels", str(wheels)]
    grpo = importlib.util.find_spec("trl") is not None
    argv += ["--part", "generate,grpo" if grpo else "generate"]
    code = generate.main(argv)
    rows = _rows(out)
    gen = {(r["system"], r["batch"]): r for r in rows if r["kind"] == "generate"}
    assert set(gen) == {
        ("rslora_fast:16bit", 1),
        ("rslora_fast:16bit", 2),
        ("unsloth:bf16", 1),
        ("unsloth:bf16", 2),
    }
    for r in gen.values():
        assert r["new_tokens"] == 4 and r["tokens_per_s"] > 0 and r["ttft_s"] > 0
    assert gen[("unsloth:bf16", 1)]["version"] == "unsloth 0.0.1"
    assert (
        "ttft_long_s" in gen[("rslora_fast:16bit", 1)] and "ttft_long_s" not in gen[("rslora_fast:16bit", 2)]
    )
    ratios = [r for r in rows if r["kind"] == "ratio_to_unsloth"]
    assert {(r["system"], r["batch"]) for r in ratios} == {("rslora_fast:16bit", 1), ("rslora_fast:16bit", 2)}
    # A peer that fails in its own process is reported with its error; the others still ran.
    errors = [r for r in rows if r["kind"] == "error"]
    assert [r["system"] for r in errors] == ["unsloth:4bit"] and code == 1
    assert "the stand-in Unsloth has no 4-bit" in errors[0]["error"]
    if grpo:
        steps = {r["fast_generate"]: r for r in rows if r["kind"] == "grpo"}
        assert set(steps) == {"on", "off"}
        assert all(r["steps"] == 2 and r["step_s_median"] > 0 for r in steps.values())


def test_weight_bytes_per_step_llama_3_8b():
    generate = _load("generate")
    from rslora_fast.bench import SHAPES

    cfg = SHAPES["llama-3-8b"]
    # 8B: 32 layers of 218,103,808 projection weights; head 128256 x 4096 in bf16.
    bf16 = generate.weight_bytes_per_step(cfg, False, 0)
    assert bf16 == 32 * (218_103_808 * 2 + 4 * 4096) + 2 * 128256 * 4096 + 2 * 4096
    nf4 = generate.weight_bytes_per_step(cfg, True, 0)
    assert nf4 == int(
        32 * (218_103_808 * (0.5 + 1 / 64 + 4 / 16384) + 4 * 4096) + 2 * 128256 * 4096 + 2 * 4096
    )


def test_profile_smoke_reports_the_lora_share(tmp_path):
    profile = _load("profile_step")
    jout = tmp_path / "p.jsonl"
    argv = [
        "--smoke",
        "--cache",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "p.txt"),
        "--json-out",
        str(jout),
    ]
    assert profile.main(argv) == 0
    row = _rows(jout)[0]
    cats = row["categories_ms"]
    assert cats["LoRA GEMMs"] > 0 and cats["base GEMMs"] > 0 and cats["attention"] > 0
    assert 0 < row["lora_share"] < 1
    assert "LoRA share:" in (tmp_path / "p.txt").read_text()


def test_a_system_past_its_time_is_ended_with_what_it_started(tmp_path):
    import time

    from rslora_fast import bench

    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(c.pid))\n"
        "time.sleep(60)\n"
    )
    t0 = time.time()
    err = bench.run_worker_process([sys.executable, "-c", script], {**os.environ}, tmp_path / "w.log", 3.0)
    assert err.startswith("timed out after 3 s") and time.time() - t0 < 30
    child = Path(f"/proc/{pid_file.read_text()}/status")
    for _ in range(50):  # the orphan is reaped by init shortly after it is killed
        if not child.exists() or "\tZ" in child.read_text():
            break
        time.sleep(0.1)
    assert not child.exists() or "\tZ" in child.read_text()


def test_union_length_counts_overlaps_once():
    from rslora_fast.bench import union_length

    # [0,4] and [2,5] overlap on [2,4]; [6,7] is apart; [6.2,6.5] lies inside it: 5 + 1 covered.
    assert union_length([(6.0, 7.0), (0.0, 4.0), (2.0, 5.0), (6.2, 6.5)]) == 6.0
    assert union_length([]) == 0.0
