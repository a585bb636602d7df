from thrifty.bench.train import run
from thrifty.bench.common import main

main(run)
