import sys

from simulations.reproduce.report import main

main(sys.argv[1:])
