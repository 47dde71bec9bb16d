"""``torchrun -m geojepa.train CONFIG.json``."""

from geojepa.train.train import main

main()
