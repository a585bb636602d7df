"""Fused optimizer benchmark (see python/thrifty/bench/optim.py): python bench/optim.py [--device cuda] [--quick]"""
from thrifty.bench.optim import run
from thrifty.bench.common import main

if __name__ == "__main__":
    main(run)
