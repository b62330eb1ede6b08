"""``python -m hae_vllm.selfcheck``: passes on both tiny models in bfloat16 (run as a user runs
it), fails when the replayed evictions are wrong; plus its parts without an engine."""

import json
import re
import shutil
import sys

import pytest

from hae_vllm import selfcheck
from hae_vllm.testing import scenario
from hae_vllm.testing.oracle import OracleResult, Tolerance, compare_with_oracle
from hae_vllm.testing.scenario import launcher  # the suite's launcher (tests/conftest.py)
from hae_lab.tiny_models import llava_prompt, qwen2vl_prompt

LAST_LINE = r"selfcheck=(pass|fail) requests=(\d+) token_match=(\d+)/(\d+) max_logprob_diff=(\S+)"


def _cli(*args, timeout=1200):
    return launcher()([sys.executable, "-m", "hae_vllm.selfcheck", *args],
                          capture_output=True, text=True, timeout=timeout)


def _last_line(out: str) -> str:
    return out.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- engine runs


@pytest.fixture(scope="module")
def llava_run(llava_path, tmp_path_factory):
    saved = tmp_path_factory.mktemp("selfcheck") / "llava.json"
    return _cli("--model", llava_path, "--dtype", "bfloat16", "--save-record", str(saved)), saved


@pytest.mark.engine
def test_selfcheck_passes_on_tiny_llava_bf16(llava_run):
    proc, _ = llava_run
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert _last_line(proc.stdout) == _expected_pass(proc.stdout, 6)
    assert "dtype: bfloat16" in proc.stdout
    assert "attention backend: CPU_ATTN+eviction" in proc.stdout
    assert "FAIL" not in proc.stdout


