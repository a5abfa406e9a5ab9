"""stat-exp's Hydra sweeper: experiments chosen in a sweep run their own grids (stat_exp.grids)."""
