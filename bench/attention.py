from thrifty.bench.attention import run
from thrifty.bench.common import main

main(run)
