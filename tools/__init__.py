"""What runs around the stages, not inside them: Make's plumbing (deps, runlock, the included
makefiles), the offline demo builder, and the helpers the tests and benchmarks share."""
