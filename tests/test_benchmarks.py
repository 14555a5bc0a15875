"""The benchmark scripts' one smoke test: `benchmarks/gpu.sh --quick` (tiny sizes) runs on CPU without error."""
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_sh_quick_runs_on_cpu():
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "ours/diffusers" in done.stdout  # both the forward and the pipeline compared the two implementations
    assert "| stage_c tiny | ours |" in done.stdout and "| diffusers |" in done.stdout
