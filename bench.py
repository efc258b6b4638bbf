"""
Benchmarks, every figure a ratio measured inside one run (never a timed test):
  python bench.py [--only=model,ift,...]     # CPU: benchmarks/cpu.py
  python bench.py --gpu [--tiny]             # the one prepared GPU run: benchmarks/gpu.py
This launcher stays at the top level because a borrowed GPU machine is given exactly `python bench.py --gpu`.
"""
import sys

if __name__ == "__main__":
    if "--gpu" in sys.argv[1:]:
        from benchmarks import gpu
        gpu.main([a for a in sys.argv[1:] if a != "--gpu"])
    else:
        from benchmarks import cpu
        cpu.main()
