# Quick start: `make serve` (set up + start the server) and `make test` (set up + run all tests).
.PHONY: setup serve test

setup:
	scripts/bootstrap.sh

serve: setup
	.venv/bin/lungscreen serve

test:
	scripts/test.sh
