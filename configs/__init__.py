"""The shipped configurations (*.yaml), package data so an installed wheel finds them (fcn_core.config)."""
