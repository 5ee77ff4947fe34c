"""Measurement: the evaluation harness (attack accuracy, Tables 2-5, Figure 2), fidelity, the bench,
reports and plots, and the one launcher that starts a server on loopback for them and for the tests."""
