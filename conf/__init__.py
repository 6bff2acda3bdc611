# Makes conf/ importable as the `minitron_mcore.conf` package (see setup.py) so installed
# copies find their Hydra configs.
