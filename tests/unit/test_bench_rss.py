"""`bench convert` measures a converter's own peak RSS, not the (larger) bench process's: Linux
carries a process's peak RSS over fork + exec."""
import sys

from eureka_megatron.bench.convert import _timed

ALLOCATE = "b = bytearray({mb} << 20)\nfor i in range(0, len(b), 4096): b[i] = 1"


def test_peak_rss_is_the_commands_own():
    ballast = bytearray(600 << 20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    _, small = _timed([sys.executable, "-c", "pass"])
    _, big = _timed([sys.executable, "-c", ALLOCATE.format(mb=300)])
    assert small < 0.1  # a bare interpreter, not this process's 600+ MB
    assert 0.29 < big < 0.45
    del ballast
