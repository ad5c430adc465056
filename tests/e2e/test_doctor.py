"""`eureka-megatron doctor` as a user runs it on a CPU machine: every check ok or skipped with its
reason, the kernels really compared with the reference, the sync's log-probs within the fp32
contract; a failing check is one FAIL row and the others still run."""
import json
import subprocess
import sys

from eureka_megatron.bench import doctor


def cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "eureka_megatron.cli", "doctor", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_doctor_on_cpu_passes_every_check_and_writes_json(tmp_path):
    out = tmp_path / "doctor.json"
    r = cli("--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["doctor"]["rows"]
    assert {x["group"] for x in rows} == set(doctor.GROUPS)
    for x in rows:
        assert x["status"] in ("ok", "skipped"), x
        assert x["status"] == "ok" or x["note"], x  # a skip says why
        assert f"| {x['check']} | {x['status']} |" in r.stdout
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    assert all(line.count("|") == len(doctor.COLUMNS) + 1 for line in table)  # no stray pipes
    by = {x["check"]: x for x in rows}
    assert by["torch"]["status"] == by["triton"]["status"] == "ok"
    assert "no CUDA device" in by["CUDA"]["note"]
    assert by["all-reduce"]["status"] == "skipped"

    # the kernels ran through the interpreter and were compared: small errors, but not zero
    # (bf16 gradients carry bf16 rounding; identical code paths would give exactly 0)
    for name in ("logprob_entropy", "policy_loss"):
        for dtype in ("fp32", "bf16"):
            k = by[f"{name} {dtype}"]
            assert k["status"] == "ok" and "interpreted" in k["note"]
            tol = 1e-5 if dtype == "fp32" else 1.6e-2
            assert all(0 <= e < tol for e in k["errors"].values()), k["errors"]
        assert max(by[f"{name} bf16"]["errors"].values()) > 1e-4

    train = by["megatron train step fp32"]
    assert train["tokens_per_s"] > 0 and len(train["history"]) == 2
    sync = by["megatron -> hf engine, fp32"]
    assert sync["version"] == 1 and sync["tokens"] == 4 * 16
    assert 0 <= sync["mean"] <= sync["max"] < 1e-4


def test_help_lists_every_check_and_the_small_sizes():
    r = cli("--help", timeout=60)
    assert r.returncode == 0
    for group in doctor.GROUPS:
        assert f"\n  {group} " in r.stdout, group
    T, H, V, real = doctor.LOGPROB_SHAPE["small"]
    B, L = doctor.POLICY_SHAPE["small"]
    _, seq, batch, steps = doctor.TRAIN["small"]
    prompt, n, new = doctor.SYNC["small"]
    text = " ".join(r.stdout.split())
    sizes = [f"{T} x {H} x {V} ({real} real)", f"{B} x {L}",
             f"{batch} x {seq} tokens, {steps} steps", f"{n} x {new} from {prompt}"]
    for size in sizes:
        assert size in text, size


def test_a_failing_check_is_one_row_and_the_rest_still_run(monkeypatch, tmp_path, capsys):
    def broken(ctx):
        raise ValueError("no luck\nsecond line")

    def fine(ctx):
        return [doctor.row("versions", "fine", "ok", "1")]

    monkeypatch.setattr(doctor, "CHECKS", [("kernels", broken), ("versions", fine)])
    assert doctor.run_doctor(out=tmp_path / "d.json") == 1
    rows = json.loads((tmp_path / "d.json").read_text())["doctor"]["rows"]
    assert [(x["check"], x["status"], x["note"]) for x in rows] == [
        ("kernels", "FAIL", "ValueError: no luck"), ("fine", "ok", "")]
    assert "FAIL: kernels" in capsys.readouterr().out
