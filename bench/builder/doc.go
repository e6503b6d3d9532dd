// Package builder benchmarks the builder agent in a QEMU guest with the
// kernel NFS client against `strata server` on the host (btrfs central
// store filled with nix-bin):
//
//   - cold start: `strata builder` from nothing to ready (NFS mount,
//     overlay, SQLite import of the generation's path rows) versus
//     `nix copy --from` an HTTP binary cache (compression=none, served from
//     the host) of the same closure, in the same guest run; the ratio is
//     reported as copy/ready.
//   - rotation to a generation with 1,000 new paths while a statloop stats
//     paths of both generations: time until the swap is done (delta, NFS
//     mount, invalidation, swap), total time (plus the import), and the
//     statloop's failures.
//
// Run as root with `make bench-builder`, or
//
//	go test -tags vm -run '^$' -bench . -benchtime 1x ./bench/builder
//
// The closure is 64 paths, 1 GiB of incompressible files, by default
// (STRATA_BENCH_CLOSURE_MB overrides; the guest gets 1 GiB + 2x the closure
// of memory, as its store is a tmpfs). A run takes about 2.5 minutes. All
// times are guest times under TCG emulation (~10 MB/s over NFS or HTTP),
// far slower than real hardware; compare ratios, not absolutes. Measured
// on the 2-core development VM (2026-11-30): nix copy 61.5 s, cold builder
// to ready 2.46 s (ratio 25.0); rotation to 1,000 new paths 0.11 s until
// the swap, 2.05 s with the import, 0 statloop failures in 1,408 stats.
package builder
