from thrifty.bench.attention import run
from thrifty.bench.common import main

if __name__ == "__main__":
    main(run)
