"""Proofs and threat models: interval bounds through the served network, the two-step
certificate with its abstain gate, certificates beside evaluations, and the model each threat
model attacks."""