@pytest.mark.engine
def test_selfcheck_passes_on_tiny_qwen2vl_auto_dtype(qwen2vl_path):
    """No ``--dtype``: vLLM's ``auto`` on CPU downcasts the float32 checkpoint, and the oracle
    must follow it."""
    proc = _cli("--model", qwen2vl_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert _last_line(proc.stdout) == _expected_pass(proc.stdout, 6)
    assert "dtype: bfloat16" in proc.stdout


def _expected_pass(out: str, n: int) -> str:
    m = re.fullmatch(LAST_LINE, _last_line(out))
    assert m, f"last line malformed: {_last_line(out)!r}"
    return f"selfcheck=pass requests={n} token_match={n}/{n} max_logprob_diff={m.group(5)}"


@pytest.mark.engine
def test_selfcheck_fails_on_wrong_evictions(llava_run, monkeypatch, capsys):
    """The engine's own record, replayed with every eviction position shifted by one, must be
    a failure with exit status 1: a pass means the evictions were the right ones."""
    _, saved = llava_run
    record, _, _ = selfcheck.load_saved(str(saved))
    check, reports = selfcheck.check, []

    def check_wrong(*args, **kwargs):
        reports.append(check(*args, corrupt=selfcheck.shift_positions, **kwargs))
        return reports[-1]

    monkeypatch.setattr(scenario, "run_in_subprocess", lambda spec, timeout=None: record)
    monkeypatch.setattr(selfcheck, "check", check_wrong)
    assert selfcheck.main(["--model", record["model_path"], "--dtype", "bfloat16"]) == 1
    assert _last_line(capsys.readouterr().out).startswith("selfcheck=fail requests=6 token_match=")
    evicting = [r for r in reports[0].rows if r.evicted or r.parked]
    assert evicting and all(not r.agreement.ok for r in evicting)


@pytest.mark.engine
def test_selfcheck_reports_batch_problems(llava_run):
    """Batch-level checks: a run where nothing was evicted, or blocks leaked, is a failure
    even when every request matches."""
    _, saved = llava_run
    record, labels, reqs = selfcheck.load_saved(str(saved))
    bare = json.loads(json.dumps(record))
    for r in bare["results"]:
        r["evictions"], r["decode_events"], r["eviction"] = [], [], None
    bare["trace"] = []
    bare["free_blocks_after"] = bare["free_blocks_before"] - 1
    problems = selfcheck.batch_problems(bare, reqs, [selfcheck.Row(l, None, 0, 0, 0) for l in labels])
    assert any("no request evicted" in p for p in problems)
    assert any("blocks leaked" in p for p in problems)
    # The engine ran CPU_ATTN: a check that asked for another backend fails.
    rows = [selfcheck.Row(l, None, 1, 0, 0) for l in labels]
    assert not selfcheck.batch_problems(record, reqs, rows, "CPU_ATTN")
    (problem,) = selfcheck.batch_problems(record, reqs, rows, "TRITON_ATTN")
    assert "asked for attention backend TRITON_ATTN" in problem and "CPU_ATTN+eviction" in problem


# ----------------------------------------------------------------------------- no engine


def test_request_plan_covers_every_kind_and_cycles(tmp_path):
    labels, reqs = selfcheck.plan_requests(8, 16, 0.5, None)
    assert labels[:6] == ["single image", "two images", "text only", "eviction none", "budget 0.25",
                          "decode eviction"]
    assert labels[6:] == ["single image #2", "two images #2"]
    assert [len(r.images) for r in reqs] == [1, 2, 0, 1, 1, 1, 1, 2]
    images = [i for r in reqs for i in r.images]
    assert len(set(images)) == len(images), "every image is a fresh one"
    assert reqs[3].extra_args == {"kv_eviction": "none"}
    assert reqs[4].extra_args == {"kv_eviction_budget": 0.25}
    assert reqs[5].extra_args == {"kv_eviction_decode_budget": 0.5, "kv_eviction_decode_start": 0} and reqs[5].max_tokens == 32
    # An engine-wide decode budget applies to every request: the last one just decodes longer.
    _, reqs = selfcheck.plan_requests(6, 16, 0.5, 0.4)
    assert reqs[5].extra_args is None and reqs[5].max_tokens == 32
    # Images from a directory, cycling.
    from hae_lab.tiny_models import make_test_image

    for name in ("b.png", "a.jpg"):
        make_test_image(len(name), 64).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    files = selfcheck.image_files_in(str(tmp_path))
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.jpg", "b.png"]
    _, reqs = selfcheck.plan_requests(3, 8, 0.5, None, files)
    assert reqs[0].images == [files[0]] and reqs[1].images == [files[1], files[0]]
    prompt = scenario.build_prompt("llava", reqs[1])
    assert [im.size for im in prompt["multi_modal_data"]["image"]] == [(64, 64), (64, 64)]


def test_cli_plumbing():
    args = selfcheck.parser().parse_args(["--model", "m", "--tensor-parallel-size", "2", "--decode-budget", "0.3"])
    spec = selfcheck.scenario(args, [])
    assert (spec.tensor_parallel_size, spec.distributed_executor_backend) == (2, "mp")
    assert spec.eviction == {"method": "hae", "budget": 0.5, "decode_budget": 0.3, "decode_start": 0}
    assert spec.dtype == "auto" and spec.block_size is None
    spec = selfcheck.scenario(selfcheck.parser().parse_args(["--model", "m"]), [])
    assert spec.distributed_executor_backend is None and "decode_budget" not in spec.eviction


def test_attention_backend_flags(llava_path):
    """``--attention-backend``: a backend this machine cannot run stops the check with its
    reason and the backends it can run (asked of vLLM's platform as vLLM asks); a name
    eviction does not know says which it does."""
    from hae_vllm.attention.backends import SUPPORTED

    assert selfcheck._BACKENDS == tuple(SUPPORTED)
    help_text = selfcheck.parser().format_help()
    assert "--attention-backend" in help_text and "--all-backends" in help_text
    parse = selfcheck.parser().parse_args
    assert selfcheck.chosen_backends(parse(["--model", llava_path])) == [None]
    assert selfcheck.chosen_backends(parse(["--model", llava_path, "--attention-backend", "cpu_attn"])) == ["CPU_ATTN"]
    assert selfcheck.chosen_backends(parse(["--model", llava_path, "--all-backends"])) == ["CPU_ATTN"]
    with pytest.raises(SystemExit, match=r"--attention-backend FLASH_ATTN: this machine cannot run it \(vLLM's cpu "
                                         r"platform runs CPU_ATTN in its place\); available on this machine: CPU_ATTN$"):
        selfcheck.chosen_backends(parse(["--model", llava_path, "--attention-backend", "flash_attn"]))
    with pytest.raises(SystemExit, match="XFORMERS: not a backend eviction supports .*available on this machine: CPU_ATTN"):
        selfcheck.chosen_backends(parse(["--model", llava_path, "--attention-backend", "XFORMERS"]))
    spec = selfcheck.scenario(parse(["--model", "m", "--attention-backend", "TRITON_ATTN"]), [], "TRITON_ATTN")
    assert spec.engine_kwargs == {"attention_backend": "TRITON_ATTN"}


def test_model_kind_reads_the_config_not_the_name(tmp_path, llava_path, qwen2vl_path):
    # Names that would mislead a guess from the directory name.
    for src, name, kind in ((llava_path, "qwen-style-llava", "llava"), (qwen2vl_path, "my-finetune", "qwen2vl")):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(f"{src}/config.json", d / "config.json")
        assert scenario.model_kind(str(d)) == kind


def test_chat_template_prompt_equals_the_tiny_models_raw_prompt(tmp_path, llava_path, qwen2vl_path):
    """A checkpoint that is not a tiny one gets its own chat template: for the tiny models it
    renders what their raw format writes (the template's BOS is left to the tokenizer)."""
    for path, fmt in ((llava_path, llava_prompt), (qwen2vl_path, qwen2vl_prompt)):
        for n in (0, 1, 2):
            assert scenario.chat_prompt(path, "Describe it.", n) == fmt("Describe it.", n)
        copy = tmp_path / path.rsplit("/", 1)[1]
        shutil.copytree(path, copy, ignore=shutil.ignore_patterns("tiny_model_info.json", "*.safetensors"))
        assert not scenario.is_tiny_checkpoint(str(copy))
        req = scenario.RequestSpec("Describe it.", images=[1, 2])
        assert scenario.build_prompt("x", req, str(copy))["prompt"] == fmt("Describe it.", 2)


def _ref(tokens, logprobs, margins, prompt=(1, 2)):
    return OracleResult(list(prompt), list(tokens), list(logprobs), 0, list(margins))


ENGINE = {"prompt_token_ids": [1, 2], "token_ids": [5, 6, 7], "logprobs": [-0.5, -1.0, -0.2]}


def test_tolerances_per_dtype():
    assert Tolerance.for_dtype("float32") == Tolerance(1e-3, 0.0)
    bf16 = Tolerance.for_dtype("torch.bfloat16")
    assert bf16.logprob == bf16.near_tie > 0.1
    assert Tolerance.for_dtype("float16").logprob < bf16.logprob
    assert Tolerance.for_dtype("bfloat16", noise=0.2) == Tolerance(0.2, 0.2)
    with pytest.raises(ValueError):
        Tolerance.for_dtype("int8")


def test_compare_followed_tokens():
    fp32, bf16 = Tolerance.for_dtype("float32"), Tolerance.for_dtype("bfloat16")
    same = _ref([5, 6, 7], [-0.5, -1.0, -0.2], [1.0, 0.5, 2.0])
    a = compare_with_oracle(ENGINE, same, fp32)
    assert a.ok and (a.compared, a.equal, a.near_ties, a.max_logprob_diff) == (3, 3, 0, 0.0)
    # The oracle would have picked another token at position 1, by 0.05: a near-tie in bf16,
    # a mismatch in float32.
    tie = _ref([5, 6, 7], [-0.5, -1.0, -0.2], [1.0, -0.05, 2.0])
    assert compare_with_oracle(ENGINE, tie, bf16).ok
    assert compare_with_oracle(ENGINE, tie, bf16).near_ties == 1
    assert "prefers another token" in compare_with_oracle(ENGINE, tie, fp32).problem
    far = _ref([5, 6, 7], [-0.5, -1.0, -0.2], [1.0, -2.0, 2.0])
    assert not compare_with_oracle(ENGINE, far, bf16).ok
    off = _ref([5, 6, 7], [-0.5, -1.0 + 0.01, -0.2], [1.0, 0.5, 2.0])
    assert compare_with_oracle(ENGINE, off, bf16).ok
    assert "log-prob 1" in compare_with_oracle(ENGINE, off, fp32).problem
    assert "prompt" in compare_with_oracle(ENGINE, _ref([5, 6, 7], [-0.5, -1.0, -0.2], [1, 1, 1], prompt=(1, 3)), bf16).problem


def test_compare_free_running_oracle_stops_at_a_near_tie():
    """An oracle generating on its own may take the other branch of a near-tie: positions after
    it have other contexts and are not compared; a confident other choice is a mismatch."""
    bf16 = Tolerance.for_dtype("bfloat16")
    parted = _ref([5, 9, 9], [-0.5, -0.9, -0.1], [1.0, 0.05, 1.0])
    a = compare_with_oracle(ENGINE, parted, bf16)
    assert a.ok and (a.compared, a.num_tokens) == (1, 3)
    confident = _ref([5, 9, 9], [-0.5, -0.9, -0.1], [1.0, 3.0, 1.0])
    assert "oracle 9" in compare_with_oracle(ENGINE, confident, bf16).problem
