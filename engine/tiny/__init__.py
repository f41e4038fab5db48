"""The offline tiny models: small models of the real architectures, built deterministically from a seed, saved with
save_pretrained and loaded back like real weights. registry.py names them all. Imports engine.library_logging only
(and, for the pretrained ones, what they train with); nothing imports it but the resolvers."""
