"""conftest's --shard I/N: N processes share a suite (scripts/gpu_check.sh); together they run each test once."""
import subprocess
import sys


def collected(*args):
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_phase_keys.py", *args],
                         capture_output=True, text=True)
    return out.returncode, [line for line in out.stdout.splitlines() if "::" in line], out.stderr


def test_shards_partition_the_selection():
    _, whole, _ = collected()
    shards = [collected("--shard", f"{i}/2")[1] for i in range(2)]
    assert len(whole) >= 2 and sorted(sum(shards, [])) == sorted(whole)
    assert abs(len(shards[0]) - len(shards[1])) <= 1


def test_bad_shard():
    code, _, err = collected("--shard", "2/2")
    assert code != 0 and "--shard must be I/N" in err
