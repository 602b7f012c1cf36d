"""The analysis process keeps freed memory for the next study and keeps start-up objects out of
the garbage collector's way (server/process_tuning.py)."""

import subprocess
import sys

PROBE = """
import gc, resource
import numpy as np
from lungscreen.server.process_tuning import tune_analysis_process

def faults_of_a_study():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    volume = np.ones((300, 512, 512), dtype=np.float32)  # a 300-slice volume, 315 MB
    volume += 1
    del volume
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

untuned = [faults_of_a_study() for _ in range(2)]
tune_analysis_process()
tuned = [faults_of_a_study() for _ in range(3)]
print(untuned[-1], tuned[-1], gc.get_freeze_count())
"""


def test_a_second_study_reuses_the_memory_of_the_first():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    untuned, tuned, frozen = map(int, result.stdout.split())
    # 315 MB is 77,000 pages of 4 KiB, or 158 transparent huge pages of 2 MiB.
    assert untuned >= 150, "without tuning every study faults its pages in again"
    assert tuned <= untuned / 10, (untuned, tuned)
    assert frozen > 1000, "start-up objects are frozen out of the collector's way"
