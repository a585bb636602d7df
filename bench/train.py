from thrifty.bench.train import main

main()
