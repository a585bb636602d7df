"""Quantized GEMM benchmark: python bench/quant.py [--device cpu|cuda] [--quick]"""
from thrifty.bench.common import main
from thrifty.bench.quant import run

if __name__ == "__main__":
    main(run)
