from thrifty.bench.model import run
from thrifty.bench.common import main

main(run)
