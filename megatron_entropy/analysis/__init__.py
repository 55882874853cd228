"""Analysis of runs: entropy figures (plots), entropy alarms (alarms), private-inference cost
accounting (pi_cost) and the reduced reproduction study (study). Import the submodules directly;
this package imports nothing so that the training loop pays nothing for it."""
