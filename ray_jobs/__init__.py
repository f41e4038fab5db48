"""Ray orchestration of the engine: the subjects manifest, the fleet of actors, Ray Data passes and the CLI."""
