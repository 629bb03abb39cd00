"""Baseline erasure methods (ESD, SDD, Ablating Concepts, Forget-Me-Not), registered into erasure.registry."""
