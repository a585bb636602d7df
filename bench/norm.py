"""RMSNorm, fused add+RMSNorm, rotary embedding and SwiGLU vs PyTorch (see thrifty.bench.norm)."""
from thrifty.bench.common import main
from thrifty.bench.norm import run

if __name__ == "__main__":
    main(run)
