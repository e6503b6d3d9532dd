// Package publish benchmarks the publish cost of a generation, snapshot
// excluded: reading the registration out of a store's db.sqlite
// (nixstore.ReadDB) and verifying it against the store's files
// (nixstore.Verify), next to what `nix-store --dump-db` takes for the same
// store. Run it as root with
//
//	go test -tags integration -run '^$' -bench . -benchtime 1x ./bench/publish
//
// The store (100,000 paths by default; STRATA_BENCH_PATHS overrides) is
// built once and cached under /var/tmp/strata-bench.
package publish
